"""`sawtrt build` as a Python API: validate everything, then write an engine directory.

    build_engine(BuildOptions(model="smollm2-135m", kv_cache="int4-bdr"))

The build is a sequence of steps, one module each, run by `pipeline.build_engine`:

    plan          validate the options, the checkpoint and the KV policy (nothing written)
    weights       model.safetensors (bf16) and the tokenizer files
    calibration   kv_calibration.safetensors for policies with center / balance / whiten
    ranking       per-layer sensitivity ranking, only with rank_layers (sawtrt.calibration)
    kernels       the kernel library (build_scripts/build.py when nvcc exists) into lib/
    config        config.json (sawtrt.engine.config)
    triton_repo   the Triton model repository (sawtrt.serving.triton_repo)
    trt_plan      the TensorRT plan (sawtrt.trt.build_engine), when TensorRT and a GPU are there

Every step follows one rule (state.py): it is skipped when the fingerprint of its inputs matches
the one recorded in the engine directory and its files are unchanged, so re-running with the
same inputs rewrites nothing.
"""
from .calibration import calibration_text_windows
from .pipeline import build_engine
from .plan import BuildError, BuildOptions, BuildPlan, plan_build

__all__ = ["BuildError", "BuildOptions", "BuildPlan", "build_engine", "calibration_text_windows",
           "plan_build"]
