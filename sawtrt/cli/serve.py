import signal
import threading

import click

from . import engine_options


@click.command("serve")
@click.option("--engine", "engine_dir", required=True,
              type=click.Path(exists=True, file_okay=False),
              help="Engine directory made by `sawtrt build`.")
@click.option("--model-repository", type=click.Path(file_okay=False), default=None,
              help="Where to write the Triton model repository [default: ENGINE/triton_model_repo].")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on (0.0.0.0 for all interfaces).")
@click.option("--grpc-port", default=8001, show_default=True, type=click.IntRange(0, 65535),
              help="0 picks a free port.")
@click.option("--http-port", default=8000, show_default=True, type=click.IntRange(0, 65535))
@click.option("--metrics-port", default=8002, show_default=True, type=click.IntRange(0, 65535))
@click.option("--device", default="", help="Engine device (cpu, cuda, cuda:1) [default: cuda if any].")
@click.option("--log-file", type=click.Path(dir_okay=False), default=None,
              help="Append the server's log here [default: this terminal].")
@click.option("--log-verbose", default=0, show_default=True, type=int)
@click.option("--ready-timeout", default=600, show_default=True, type=float,
              help="Seconds to wait for the model to load.")
@engine_options
def serve(engine_dir, model_repository, host, grpc_port, http_port, metrics_port, device,
          log_file, log_verbose, ready_timeout, engine_options):
    """Serve an engine with a real tritonserver (Python backend, gRPC streaming).

    Writes the model repository, starts tritonserver, waits until the model is ready and runs
    until SIGINT/SIGTERM, then stops the server (in-flight requests get a few seconds to drain).
    """
    from ..serving.server import ServerError, TritonNotFound, TritonServer
    from ..serving.triton_repo import MODEL_NAME, write_model_repository

    repo = write_model_repository(engine_dir, model_repository, device=device,
                                  options=engine_options)
    server = TritonServer(repo, grpc_port=grpc_port, http_port=http_port,
                          metrics_port=metrics_port, host=host, log_file=log_file or "-",
                          log_verbose=log_verbose)
    stop = threading.Event()
    signals = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        signals[sig] = signal.signal(sig, lambda *_: stop.set())
    try:
        try:
            server.start()
            click.echo(f"sawtrt serve: starting tritonserver pid {server.proc.pid} "
                       f"(model repository {repo})", err=True)
            ready = server.wait_ready(ready_timeout, model=MODEL_NAME, cancel=stop)
        except (TritonNotFound, ServerError) as e:
            raise click.ClickException(str(e)) from None
        if ready:
            click.echo(f"sawtrt serve: ready  grpc {server.grpc_url}  http {server.http_url}  "
                       f"metrics {server.metrics_url}  (Ctrl-C stops)", err=True)
        while not stop.is_set():
            if server.proc is None or server.proc.poll() is not None:
                code = None if server.proc is None else server.proc.returncode
                raise click.ClickException(f"tritonserver exited unexpectedly (code {code})")
            stop.wait(0.5)
        click.echo("sawtrt serve: stopping", err=True)
    finally:
        code = server.stop()
        for sig, old in signals.items():
            signal.signal(sig, old)
    click.echo(f"sawtrt serve: tritonserver exited with code {code}", err=True)
    if code != 0:
        raise click.ClickException("tritonserver did not stop cleanly")
