import click

from ..spec import DEFAULT_PAGE_SIZE, KINDS, PAGE_SIZES


@click.command("build")
@click.option("--model", required=True,
              help="Model name (qwen3-0.6b/1.7b/4b/8b, smollm2-135m) or a name for --checkpoint.")
@click.option("--checkpoint", type=click.Path(), default=None,
              help="HF safetensors directory (with config.json, tokenizer.json) or a .gguf file.")
@click.option("--random-weights", is_flag=True,
              help="Random weights of the real shapes (speed work); regenerated at load.")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of --random-weights.")
@click.option("--kv-cache", default="int4-bdr", show_default=True, metavar="POLICY",
              help=f"KV policy: one of {', '.join(KINDS)}, optionally with options, e.g. "
                   "int4-bdr:h=32,kv,seed=3 or int4-bdr:h=64,kv,center,whiten (K centring and "
                   "Q/K balance/whitening: center, balance=A, whiten; calibrated at build "
                   "time; docs/accuracy.md).")
@click.option("--rotation-block", type=int, default=None, metavar="H",
              help="Alias of the policy option h=H (int4-bdr BDR block; default min(128, "
                   "head_dim)).")
@click.option("--rotate", type=click.Choice(["k", "kv"]), default=None,
              help="Alias of the policy option k / kv (int4-bdr: rotate K only, the default, "
                   "or K and V).")
@click.option("--sign-seed", type=int, default=None, metavar="SEED",
              help="Alias of the policy option seed=SEED (int4-bdr: random +-1 signs).")
@click.option("--page-size", default=DEFAULT_PAGE_SIZE, show_default=True,
              type=click.Choice([str(p) for p in PAGE_SIZES]))
@click.option("--max-batch", default=32, show_default=True, type=int,
              help="Most sequences decoded together.")
@click.option("--max-seq-len", default=None, type=int,
              help="Prompt + output tokens per sequence [default: min(4096, model context)].")
@click.option("--gpu-arch", multiple=True,
              help="Compute capability to compile the kernel library for (repeatable, e.g. 90 "
                   "or sm_90a). Default: the local GPU's; none when there is no GPU (the CPU "
                   "runtime does not use the library).")
@click.option("--no-kernels", is_flag=True, help="Do not compile the kernel library.")
@click.option("--output", default=None, type=click.Path(),
              help="Engine directory [default: engines/<model>-<kv kind>].")
@click.option("--rank-layers", type=int, default=None, metavar="N",
              help="Rank the layers by how much their KV pages in the --kv-cache policy cost "
                   "(KL vs bf16 on the calibration text; `sawtrt rank-layers`) and store the "
                   "top N in int8 (bf16 for an int8 cache). Needs real weights; the ranking is "
                   "recorded in config.json.")
def build(model, checkpoint, random_weights, seed, kv_cache, rotation_block, rotate, sign_seed,
          page_size, max_batch, max_seq_len, gpu_arch, no_kernels, output, rank_layers):
    """Validate inputs, convert weights, compile kernels, write an engine directory."""
    from ..build import BuildError, BuildOptions, build_engine
    kv_cache = _with_aliases(kv_cache, rotation_block, rotate, sign_seed)
    opts = BuildOptions(model=model, checkpoint=checkpoint, random_weights=random_weights,
                        seed=seed, kv_cache=kv_cache, page_size=int(page_size),
                        max_batch=max_batch, max_seq_len=max_seq_len,
                        gpu_arch=tuple(gpu_arch) or None, output=output,
                        compile_kernels=not no_kernels, rank_layers=rank_layers)
    try:
        out = build_engine(opts)
    except BuildError as e:
        raise click.UsageError(str(e)) from None
    click.echo(str(out))


def _with_aliases(kv_cache: str, rotation_block, rotate, sign_seed) -> str:
    """The policy string with the alias flags appended as its own options (h=, k/kv, seed=), so
    KVPolicy.parse reads one string: an option given both ways is an error there."""
    opts = ([f"h={rotation_block}"] if rotation_block is not None else []) + \
           ([rotate] if rotate is not None else []) + \
           ([f"seed={sign_seed}"] if sign_seed is not None else [])
    if not opts:
        return kv_cache
    return kv_cache + ("," if ":" in kv_cache else ":") + ",".join(opts)
