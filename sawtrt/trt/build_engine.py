"""The TensorRT step of `sawtrt build`: engine_dir/config.json + weights -> engine_dir/model.plan.

    plan_path, reason = maybe_build_plan(engine_dir)

Builds only where full TensorRT (with plugin layers), a CUDA GPU and the compiled kernel library
are all present; otherwise returns (None, reason) with the reason in plain words, e.g.
"TensorRT not importable: tensorrt: ModuleNotFoundError: No module named 'tensorrt'; tensorrt_rtx
1.7.1.116 present but its networks accept no plugin layers". A plan that is up to date (same
config, weights and TensorRT version) is not rebuilt.

Next to the plan, model.plan.json records what it was built from and for: TensorRT version,
dtype, the optimization profile's limits and the plugin identity; runtime.py reads it. When the
compiled plugin (libsawtrt_trt_plugin.so, see plugin_library.py) is found, it is copied next to
model.plan and the plan is built with it; otherwise with the Python plugin.
"""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

from . import compat
from .params import PLUGIN_NAME, PLUGIN_NAMESPACE, PLUGIN_VERSION

PLAN_FILE = "model.plan"
PLAN_META = "model.plan.json"
BUILD_DTYPE = "bfloat16"


def _digest(engine_dir: Path, cfg_text: str) -> str:
    h = hashlib.sha256(cfg_text.encode())
    w = engine_dir / "model.safetensors"
    if w.is_file():
        st = w.stat()
        h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()


def _kernel_library(cfg) -> str | None:
    """None when the kernel library loads, else why not (build-time get_workspace_size and the
    engine's enqueue both call it)."""
    from ..kernels import library
    try:
        path = (cfg.kernels or {}).get("library")
        library.load(path if path and Path(path).is_file() else None)
        return None
    except OSError as e:
        return f"kernel library not loadable: {e}"


def maybe_build_plan(engine_dir, max_tokens: int | None = None, force: bool = False,
                     log=None) -> tuple[Path | None, str]:
    """Build engine_dir/model.plan when TensorRT can; returns (plan path | None, reason)."""
    engine_dir = Path(engine_dir)
    trt, reason = compat.full_tensorrt()
    if trt is None:
        return None, reason
    import torch
    if not torch.cuda.is_available():
        return None, f"tensorrt {compat.version(trt)} importable but no CUDA GPU to build on"
    from ..engine.config import EngineConfig
    try:
        cfg = EngineConfig.load(engine_dir)
    except Exception as e:                                    # noqa: BLE001
        return None, f"cannot read the engine config: {e}"
    if cfg.model.arch not in ("llama", "qwen3"):
        return None, f"the TensorRT network covers llama and qwen3, not {cfg.model.arch}"
    why = _kernel_library(cfg)
    if why:
        return None, why
    from . import network as N
    limits = N.Limits.for_engine(cfg.max_batch, cfg.max_seq_len, cfg.layout.page_size,
                                 max_tokens=max_tokens)
    digest = _digest(engine_dir, cfg.to_json())
    plan, meta_path = engine_dir / PLAN_FILE, engine_dir / PLAN_META
    if not force and plan.is_file() and meta_path.is_file():
        try:
            old = json.loads(meta_path.read_text())
        except ValueError:
            old = {}
        if old.get("digest") == digest and old.get("tensorrt") == compat.version(trt) and \
                old.get("limits") == limits.to_dict():
            return plan, "up to date"
    from ..engine.llm_engine import load_kv_transform, load_weights
    from . import plugin_library
    # the compiled plugin goes next to model.plan, so trtexec and Triton load the directory as is
    plugin_info = plugin_library.install(engine_dir)
    dtype = torch.bfloat16
    t0 = time.time()
    try:
        weights = load_weights(cfg, engine_dir, "cpu", dtype)
        blob = N.build_serialized(trt, cfg.model, cfg.layout, weights, dtype, limits,
                                  kv_transform=load_kv_transform(cfg, engine_dir, dtype, "cpu"),
                                  engine_dir=engine_dir)
    except Exception as e:                                    # noqa: BLE001
        return None, f"TensorRT build failed: {type(e).__name__}: {e}"
    tmp = plan.with_suffix(".plan.tmp")
    tmp.write_bytes(blob)
    tmp.replace(plan)
    meta = {"tensorrt": compat.version(trt), "dtype": BUILD_DTYPE, "limits": limits.to_dict(),
            "plugin": {"name": PLUGIN_NAME, "namespace": PLUGIN_NAMESPACE,
                       "version": PLUGIN_VERSION,
                       "implementation": plugin_library.register(trt, engine_dir)[0],
                       **(plugin_info or {})},
            "kv_policy": str(cfg.layout.policy), "page_size": cfg.layout.page_size,
            "num_layers": cfg.model.num_layers, "digest": digest,
            "build_seconds": round(time.time() - t0, 1), "bytes": len(blob)}
    meta_path.write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
    if log:
        log(f"TensorRT plan: {plan} ({len(blob) / 2**20:.1f} MiB, {meta['build_seconds']} s)")
    return plan, f"built with TensorRT {compat.version(trt)}"
