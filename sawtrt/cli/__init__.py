"""`sawtrt` command line: a thin Click layer over the Python API.

Each command lives in its own module here and is listed in COMMANDS with its one-line help;
modules are imported only when their command runs, so `sawtrt --help` imports no command module
(and no torch: it answers at once) and `sawtrt kv-plan` does not pay for the runtime or the server.
"""
from __future__ import annotations

import functools
import importlib

import click

# command name -> ("module:attribute" relative to this package, the command's one-line help as
# `sawtrt --help` lists it; tests/test_cli_errors.py checks it against the command's own)
COMMANDS = {
    "kv-plan": ("kv_plan:kv_plan",
                "Bytes per token, tokens and concurrent sequences that fit, per KV policy."),
    "bench": ("bench:bench", "Benchmarks on the local GPU."),
    "build": ("build:build",
              "Validate inputs, convert weights, compile kernels, write an engine directory."),
    "generate": ("generate:generate", "Generate text from PROMPTS with an engine directory."),
    "serve": ("serve:serve",
              "Serve an engine with a real tritonserver (Python backend, gRPC streaming) and an "
              "OpenAI-compatible API in front of it."),
    "client": ("client:client",
               "Send PROMPT to a sawtrt Triton server over gRPC and stream the reply to stdout."),
    "eval": ("eval:eval_cmd",
             "Teacher-forced perplexity on real text with the KV cache in each policy."),
    "rank-layers": ("rank_layers:rank_layers_cmd",
                    "Rank the layers by the damage their KV pages in POLICY do on their own."),
}


def positive_ints(text: str, what: str) -> list[int]:
    """'1,4,16' -> [1, 4, 16]; click.BadParameter naming `what` for anything else."""
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise click.BadParameter(f"{what}: expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise click.BadParameter(f"{what} must be >= 1")
    return values


def kv_memory_gib_option(default: str):
    """--kv-memory-gib, the same for every command that sizes a KV pool; `default` describes
    what the command does without it."""
    return click.option("--kv-memory-gib", type=click.FloatRange(min=0, min_open=True),
                        default=None, help=f"KV pool budget in GiB [default: {default}].")


def engine_options(f):
    """--kv-cache / --kv-memory-gib / --max-num-batched-tokens / --max-num-seqs / --prefill-kv /
    --scheduling for commands that start an engine inside tritonserver; the command gets them
    as one `engine_options` (sawtrt.engine.options.EngineOptions) argument."""
    def make(ctx, kv_cache, kv_memory_gib, max_num_batched_tokens, max_num_seqs, prefill_kv,
             scheduling):
        from ..engine.options import SCHEDULING, EngineOptions
        if kv_cache:
            from ..spec import KVPolicy
            try:
                KVPolicy.parse(kv_cache)
            except ValueError as e:
                raise click.BadParameter(str(e), ctx=ctx, param_hint="--kv-cache") from None
        return EngineOptions(kv_policy=kv_cache or None, kv_memory_gib=kv_memory_gib,
                             max_num_batched_tokens=max_num_batched_tokens,
                             max_num_seqs=max_num_seqs, prefill_kv=prefill_kv,
                             async_scheduling=SCHEDULING[scheduling or "auto"])

    @functools.wraps(f)
    def wrapper(*args, kv_cache, kv_memory_gib, max_num_batched_tokens, max_num_seqs,
                prefill_kv, scheduling, **kw):
        ctx = click.get_current_context()
        return f(*args, engine_options=make(ctx, kv_cache, kv_memory_gib, max_num_batched_tokens,
                                            max_num_seqs, prefill_kv, scheduling), **kw)
    for opt in reversed((
            click.option("--kv-cache", default=None, metavar="POLICY",
                         help="Override the engine's KV policy (e.g. bf16, int4, int4-bdr:h=32); "
                              "the weights do not depend on it [default: the engine's]."),
            kv_memory_gib_option("the engine's: a fixed fraction of the free GPU memory at "
                                 "load, 1 GiB on CPU"),
            click.option("--max-num-batched-tokens", type=click.IntRange(min=1), default=None,
                         help="Token budget of one engine step [default: the engine's]."),
            click.option("--max-num-seqs", type=click.IntRange(min=1), default=None,
                         help="Running sequences at most [default: the engine's --max-batch]."),
            click.option("--prefill-kv", type=click.Choice(["auto", "fresh", "cache"]),
                         default=None,
                         help="What prompt tokens attend to: their own K/V at dense speed "
                              "(fresh) or the quantized cache (cache) [default: auto, fresh "
                              "where the compiled kernels serve every layer]."),
            click.option("--scheduling", type=click.Choice(["auto", "async", "sync"]),
                         default=None,
                         help="async: schedule and prepare step N+1 while the GPU runs step N "
                              "[default: auto, async on CUDA, sync on CPU]."))):
        wrapper = opt(wrapper)
    return wrapper


class LazyGroup(click.Group):
    def list_commands(self, ctx):
        return sorted(COMMANDS)

    def get_command(self, ctx, name):
        if name not in COMMANDS:
            return None
        module, attr = COMMANDS[name][0].split(":")
        return getattr(importlib.import_module(f"{__name__}.{module}"), attr)

    def format_commands(self, ctx, formatter):
        """The command list from COMMANDS' help lines: importing every command module to ask
        it would import torch (3+ s) for a --help."""
        rows = [(name, COMMANDS[name][1]) for name in self.list_commands(ctx)]
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


@click.group(cls=LazyGroup)
@click.version_option(package_name="sawtrt")
def main():
    """sawtrt: SAW-INT4 (block-diagonal Hadamard + token-wise INT4) KV cache for TensorRT serving."""


if __name__ == "__main__":
    main()
