"""Finding and loading libsawtrt_kernels.so (built by build_scripts/build.py) and the ctypes view
of its C ABI (cpp/include/saw/c_api.h).

Search order: $SAWTRT_KERNEL_LIB, then <repo>/build/, then an engine directory (argument or
$SAWTRT_ENGINE_DIR). Loading needs no GPU and no torch: argument validation in the library runs
before any CUDA call, so tests check the ABI on CPU-only machines.
"""
from __future__ import annotations

import ctypes
import math
import os
from pathlib import Path

LIB_NAME = "libsawtrt_kernels.so"
_REPO = Path(__file__).resolve().parents[2]

KIND_BF16, KIND_INT8, KIND_INT4 = 0, 1, 2
DTYPE_FP16, DTYPE_BF16 = 0, 1
ERR_UNSUPPORTED, ERR_BAD_ARGUMENT = 10001, 10002
_KINDS = {"bf16": KIND_BF16, "int8": KIND_INT8, "int4": KIND_INT4, "int4-bdr": KIND_INT4}


class SawKernelError(RuntimeError):
    """A non-zero return code of the kernel library, with its message."""

    def __init__(self, code: int, message: str):
        super().__init__(f"[{code}] {message}")
        self.code = code
        self.message = message


class SawConfig(ctypes.Structure):
    _fields_ = [("num_q_heads", ctypes.c_int32), ("num_kv_heads", ctypes.c_int32),
                ("head_dim", ctypes.c_int32), ("page_size", ctypes.c_int32),
                ("kind", ctypes.c_int32), ("rotation_block", ctypes.c_int32),
                ("rotate_v", ctypes.c_int32), ("act_dtype", ctypes.c_int32),
                ("sm_scale", ctypes.c_float), ("signs", ctypes.c_void_p)]

    def __repr__(self) -> str:
        return "SawConfig(" + ", ".join(f"{n}={getattr(self, n)}" for n, _ in self._fields_) + ")"


class SawQKPrologue(ctypes.Structure):
    """The decode step's q/k prologue (c_api.h): RMSNorm weights, eps, RoPE rows; NULL skips."""
    _fields_ = [("q_norm", ctypes.c_void_p), ("k_norm", ctypes.c_void_p),
                ("norm_eps", ctypes.c_float), ("rope_cos", ctypes.c_void_p),
                ("rope_sin", ctypes.c_void_p), ("rope_stride", ctypes.c_int64)]


class SawLinearFusion(ctypes.Structure):
    """What saw_linear_fused folds around the product (c_api.h): RMSNorm of x, residual add."""
    _fields_ = [("norm_weight", ctypes.c_void_p), ("norm_eps", ctypes.c_float),
                ("residual", ctypes.c_void_p), ("residual_stride", ctypes.c_int64)]


class SawPageLayout(ctypes.Structure):
    _fields_ = [(n, ctypes.c_int64) for n in ("code_bytes", "param_bytes", "k_codes",
                                              "k_params", "v_codes", "v_params",
                                              "head_block_bytes")]


def act_dtype_code(dtype) -> int | None:
    """SawDtype of a torch dtype (or "fp16"/"bf16"), None when the kernels don't take it."""
    name = str(dtype).replace("torch.", "")
    return {"float16": DTYPE_FP16, "fp16": DTYPE_FP16, "half": DTYPE_FP16,
            "bfloat16": DTYPE_BF16, "bf16": DTYPE_BF16}.get(name)


def make_config(layout, num_q_heads: int, act_dtype, sm_scale: float | None = None,
                signs_ptr: int = 0) -> SawConfig:
    """SawConfig for a spec.PageLayout. `signs_ptr` is a device pointer to D float32 +-1 values
    (layout.policy.signs(D) on the GPU) when the policy has a sign seed, else 0."""
    policy = layout.policy
    dtype = act_dtype_code(act_dtype)
    if dtype is None:
        raise ValueError(f"activation dtype {act_dtype} not supported by the kernels (fp16, bf16)")
    if policy.sign_seed is not None and not signs_ptr:
        raise ValueError(f"policy {policy} has signs: pass their device pointer as signs_ptr")
    return SawConfig(num_q_heads=num_q_heads, num_kv_heads=layout.num_kv_heads,
                     head_dim=layout.head_dim, page_size=layout.page_size,
                     kind=_KINDS[policy.kind], rotation_block=policy.rotation_block or 0,
                     rotate_v=int(bool(policy.rotate_v)), act_dtype=dtype,
                     sm_scale=1.0 / math.sqrt(layout.head_dim) if sm_scale is None else sm_scale,
                     signs=signs_ptr or None)


def candidates(engine_dir: str | os.PathLike | None = None) -> list[Path]:
    out = []
    if os.environ.get("SAWTRT_KERNEL_LIB"):
        out.append(Path(os.environ["SAWTRT_KERNEL_LIB"]))
    out.append(_REPO / "build" / LIB_NAME)
    for d in (engine_dir, os.environ.get("SAWTRT_ENGINE_DIR")):
        if d:
            out.append(Path(d) / LIB_NAME)
    return out


def find_library(engine_dir=None) -> Path | None:
    return next((p for p in candidates(engine_dir) if p.is_file()), None)


_c_int, _ptr, _i32p = ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p
_PROTOTYPES = {
    "saw_page_layout": (_c_int, [ctypes.POINTER(SawConfig), ctypes.POINTER(SawPageLayout)]),
    "saw_error_string": (ctypes.c_char_p, [_c_int]),
    "saw_last_error_message": (ctypes.c_char_p, []),
    "saw_write_kv": (_c_int, [ctypes.POINTER(SawConfig), _ptr, ctypes.c_int64, _i32p,
                              ctypes.c_int32, _ptr, _ptr]),
    "saw_workspace_bytes": (ctypes.c_size_t, [ctypes.POINTER(SawConfig), ctypes.c_int32,
                                              ctypes.c_int32, ctypes.c_int32]),
    "saw_decode": (_c_int, [ctypes.POINTER(SawConfig), _ptr, ctypes.c_int64, _ptr, _i32p,
                            ctypes.c_int32, _i32p, ctypes.c_int32, ctypes.c_int32, _ptr, _ptr,
                            ctypes.c_size_t, _ptr]),
    "saw_prefill": (_c_int, [ctypes.POINTER(SawConfig), _ptr, ctypes.c_int64, _ptr, _i32p,
                             ctypes.c_int32, _i32p, _i32p, ctypes.c_int32, ctypes.c_int32,
                             ctypes.c_int32, ctypes.c_int32, _ptr, _ptr, ctypes.c_size_t, _ptr]),
    "saw_attention_step": (_c_int, [ctypes.POINTER(SawConfig), _ptr, ctypes.c_int64, _ptr,
                                    _i32p, ctypes.c_int32, _i32p, _i32p, ctypes.c_int32,
                                    ctypes.c_int32, ctypes.c_int32, ctypes.c_int32, _ptr, _ptr,
                                    ctypes.c_size_t, _ptr]),
}
EXPORTS = tuple(_PROTOTYPES)
# newer than some libraries in the field: set when present, asked through the functions below
_OPTIONAL = {
    "saw_decode_supported": (_c_int, [ctypes.POINTER(SawConfig)]),
    "saw_gather_kv": (_c_int, [ctypes.POINTER(SawConfig), _ptr, _i32p, ctypes.c_int32, _i32p,
                               _i32p, ctypes.c_int32, ctypes.c_int32, _ptr, _ptr,
                               ctypes.c_int64, _ptr]),
    "saw_linear": (_c_int, [ctypes.c_int32, _ptr, ctypes.c_int64, _ptr, _ptr, _ptr,
                            ctypes.c_int64, ctypes.c_int32, ctypes.c_int32, ctypes.c_int32,
                            _ptr]),
    "saw_linear_fused": (_c_int, [ctypes.c_int32, _ptr, ctypes.c_int64, _ptr, _ptr, _ptr,
                                  ctypes.c_int64, ctypes.c_int32, ctypes.c_int32,
                                  ctypes.c_int32, ctypes.c_int32,
                                  ctypes.POINTER(SawLinearFusion), _ptr]),
    "saw_attention_step_qk": (_c_int, [ctypes.POINTER(SawConfig), _ptr, ctypes.c_int64,
                                       ctypes.POINTER(SawQKPrologue), _ptr, _i32p,
                                       ctypes.c_int32, _i32p, _i32p, ctypes.c_int32,
                                       ctypes.c_int32, ctypes.c_int32, ctypes.c_int32, _ptr,
                                       _ptr, ctypes.c_size_t, _ptr]),
}
EXPORTS += tuple(_OPTIONAL)     # what this checkout's library exports

_LIB: ctypes.CDLL | None = None


def load(path: str | os.PathLike | None = None, engine_dir=None) -> ctypes.CDLL:
    """Load (once) and return the library with its prototypes set. Raises OSError if absent."""
    global _LIB
    if path is None and _LIB is not None:
        return _LIB
    p = Path(path) if path is not None else find_library(engine_dir)
    if p is None:
        raise OSError(f"{LIB_NAME} not found (looked at: "
                      f"{', '.join(map(str, candidates(engine_dir)))}); build it with "
                      "`python build_scripts/build.py` or set SAWTRT_KERNEL_LIB")
    lib = ctypes.CDLL(str(p))
    for name, (res, args) in _PROTOTYPES.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = res, args
    for name, (res, args) in _OPTIONAL.items():
        if hasattr(lib, name):
            fn = getattr(lib, name)
            fn.restype, fn.argtypes = res, args
    if path is None or _LIB is None:
        _LIB = lib
    return lib


def try_load() -> ctypes.CDLL | None:
    try:
        return load()
    except OSError:
        return None


def check(code: int, lib: ctypes.CDLL | None = None) -> None:
    """Raise SawKernelError for a non-zero return code."""
    if code:
        lib = lib or load()
        msg = (lib.saw_last_error_message() or b"").decode() or \
            (lib.saw_error_string(code) or b"").decode()
        raise SawKernelError(code, msg)


def decode_supported(cfg: SawConfig, lib: ctypes.CDLL | None = None) -> bool:
    """Whether the library's decode kernel (saw_decode, the decode path of saw_attention_step)
    serves cfg. A library without saw_decode_supported predates int8 decode: bf16 and int4 only
    (its saw_decode returned SAW_ERR_UNSUPPORTED for int8)."""
    lib = lib or load()
    if not hasattr(lib, "saw_decode_supported"):
        return cfg.kind != KIND_INT8
    return bool(lib.saw_decode_supported(ctypes.byref(cfg)))


def page_layout(cfg: SawConfig, lib: ctypes.CDLL | None = None) -> SawPageLayout:
    """The library's page layout for `cfg` (tests compare it with spec.PageLayout)."""
    lib = lib or load()
    out = SawPageLayout()
    check(lib.saw_page_layout(ctypes.byref(cfg), ctypes.byref(out)), lib)
    return out
