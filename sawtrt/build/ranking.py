"""Build step: per-layer sensitivity ranking (sawtrt.calibration.layer_rank) and the policy
with the top N layers in wider pages."""
from __future__ import annotations

from pathlib import Path

from ..calibration import layer_rank
from ..models import kv_transform as kvt
from ..spec import KVPolicy
from .calibration import calibration_text_windows
from .plan import BuildPlan
from .state import BuildState

LAYER_RANK_VERSION = 1     # bump when layer_rank's measurement changes: engines re-rank


def run(plan: BuildPlan, out: Path, state: BuildState, weights_info: dict,
        kv_calibration: dict, n: int, log, progress: bool) -> tuple[KVPolicy, dict]:
    """Rank the layers on the calibration text with the engine's own weights, tokenizer and K
    calibration, and widen the top n. Returns (the policy with the top n wide, the config
    record). The per-layer KL is reused while its inputs (weights, base policy, K calibration,
    text, recipe) are unchanged, so a new n costs nothing."""
    base = plan.layout.policy
    windows, meta = calibration_text_windows(plan.spec, out)
    key = {"version": LAYER_RANK_VERSION, "base_policy": str(base),
           "weights_sha256": weights_info.get("sha256"),
           "kv_calibration_sha256": kv_calibration.get("sha256"),
           "source": meta["source"], "text_sha256": meta["text_sha256"],
           "tokens": sum(len(w) - 1 for w in windows), "windows": len(windows)}
    ranking = state.current("layer_rank", key)
    if ranking is not None:
        log("layer rank: up to date")
    else:
        ranking = _rank(plan, out, base, windows, weights_info, kv_calibration, progress)
        log(f"layer rank: {plan.spec.num_layers} layers on {key['tokens']} tokens of the "
            f"{meta['source']} text; most sensitive first: "
            + ", ".join(str(i) for i in layer_rank.top_layers(ranking, 5)))
        state.record("layer_rank", key, [], ranking)
    kind = layer_rank.wide_kind(base)
    policy = layer_rank.suggest_policy(base, ranking, n, kind)
    top = layer_rank.top_layers(ranking, n)
    if top:
        log(f"layer rank: {kind} pages for layers {', '.join(map(str, top))} "
            f"({100 * sum(ranking[i]['share'] for i in top):.0f} % of the summed KL)")
    return policy, {**key, "top": n, "kind": kind, "layers": top,
                    "kl": [r["kl"] for r in ranking], "dnll": [r["dnll"] for r in ranking],
                    "share": [r["share"] for r in ranking], "rank": [r["rank"] for r in ranking]}


def _rank(plan, out, base, windows, weights_info, kv_calibration, progress) -> list[dict]:
    from safetensors.torch import load_file
    weights = load_file(str(out / weights_info["file"]))
    cal = kvt.KVCalibration.load(out / kvt.CALIBRATION_FILE, plan.spec,
                                 kv_calibration["sha256"]) if base.transforms_k else None
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=layer_rank.layer_passes(plan.spec.num_layers, len(windows)),
                   desc="rank layers", unit="layer")
    try:
        ranking = layer_rank.rank_layers(
            plan.spec, weights, windows, base, cal,
            progress=(lambda done, total: bar.update(done - bar.n)) if bar else None)
    finally:
        if bar is not None:
            bar.close()
    return [{k: r[k] for k in ("layer", "kl", "dnll", "share", "rank")} for r in ranking]
