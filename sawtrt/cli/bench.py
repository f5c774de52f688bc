"""`sawtrt bench ...`: benchmarks (a Click group; `kernels` here, more subcommands may join)."""
from __future__ import annotations

import json

import click

from . import positive_ints


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


# `sawtrt bench serve`: the serving load generator lives with the serving CLI.
from .bench_serve import bench_serve as _bench_serve  # noqa: E402

bench.add_command(_bench_serve, "serve")
