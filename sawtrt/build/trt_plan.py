"""Build step: the TensorRT plan (sawtrt.trt.build_engine), when a full TensorRT and a GPU are
there. The plan carries its own record (model.plan.json: a digest of config.json and the weights,
the TensorRT version and the limits), so this step asks the TensorRT side whether it is current."""
from __future__ import annotations

import importlib.util
from pathlib import Path

from ..trt import build_engine as trt_build


def run(out: Path, log) -> Path | None:
    if importlib.util.find_spec("tensorrt") is None:
        log("TensorRT not installed: skipping model.plan")
        return None
    plan_path, reason = trt_build.maybe_build_plan(out)
    log(f"TensorRT plan: {plan_path}" if plan_path else f"TensorRT plan: skipped ({reason})")
    return plan_path
