"""Build step: the K calibration (kv_calibration.safetensors) behind the policy's `center` /
`balance` / `whiten` (sawtrt.models.kv_transform)."""
from __future__ import annotations

from pathlib import Path

from ..models import kv_transform as kvt
from ..models import tokenizer as tokenizers
from ..models.specs import ModelSpec
from .plan import BuildPlan
from .state import BuildState

_META = ("source", "origin", "text_sha256", "tokens", "note")


def calibration_text_windows(spec: ModelSpec, out: Path) -> tuple[list[list[int]], dict]:
    """The calibration text ('calib') in the engine tokenizer's ids, cut into the K
    calibration's windows (BOS in front of each), and its description."""
    tok = tokenizers.load(out)
    ids, meta = kvt.calibration_ids(tok.encode)
    bos = spec.bos_token_id if spec.bos_token_id is not None else tok.bos_token_id
    if getattr(tok, "add_bos", False) and ids[:1] == [bos]:
        ids = ids[1:]
    return kvt.calibration_windows(ids, bos), meta


def run(plan: BuildPlan, out: Path, state: BuildState, weights_info: dict, tok_info: dict,
        log) -> dict:
    """Write kv_calibration.safetensors when the policy transforms K; returns its config entry.

    Real weights: the model's own q/K statistics over the 'calib' text (kv_transform.calibrate,
    fp32 on CPU; ~10 s for SmolLM2-135M). Random weights: the identity (mu = 0, s = 1, A = I):
    random K has no structure worth calibrating, and the qwen3-4b benchmark build stays
    instant; the transform still runs, so the served cost is measured."""
    path = out / kvt.CALIBRATION_FILE
    if not plan.layout.policy.transforms_k:
        if path.exists():
            path.unlink()
        state.forget("kv_calibration")
        return {}
    moments = plan.layout.policy.k_whiten          # whiten also needs the D x D moments
    weights_sha = weights_info.get("sha256", "random")
    inputs = {"version": kvt.CALIBRATION_VERSION, "weights_sha256": weights_sha,
              "tokenizer": tok_info.get("sha256"), "moments": moments}
    done = state.current("kv_calibration", inputs)
    if done is not None:
        log(f"K calibration: up to date ({path})")
        return done
    if weights_info["format"] == "random":
        cal = kvt.KVCalibration.identity(plan.spec, "random weights: mu = 0, s = 1, A = I")
    else:
        from safetensors.torch import load_file
        windows, meta = calibration_text_windows(plan.spec, out)
        weights = load_file(str(out / weights_info["file"]))
        cal = kvt.calibrate(plan.spec, weights, windows, meta)
    digest = cal.save(path, moments=moments)
    log(f"K calibration: wrote {path} ({cal.meta.get('source')}, "
        f"{cal.meta.get('tokens', 0)} tokens)")
    result = {"file": kvt.CALIBRATION_FILE, "sha256": digest, "version": kvt.CALIBRATION_VERSION,
              "weights_sha256": weights_sha, **({"moments": True} if moments else {}),
              **{k: v for k, v in cal.meta.items() if k in _META}}
    state.record("kv_calibration", inputs, [kvt.CALIBRATION_FILE], result)
    return result
