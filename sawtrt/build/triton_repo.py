"""Build step: the Triton model repository of the engine (sawtrt.serving.triton_repo)."""
from __future__ import annotations

import os
from pathlib import Path

from ..serving import triton_repo
from .state import BuildState


def run(out: Path, state: BuildState, log) -> Path:
    engine_dir = os.fspath(out.resolve())
    root = out / triton_repo.REPO_DIRNAME
    model = Path(triton_repo.REPO_DIRNAME) / triton_repo.MODEL_NAME
    files = [str(model / "config.pbtxt"), str(model / "1" / "model.py")]
    inputs = {"engine_dir": engine_dir, "config.pbtxt": triton_repo.render_config(engine_dir),
              "model.py": triton_repo.MODEL_PY}
    if state.current("triton_repo", inputs) is not None:
        log(f"Triton model repository: up to date ({root})")
        return root
    repo = triton_repo.write_model_repository(out)
    state.record("triton_repo", inputs, files, {"root": triton_repo.REPO_DIRNAME})
    log(f"Triton model repository: {repo}")
    return repo
