"""`sawtrt bench serve`: load-test a sawtrt Triton server (see sawtrt/serving/bench.py)."""
import json
import sys
import threading
import time

import click

from . import positive_ints


class _Progress:
    """Prints 'k/N done' to stderr about 20 times per level."""

    def __init__(self, total):
        self.total, self.done, self.every = total, 0, max(1, total // 20)
        self.lock = threading.Lock()
        self.t0 = time.perf_counter()

    def __call__(self, n):
        with self.lock:
            self.done += n
            if self.done % self.every == 0 or self.done == self.total:
                click.echo(f"  {self.done}/{self.total} done "
                           f"({time.perf_counter() - self.t0:.0f} s)", err=True)


@click.command("serve")
@click.option("--url", default=None, help="Triton gRPC HOST:PORT of a running server.")
@click.option("--engine", "engine_dir", type=click.Path(exists=True, file_okay=False), default=None,
              help="Instead of --url: start a local tritonserver for this engine, stop it after.")
@click.option("--model", default="sawtrt", show_default=True)
@click.option("--concurrency", default="1,4,16", show_default=True,
              help="Comma-separated numbers of simultaneous users, one level each.")
@click.option("--num-requests", type=click.IntRange(min=1), default=None,
              help="Requests per level [default: 4 x concurrency, at least 8].")
@click.option("--prompt-len", default=128, show_default=True, type=click.IntRange(min=1),
              help="Prompt length in words (~tokens).")
@click.option("--output-len", default=64, show_default=True, type=click.IntRange(min=1),
              help="Output tokens per request (EOS ignored).")
@click.option("--num-gpus", default=1, show_default=True, type=click.IntRange(min=1),
              help="GPUs behind the endpoint, for tok/s per GPU.")
@click.option("--timeout", default=600.0, show_default=True, type=float,
              help="Seconds per request before it counts as lost.")
@click.option("--warmup", default=1, show_default=True, type=click.IntRange(min=0),
              help="Requests sent (and not counted) before the first level.")
@click.option("--device", default="", help="With --engine: the engine device.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None,
              help="Also write every level's numbers here as JSON ('-' for stdout).")
def bench_serve(url, engine_dir, model, concurrency, num_requests, prompt_len, output_len,
                num_gpus, timeout, warmup, device, json_path):
    """Closed-loop load test: TTFT, inter-token latency, output tok/s per user and per GPU."""
    from ..serving.bench import LevelConfig, format_table, make_prompt, run_level
    from ..serving.client import generate

    levels = positive_ints(concurrency, "concurrency levels")
    if (url is None) == (engine_dir is None):
        raise click.UsageError("give exactly one of --url and --engine")
    from ..serving.server import ServerError, TritonNotFound, TritonServer
    server = None
    try:
        if engine_dir is not None:
            from ..serving.triton_repo import write_model_repository
            repo = write_model_repository(engine_dir, device=device)
            server = TritonServer(repo).start()
            click.echo(f"bench serve: started tritonserver on {server.grpc_url}", err=True)
            server.wait_ready(600, model=model)
            url = server.grpc_url
        for i in range(warmup):
            generate(url, make_prompt(prompt_len, 10_000 + i), output_len, model=model,
                     timeout=timeout, ignore_eos=True).check()
        results = []
        for c in levels:
            cfg = LevelConfig(concurrency=c, num_requests=num_requests or max(8, 4 * c),
                              prompt_len=prompt_len, output_len=output_len, timeout_s=timeout)
            click.echo(f"bench serve: concurrency {c}, {cfg.num_requests} requests ...", err=True)
            results.append(run_level(url, cfg, model=model, num_gpus=num_gpus,
                                     progress=_Progress(cfg.num_requests)))
    except (TritonNotFound, ServerError) as e:
        raise click.ClickException(str(e)) from None
    finally:
        if server is not None:
            server.stop()
    record = {"url": url, "model": model, "prompt_len_words": prompt_len,
              "output_len": output_len, "num_gpus": num_gpus, "levels": results}
    if json_path == "-":
        json.dump(record, sys.stdout, indent=1)
        click.echo()
    else:
        click.echo(format_table(results))
        if json_path:
            with open(json_path, "w") as f:
                json.dump(record, f, indent=1)
            click.echo(f"wrote {json_path}", err=True)
    if any(lv["lost"] for lv in results):
        raise click.ClickException(f"{sum(lv['lost'] for lv in results)} request(s) lost")
