"""`sawtrt rank-layers`: which layers' KV pages cost the most under a policy, and the policy with
the top N kept wider (sawtrt.calibration.layer_rank)."""
from __future__ import annotations

import json
import sys
import time

import click

DEFAULT_POLICY = "int4-bdr:h=64,kv,center,whiten"


def _tokenizer(name: str):
    """The transformers tokenizer `sawtrt eval` uses for the model (its cached copy when there
    is one: loading the whole transformers model only to tokenize costs seconds)."""
    from ..eval.hf_models import cache_root, load
    local = cache_root() / name
    if (local / "tokenizer_config.json").is_file():
        from transformers import AutoTokenizer
        return AutoTokenizer.from_pretrained(local)
    return load(name)[1]


@click.command("rank-layers")
@click.option("--model", required=True, help="packaged model on the runtime path: smollm2-135m")
@click.option("--policy", default=DEFAULT_POLICY, show_default=True, metavar="POLICY",
              help="KV policy whose pages each layer gets in turn (no per-layer pages).")
@click.option("--top", default=3, show_default=True, type=int,
              help="layers the suggested policy keeps wider (int8; bf16 for an int8 policy)")
@click.option("--json", "json_path", type=click.Path(dir_okay=False),
              help="write the ranking and the suggestion here")
@click.option("--threads", type=int, default=None, help="torch CPU threads")
def rank_layers_cmd(model, policy, top, json_path, threads):
    """Rank the layers by the damage their KV pages in POLICY do on their own.

    Per layer l: the model (sawtrt's CausalLM, fp32 on the CPU) with only layer l in POLICY and
    every other layer bf16, against the all-bf16 model: mean KL divergence of the next-token
    distributions over the K calibration's text (2 windows of 512 tokens + BOS), and the NLL
    increase. Weights, tokenizer and K calibration as in `sawtrt eval` (docs/accuracy.md,
    "Wider pages for the most sensitive layers"). Prints the table and the policy with the TOP
    layers wider, for `sawtrt build --kv-cache` (or let `sawtrt build --rank-layers N` rank on
    the engine's own weights).
    """
    import torch

    from ..calibration import layer_rank
    from ..eval.runtime_path import RUNTIME_MODELS, RuntimeModel
    from ..models import kv_transform as kvt
    from ..spec import KVPolicy, PolicyError
    if model not in RUNTIME_MODELS:
        raise click.BadParameter(f"{model!r}: the runtime path has {', '.join(RUNTIME_MODELS)}",
                                 param_hint="--model")
    try:
        pol = KVPolicy.parse(policy)
    except PolicyError as e:
        raise click.BadParameter(str(e), param_hint="--policy") from None
    if pol.mixed:
        raise click.BadParameter(f"{pol} already names per-layer pages; give its base policy "
                                 f"{pol.base}", param_hint="--policy")
    if not pol.quantized:
        raise click.BadParameter(f"{pol} pages are the reference: nothing to rank",
                                 param_hint="--policy")
    if threads:
        torch.set_num_threads(threads)
    t0 = time.time()
    tok = _tokenizer(model)
    rt = RuntimeModel(model, tokenizer=tok)
    spec = rt.spec
    if not 0 <= top < spec.num_layers:
        raise click.BadParameter(f"{top}: choose 0..{spec.num_layers - 1} ({model} has "
                                 f"{spec.num_layers} layers)", param_hint="--top")
    ids, meta = kvt.calibration_ids(lambda t: tok(t, add_special_tokens=False).input_ids)
    windows = kvt.calibration_windows(ids, tok.bos_token_id)
    calibration = rt.calibration() if pol.transforms_k else None
    click.echo(f"{model}: {spec.num_layers} layers, {pol} one layer at a time, others bf16; "
               f"text {meta['source']} ({meta['origin']}), {len(windows)} windows, "
               f"{sum(len(w) - 1 for w in windows)} scored tokens", err=True)
    with click.progressbar(length=layer_rank.layer_passes(spec.num_layers, len(windows)),
                           label="rank layers", file=sys.stderr) as bar:
        ranking = layer_rank.rank_layers(spec, rt.weights, windows, pol, calibration,
                                         progress=lambda done, total: bar.update(done - bar.pos))
    seconds = time.time() - t0
    kind = layer_rank.wide_kind(pol)
    suggested = layer_rank.suggest_policy(pol, ranking, top, kind)
    chosen = layer_rank.top_layers(ranking, top)
    click.echo(layer_rank.format_ranking(ranking, top))
    if chosen:
        click.echo(f"top {top} in {kind}: layers {', '.join(map(str, chosen))} "
                   f"({100 * sum(ranking[i]['share'] for i in chosen):.1f} % of the summed KL)")
    click.echo(f"suggested KV policy: {suggested}")
    click.echo(f"  sawtrt build --model {model} --kv-cache '{suggested}'")
    click.echo(f"({seconds:.0f} s, {torch.get_num_threads()} threads)", err=True)
    if json_path:
        with open(json_path, "w") as f:
            json.dump({"model": model, "policy": str(pol), "text": meta,
                       "windows": len(windows), "tokens": sum(len(w) - 1 for w in windows),
                       "per_layer": ranking,
                       "rank_by_kl": layer_rank.top_layers(ranking, spec.num_layers),
                       "top": top, "kind": kind, "suggested_policy": str(suggested),
                       "seconds": round(seconds, 1), "threads": torch.get_num_threads()},
                      f, indent=1)
        click.echo(f"wrote {json_path}", err=True)
