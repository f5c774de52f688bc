"""Which TensorRT Python API this process has.

Order: `tensorrt` (TensorRT 10.x / 11.x: builder with plugin layers, runtime), then the
TensorRT-RTX bindings (`tensorrt_rtx`, or `tensorrt_rtx_bindings` as the PyPI wheel
tensorrt-rtx-cu13-bindings names its module). TensorRT-RTX carries the same IPluginV3 / creator /
registry classes, so the plugin's class logic loads and is testable with it, but its networks
have no plugin layers (no `add_plugin_v3`), so engines with SawAttention need `tensorrt`.
"""
from __future__ import annotations

import importlib

CANDIDATES = ("tensorrt", "tensorrt_rtx", "tensorrt_rtx_bindings")
_cache: dict = {}


class TensorRTUnavailable(ImportError):
    """No TensorRT Python API could be imported."""


def load(prefer: tuple[str, ...] = CANDIDATES):
    """The first importable TensorRT module in `prefer`; TensorRTUnavailable lists every reason."""
    reasons = []
    for name in prefer:
        if name in _cache:
            return _cache[name]
        try:
            mod = importlib.import_module(name)
        except Exception as e:           # ImportError, or OSError from a missing libnvinfer
            reasons.append(f"{name}: {type(e).__name__}: {e}")
            continue
        if not hasattr(mod, "IPluginV3"):
            reasons.append(f"{name}: {getattr(mod, '__version__', '?')} has no IPluginV3 "
                           "(TensorRT >= 10 is needed)")
            continue
        _cache[name] = mod
        return mod
    raise TensorRTUnavailable(
        "no TensorRT Python API importable (tried " + "; ".join(reasons) + "). Install full "
        "TensorRT 10/11 (`tensorrt`) for engines, or `pip install -e '.[dev]'` for the "
        "TensorRT-RTX bindings the plugin class tests use.")


def flavor(trt) -> str:
    """'tensorrt' or 'tensorrt_rtx' for a loaded module."""
    return "tensorrt_rtx" if trt.__name__.startswith("tensorrt_rtx") else "tensorrt"


def version(trt) -> str:
    return getattr(trt, "__version__", "?")


def has_plugin_layers(trt) -> bool:
    """True when INetworkDefinition can take an IPluginV3 layer (full TensorRT >= 10)."""
    return hasattr(trt, "INetworkDefinition") and hasattr(trt.INetworkDefinition, "add_plugin_v3")


def full_tensorrt():
    """(module, None) when full TensorRT with plugin layers is importable, else (None, reason)."""
    try:
        trt = load(("tensorrt",))
    except TensorRTUnavailable as e:
        reason = f"TensorRT not importable: {str(e).split('(tried ', 1)[-1].split(').', 1)[0]}"
        try:
            rtx = load(("tensorrt_rtx", "tensorrt_rtx_bindings"))
            reason += (f"; tensorrt_rtx {version(rtx)} present but its networks accept no plugin "
                       "layers")
        except TensorRTUnavailable:
            reason += "; tensorrt_rtx not installed either"
        return None, reason
    if not has_plugin_layers(trt):
        return None, (f"tensorrt {version(trt)} has no INetworkDefinition.add_plugin_v3 "
                      "(TensorRT >= 10 needed)")
    return trt, None
