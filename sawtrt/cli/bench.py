"""`sawtrt bench ...`: benchmarks (a Click group; `kernels` here, more subcommands may join)."""
from __future__ import annotations

import json
import sys

import click

from . import kv_memory_gib_option, positive_ints


@click.group()
def bench():
    """Benchmarks on the local GPU."""


@bench.command()
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None,
              help="Write all rows (times, bytes, TB/s, fraction of copy bandwidth) here.")
@click.option("--shapes", default="qwen3-4b,d64,d256", show_default=True,
              help="Comma-separated: qwen3-4b (32/8 heads, D=128), d64 (32/8, D=64), "
                   "d256 (16/4, D=256).")
@click.option("--batches", default="1,8,32,128", show_default=True)
@click.option("--contexts", default="1024,4096,16384,32768", show_default=True)
@click.option("--page-size", default=64, show_default=True, type=click.Choice(["16", "32", "64", "128"]))
@click.option("--reps", default=20, show_default=True, help="Timed launches per point (median).")
@click.option("--max-tokens", default=128 * 32768, show_default=True,
              help="Skip points with batch x context above this (memory).")
@click.option("--lib", "lib_path", default=None, help="Kernel library (default: build/).")
def kernels(json_path, shapes, batches, contexts, page_size, reps, max_tokens, lib_path):
    """Decode attention: our bf16 / int4 / int4-bdr kernels vs BF16 SDPA (cuDNN, flash)."""
    from ..bench import kernels as kb
    shape_list = [s.strip() for s in shapes.split(",") if s.strip()]
    unknown = [s for s in shape_list if s not in kb.SHAPES]
    if unknown:
        raise click.BadParameter(f"unknown shapes {unknown}; choose from {sorted(kb.SHAPES)}")
    batch_list, context_list = positive_ints(batches, "batches"), positive_ints(contexts, "contexts")
    click.echo(kb.HEADER)
    result = kb.run(shapes=shape_list, batches=batch_list, contexts=context_list,
                    page_size=int(page_size),
                    reps=reps, max_tokens=max_tokens, lib_path=lib_path, log=click.echo)
    if json_path:
        with open(json_path, "w") as f:
            json.dump(result, f, indent=1)
        click.echo(f"wrote {json_path}")


@bench.command()
@click.option("--engine", "engine_dir", required=True, type=click.Path(exists=True, file_okay=False),
              help="Engine directory (e.g. `sawtrt build --model qwen3-4b --random-weights`).")
@click.option("--policies", default="bf16,int4,int4-bdr", show_default=True,
              help="KV policies to compare, comma-separated (options with ':' as in kv-plan).")
@click.option("--concurrency", default="1,8,16,32,64,128,256", show_default=True,
              help="Users in closed loop, one level each.")
@click.option("--num-requests", type=click.IntRange(min=1), default=None,
              help="Requests per level [default: one per user, i.e. one wave; 3-4 per user "
                   "approach the steady state].")
@click.option("--prompt-len", default=8192, show_default=True, type=click.IntRange(min=1),
              help="Prompt tokens (random ids).")
@click.option("--output-len", default=1024, show_default=True, type=click.IntRange(min=1),
              help="Output tokens per request (EOS ignored).")
@kv_memory_gib_option("80 % of the free GPU memory minus the bf16 weights, measured once at "
                      "start; the same for every policy")
@click.option("--max-num-batched-tokens", default=8192, show_default=True,
              type=click.IntRange(min=1), help="Token budget of one step (chunked prefill).")
@click.option("--device", default=None, help="Torch device (default: cuda when available).")
@click.option("--tensor-tflops", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Matmul rate of the roofline in TFLOP/s [default: 790, the H200's measured "
                   "bf16 dense rate, on CUDA; a measured fp32 matmul on CPU]. The copy "
                   "bandwidth is measured at start.")
@click.option("--scheduling", default="auto", show_default=True,
              help="auto (async on CUDA, sync on CPU), async (schedule step N+1 while the GPU "
                   "runs step N), sync, or a comma list (async,sync) to compare in one process.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None,
              help="Write every level's numbers here.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), default=None,
              help="PNG of tok/s per GPU, tok/s per user and TTFT vs concurrency.")
def throughput(engine_dir, policies, concurrency, num_requests, prompt_len, output_len,
               kv_memory_gib, max_num_batched_tokens, device, tensor_tflops, scheduling,
               json_path, plot_path):
    """Engine-only serving throughput (Python API, no server): bf16 vs int4 vs int4-bdr, each
    level beside its roofline (weights + KV bytes at the copy bandwidth, prompt FLOPs at the
    matmul rate) and the fraction of it reached."""
    from ..bench import throughput as tp
    from ..spec import split_policy_list
    levels = [tp.Level(c, num_requests or c, prompt_len, output_len)
              for c in positive_ints(concurrency, "concurrency levels")]
    pols = split_policy_list(policies)
    modes = tuple(m.strip() for m in scheduling.split(",") if m.strip())
    bad = [m for m in modes if m not in tp.SCHEDULING]
    if bad or not modes:
        raise click.BadParameter(f"{scheduling!r}: use auto, async, sync or a comma list",
                                 param_hint="--scheduling")
    if kv_memory_gib is None:
        kv_memory_gib = tp.default_kv_gib(engine_dir, device)
    click.echo(f"bench throughput: {len(pols)} policies x {len(levels)} levels, prompt "
               f"{prompt_len} / output {output_len} tokens, KV budget {kv_memory_gib:.1f} GiB",
               err=True)
    record = tp.run(engine_dir, pols, levels, kv_memory_gib, max_num_batched_tokens, device,
                    log=lambda m: click.echo(m, err=True), progress=_progress,
                    checkpoint=(lambda r: _write_json(r, json_path)) if json_path else None,
                    tflops=tensor_tflops, scheduling=modes)
    click.echo(tp.format_table(record))
    _write_outputs(record, json_path, plot_path)


@bench.command("plot-throughput")
@click.argument("records", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None,
              help="Write the merged record here.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), default=None)
def plot_throughput(records, json_path, plot_path):
    """Merge `bench throughput --json` records (e.g. one per device run): table, JSON, PNG."""
    from ..bench import throughput as tp
    try:
        loaded = []
        for p in records:
            with open(p) as f:
                loaded.append(json.load(f))
        record = tp.merge(loaded)
    except (ValueError, KeyError, json.JSONDecodeError) as e:
        raise click.ClickException(f"cannot merge: {e}") from None
    click.echo(tp.format_table(record))
    _write_outputs(record, json_path, plot_path)


def _progress(policy, level):
    bar = click.progressbar(length=level.num_requests, file=sys.stderr,
                            label=f"{policy} c={level.concurrency}")
    bar.__enter__()

    def step(n):
        bar.update(n)
        if bar.pos >= bar.length:
            bar.__exit__(None, None, None)
    return step


def _write_json(record, path):
    with open(path, "w") as f:
        json.dump(record, f, indent=1)


def _write_outputs(record, json_path, plot_path):
    from ..bench import throughput as tp
    if json_path:
        _write_json(record, json_path)
        click.echo(f"wrote {json_path}", err=True)
    if plot_path:
        tp.plot(record, plot_path)
        click.echo(f"wrote {plot_path}", err=True)


# `sawtrt bench serve`: the serving load generator lives with the serving CLI.
from .bench_serve import bench_serve as _bench_serve  # noqa: E402

bench.add_command(_bench_serve, "serve")
