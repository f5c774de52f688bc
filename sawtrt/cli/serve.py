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
@click.option("--openai-port", default=9000, show_default=True, type=click.IntRange(0, 65535),
              help="OpenAI-compatible HTTP API (/v1/chat/completions, /v1/completions, "
                   "/v1/models, /metrics); every request goes through tritonserver.")
@click.option("--no-openai", is_flag=True, help="Serve Triton's gRPC/HTTP endpoints only.")
@click.option("--served-model-name", default=None,
              help="The `model` the OpenAI API answers to [default: the engine's model name].")
@click.option("--drain-timeout", default=30.0, show_default=True, type=click.FloatRange(min=0),
              help="On SIGINT/SIGTERM: seconds requests in flight get to finish (new ones get "
                   "503) before they end with an error.")
@click.option("--restart", is_flag=True,
              help="Start tritonserver again when it dies (at most 5 times).")
@click.option("--device", default="", help="Engine device (cpu, cuda, cuda:1) [default: cuda if any].")
@click.option("--log-file", type=click.Path(dir_okay=False), default=None,
              help="Append the server's log here [default: this terminal].")
@click.option("--log-verbose", default=0, show_default=True, type=int)
@click.option("--ready-timeout", default=600, show_default=True, type=float,
              help="Seconds to wait for the model to load.")
@engine_options
def serve(engine_dir, model_repository, host, grpc_port, http_port, metrics_port, openai_port,
          no_openai, served_model_name, drain_timeout, restart, device, log_file, log_verbose,
          ready_timeout, engine_options):
    """Serve an engine with a real tritonserver (Python backend, gRPC streaming) and an
    OpenAI-compatible API in front of it.

    Writes the model repository, starts tritonserver, waits until the model is ready, starts
    the OpenAI API and runs until SIGINT/SIGTERM. Then it drains: new requests get 503,
    requests in flight get --drain-timeout seconds, tritonserver stops cleanly.
    """
    from pathlib import Path

    from ..serving.launcher import Launcher, ServeConfig
    from ..serving.server import ServerError, TritonNotFound
    from ..serving.triton_repo import write_model_repository

    repo = write_model_repository(engine_dir, model_repository, device=device,
                                  options=engine_options)
    cfg = ServeConfig(engine_dir=Path(engine_dir).resolve(), model_repository=repo, host=host,
                      grpc_port=grpc_port, http_port=http_port, metrics_port=metrics_port,
                      openai_port=None if no_openai else openai_port,
                      served_model_name=served_model_name, log_file=log_file or "-",
                      log_verbose=log_verbose, ready_timeout_s=ready_timeout,
                      drain_timeout_s=drain_timeout, restart=restart)
    try:
        code = Launcher(cfg).run()
    except (TritonNotFound, ServerError, RuntimeError) as e:
        raise click.ClickException(str(e)) from None
    if code != 0:
        raise click.ClickException("tritonserver did not stop cleanly")
