"""`build_engine`: validate, then run the steps in order, each skipped when up to date."""
from __future__ import annotations

import sys
from pathlib import Path

from ..engine.config import EngineConfig
from ..spec import PageLayout
from . import calibration, kernels, ranking, triton_repo, trt_plan, weights
from .plan import MARKER, BuildOptions, plan_build
from .state import BuildState


def _log(msg: str) -> None:
    print(f"sawtrt build: {msg}", file=sys.stderr)


def build_engine(options: BuildOptions, log=_log, progress: bool = True) -> Path:
    """Validate, then write (or bring up to date) the engine directory; returns its path."""
    plan = plan_build(options)
    out, spec = plan.output, plan.spec
    source = weights.source_digest(plan, log)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("sawtrt engine directory (see config.json)\n")
    state = BuildState(out)

    weights_info, tok_info = weights.run(plan, source, out, state, log, progress)
    kv_calibration = calibration.run(plan, out, state, weights_info, tok_info, log)
    layout, extra = plan.layout, {}
    if options.rank_layers is not None:
        policy, extra["layer_rank"] = ranking.run(plan, out, state, weights_info, kv_calibration,
                                                  options.rank_layers, log, progress)
        layout = PageLayout(policy, spec.head_dim, spec.num_kv_heads, plan.layout.page_size)
    kernel_info = kernels.run(plan, out, state, log)
    cfg = EngineConfig(model=spec, layout=layout, max_batch=plan.max_batch,
                       max_seq_len=plan.max_seq_len, weights=weights_info, tokenizer=tok_info,
                       kernels=kernel_info, source=source, kv_calibration=kv_calibration,
                       extra=extra)
    write_config(cfg, out, state, log)
    triton_repo.run(out, state, log)
    trt_plan.run(out, log)
    return out


def write_config(cfg: EngineConfig, out: Path, state: BuildState, log) -> None:
    text = cfg.to_json()
    inputs = {"config.json": text}
    if state.current("config", inputs) is not None:
        log("config.json: unchanged")
        return
    (out / "config.json").write_text(text)
    state.record("config", inputs, ["config.json"], {})
    log(f"config.json: written ({cfg.model.name}, kv {cfg.policy}, page "
        f"{cfg.layout.page_size}, max_batch {cfg.max_batch}, max_seq_len {cfg.max_seq_len})")
