"""The compiled SawAttention plugin (libsawtrt_trt_plugin.so, trt_plugin/src): finding it,
registering it with a TensorRT process in place of the Python plugin, and carrying it into an
engine directory next to model.plan.

    kind, path = register(trt, engine_dir)     # "compiled" (library loaded) or "python"
    plugin = create(trt, params, phase)        # through whichever creator is registered
    install(engine_dir)                        # copy the library next to model.plan

The compiled plugin and the Python plugin share the name, namespace, version and fields
(tests/test_trt_plugin_lib.py checks it), so a plan built with either deserializes with either;
only one can be registered per process. Library search: $SAWTRT_TRT_PLUGIN_LIB, the engine
directory (next to model.plan, then lib/), <repo>/build/, next to the loaded kernel library.
"""
from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

from .params import PLUGIN_NAME, PLUGIN_NAMESPACE, PLUGIN_VERSION

LIB_NAME = "libsawtrt_trt_plugin.so"
KERNEL_LIB_NAME = "libsawtrt_kernels.so"
_REPO = Path(__file__).resolve().parents[2]
_registered: dict[int, tuple[str, Path | None]] = {}     # registry id -> (kind, library path)


def candidates(engine_dir=None) -> list[Path]:
    out = []
    if os.environ.get("SAWTRT_TRT_PLUGIN_LIB"):
        out.append(Path(os.environ["SAWTRT_TRT_PLUGIN_LIB"]))
    if engine_dir is not None:
        out += [Path(engine_dir) / LIB_NAME, Path(engine_dir) / "lib" / LIB_NAME]
    out.append(_REPO / "build" / LIB_NAME)
    kernels = _kernel_library_path(engine_dir)
    if kernels is not None:
        out.append(kernels.parent / LIB_NAME)
    return out


def find(engine_dir=None) -> Path | None:
    """The compiled plugin library, or None (then the Python plugin serves)."""
    return next((p for p in candidates(engine_dir) if p.is_file()), None)


def _kernel_library_path(engine_dir=None) -> Path | None:
    from ..kernels import library
    return library.find_library(engine_dir)


def register(trt, engine_dir=None, registry=None) -> tuple[str, Path | None]:
    """Register SawAttention with `registry` (default: the process's plugin registry): the
    compiled library when one is found (IPluginRegistry.load_library, as trtexec
    --dynamicPlugins does), else the Python creator. Idempotent per registry: the first choice
    stays (TensorRT refuses a second creator of the same name)."""
    registry = registry if registry is not None else trt.get_plugin_registry()
    key = id(registry)
    if key in _registered:
        return _registered[key]
    path = find(engine_dir)
    if path is not None:
        kernels = _kernel_library_path(engine_dir)
        if kernels is not None and not os.environ.get("SAWTRT_KERNEL_LIB") and \
                not (path.parent / KERNEL_LIB_NAME).is_file():
            # the library dlopens the kernels from $SAWTRT_KERNEL_LIB or its own folder
            os.environ["SAWTRT_KERNEL_LIB"] = str(kernels)
        if registry.load_library(str(path)) is None:
            raise RuntimeError(f"TensorRT could not load the plugin library {path} (is "
                               f"{PLUGIN_NAMESPACE}::{PLUGIN_NAME} already registered?)")
        choice = ("compiled", path)
    else:
        from . import plugin as P
        P.register(registry)
        choice = ("python", None)
    _registered[key] = choice
    return choice


def create(trt, params, phase=None, engine_dir=None):
    """A SawAttention instance from the registered creator and serialized fields (the path
    TensorRT takes), in the BUILD phase unless told otherwise."""
    from . import plugin as P
    kind, _ = register(trt, engine_dir)
    phase = trt.TensorRTPhase.BUILD if phase is None else phase
    if kind == "python":
        return P.create(params, phase)
    creator = trt.get_plugin_registry().get_creator(PLUGIN_NAME, PLUGIN_VERSION, PLUGIN_NAMESPACE)
    if creator is None:
        raise RuntimeError(f"{PLUGIN_NAMESPACE}::{PLUGIN_NAME} v{PLUGIN_VERSION} is not in the "
                           "plugin registry after loading the library")
    fields = P.plugin_fields(params)
    plugin = creator.create_plugin(PLUGIN_NAME, fields, phase)
    if plugin is None:
        raise RuntimeError(f"the compiled SawAttention refused {params.summary()} (see the "
                           "TensorRT log)")
    return plugin


def _sha256(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _copy(src: Path, dst: Path) -> Path:
    if not dst.is_file() or _sha256(dst) != _sha256(src):
        tmp = dst.with_name(dst.name + ".tmp")
        shutil.copyfile(src, tmp)
        os.chmod(tmp, 0o755)
        tmp.replace(dst)
    return dst


def install(engine_dir, source: Path | None = None) -> dict | None:
    """Copy the compiled plugin next to model.plan (and the kernel library next to it when the
    engine has none in lib/), so `trtexec --dynamicPlugins=engine/libsawtrt_trt_plugin.so` and
    Triton load the engine directory as it is. Returns what model.plan.json records, or None
    when there is no compiled plugin."""
    engine_dir = Path(engine_dir)
    src = source or find(engine_dir)
    if src is None:
        return None
    dst = engine_dir / LIB_NAME
    if src.resolve() != dst.resolve():
        _copy(src, dst)
    info = {"library": LIB_NAME, "sha256": _sha256(dst)}
    kernels = _kernel_library_path(engine_dir)
    if not (engine_dir / "lib" / KERNEL_LIB_NAME).is_file() and kernels is not None:
        _copy(kernels, engine_dir / KERNEL_LIB_NAME)
        info["kernels"] = KERNEL_LIB_NAME
    elif (engine_dir / "lib" / KERNEL_LIB_NAME).is_file():
        info["kernels"] = f"lib/{KERNEL_LIB_NAME}"
    return info
