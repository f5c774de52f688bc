"""`sawtrt bench serve`: load-test a sawtrt Triton server (see sawtrt/bench/serve.py)."""
import json
import sys
import threading
import time

import click

from . import engine_options, positive_ints


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


def _write(record, path):
    with open(path, "w") as f:
        json.dump(record, f, indent=1)


@click.command("serve")
@click.option("--url", default=None, help="Triton gRPC HOST:PORT of a running server.")
@click.option("--engine", "engine_dir", type=click.Path(exists=True, file_okay=False), default=None,
              help="Instead of --url: start a local tritonserver for this engine, stop it after.")
@click.option("--model", default="sawtrt", show_default=True)
@click.option("--concurrency", default="1,4,16", show_default=True,
              help="Comma-separated numbers of simultaneous users, one level each.")
@click.option("--num-requests", type=click.IntRange(min=1), default=None,
              help="Requests per level [default: --requests-per-user x concurrency].")
@click.option("--requests-per-user", type=click.IntRange(min=1), default=None,
              help="Requests per level = this x concurrency (1: one wave, as `bench "
                   "throughput` does by default) [default: 4, at least 8 requests].")
@click.option("--prompt-len", default=128, show_default=True, type=click.IntRange(min=1),
              help="Prompt length: tokens of the engine's tokenizer with --engine or "
                   "--tokenizer, else words (~tokens for BPE).")
@click.option("--tokenizer", "tokenizer_dir", type=click.Path(exists=True, file_okay=False),
              default=None, help="With --url: the served engine's directory, to size prompts "
                                 "in its tokens.")
@click.option("--output-len", default=64, show_default=True, type=click.IntRange(min=1),
              help="Output tokens per request (EOS ignored).")
@click.option("--num-gpus", default=1, show_default=True, type=click.IntRange(min=1),
              help="GPUs behind the endpoint, for tok/s per GPU.")
@click.option("--timeout", default=600.0, show_default=True, type=float,
              help="Seconds per request before it counts as lost.")
@click.option("--warmup", default=1, show_default=True, type=click.IntRange(min=0),
              help="Requests sent (and not counted) before the first level.")
@click.option("--device", default="", help="With --engine: the engine device.")
@click.option("--server-log", type=click.Path(dir_okay=False), default=None,
              help="With --engine: append the server's log here [default: discarded].")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None,
              help="Also write every level's numbers here as JSON ('-' for stdout).")
@engine_options
def bench_serve(url, engine_dir, model, concurrency, num_requests, requests_per_user,
                prompt_len, tokenizer_dir,
                output_len, num_gpus, timeout, warmup, device, server_log, json_path,
                engine_options):
    """Closed-loop load test: TTFT, inter-token latency, output tok/s per user and per GPU."""
    from ..bench.serve import LevelConfig, format_table, make_prompt, run_level
    from ..serving.client import generate

    levels = positive_ints(concurrency, "concurrency levels")
    if (url is None) == (engine_dir is None):
        raise click.UsageError("give exactly one of --url and --engine")
    from ..serving.server import ServerError, TritonNotFound, TritonServer
    tokenizer = None
    server = None

    def record(results):
        return {"url": url, "model": model, "engine": engine_dir, "prompt_len_words": prompt_len,
                "prompt_unit": "words" if tokenizer is None else "tokens",
                "output_len": output_len, "num_gpus": num_gpus,
                "engine_options": engine_options.to_params() if engine_dir else None,
                "levels": results}

    try:
        if engine_dir is not None:
            from ..serving.triton_repo import write_model_repository
            repo = write_model_repository(engine_dir, device=device, options=engine_options)
            server = TritonServer(repo, log_file=server_log).start()
            click.echo(f"bench serve: started tritonserver on {server.grpc_url}", err=True)
            server.wait_ready(600, model=model)
            url = server.grpc_url
        if tokenizer_dir or engine_dir:
            from ..models.tokenizer import load as load_tokenizer
            try:
                tokenizer = load_tokenizer(tokenizer_dir or engine_dir)
            except (OSError, ValueError, KeyError) as e:
                raise click.ClickException(f"cannot load the tokenizer of "
                                           f"{tokenizer_dir or engine_dir}: {e}") from None
        for i in range(warmup):
            r = generate(url, make_prompt(prompt_len, 10_000 + i, tokenizer), output_len,
                         model=model, timeout=timeout, ignore_eos=True)
            if r.error is not None:
                raise click.ClickException(f"warm-up request failed: {r.error}")
        results = []
        for c in levels:
            n = num_requests or (requests_per_user * c if requests_per_user else max(8, 4 * c))
            cfg = LevelConfig(concurrency=c, num_requests=n,
                              prompt_len=prompt_len, output_len=output_len, timeout_s=timeout,
                              tokenizer=tokenizer)
            click.echo(f"bench serve: concurrency {c}, {cfg.num_requests} requests ...", err=True)
            results.append(run_level(url, cfg, model=model, num_gpus=num_gpus,
                                     progress=_Progress(cfg.num_requests)))
            if json_path and json_path != "-":     # levels done so far survive a cut-off run
                _write(record(results), json_path)
    except (TritonNotFound, ServerError) as e:
        raise click.ClickException(str(e)) from None
    finally:
        if server is not None:
            server.stop()
    if json_path == "-":
        json.dump(record(results), sys.stdout, indent=1)
        click.echo()
    else:
        click.echo(format_table(results))
        if json_path:
            _write(record(results), json_path)
            click.echo(f"wrote {json_path}", err=True)
    if any(lv["lost"] for lv in results):
        raise click.ClickException(f"{sum(lv['lost'] for lv in results)} request(s) lost")
