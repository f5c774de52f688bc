"""The kernel library builds, exports the C ABI, agrees with spec.PageLayout and rejects bad
configurations with messages that name the bad value. Runs on CPU: the library is loaded with
ctypes and only its validation (which precedes every CUDA call) is exercised."""
from __future__ import annotations

import ctypes
import importlib.util
import math
import shutil
import subprocess
from pathlib import Path

import pytest

from sawtrt.kernels import library
from sawtrt.spec import KVPolicy, PageLayout

ROOT = Path(__file__).resolve().parents[1]
# every test loads the library, which a fresh checkout compiles with nvcc first (~1 min)
pytestmark = pytest.mark.slow
ARCHS = ("sm_90a",)   # one arch keeps a 2-core CI build to about a minute


def _load_build_module():
    spec = importlib.util.spec_from_file_location("saw_build", ROOT / "build_scripts" / "build.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def lib_path():
    build = _load_build_module()
    if build.find_nvcc() is None:
        pytest.skip("nvcc not found: the kernel library cannot be built here")
    # cached under build/ by a hash of the sources, flags and nvcc version
    return build.build(ARCHS, ROOT / "build" / ("test-" + "-".join(ARCHS)))


@pytest.fixture(scope="module")
def lib(lib_path):
    return library.load(lib_path)


def _cfg(**kw):
    base = dict(num_q_heads=8, num_kv_heads=2, head_dim=128, page_size=64,
                kind=library.KIND_INT4, rotation_block=128, rotate_v=0,
                act_dtype=library.DTYPE_BF16, sm_scale=1 / math.sqrt(128), signs=None)
    base.update(kw)
    return library.SawConfig(**base)


def test_exports_only_the_c_abi(lib_path):
    nm = shutil.which("nm")
    if nm is None:
        pytest.skip("nm not available")
    out = subprocess.run([nm, "-D", "--defined-only", str(lib_path)], capture_output=True,
                         text=True, check=True).stdout
    names = {line.split()[-1] for line in out.splitlines() if line.strip()}
    assert names == set(library.EXPORTS)


def test_loads_without_cuda_runtime_dependency(lib_path):
    ldd = shutil.which("ldd")
    if ldd is None:
        pytest.skip("ldd not available")
    out = subprocess.run([ldd, str(lib_path)], capture_output=True, text=True).stdout
    assert "libcudart" not in out   # cudart is linked statically


@pytest.mark.parametrize("policy", ["bf16", "int8", "int4", "int4-bdr", "int4-bdr:h=16,kv"])
@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("page_size", [16, 32, 64, 128])
def test_page_layout_matches_spec(lib, policy, head_dim, page_size):
    layout = PageLayout(KVPolicy.parse(policy), head_dim, 4, page_size)
    cfg = library.make_config(layout, 8, "bf16", signs_ptr=0)
    got = library.page_layout(cfg, lib)
    for name in ("code_bytes", "param_bytes", "k_codes", "k_params", "v_codes", "v_params",
                 "head_block_bytes"):
        assert getattr(got, name) == getattr(layout, name), name


@pytest.mark.parametrize("kw, message", [
    (dict(head_dim=96), "head_dim 96 not supported"),
    (dict(page_size=48), "page_size 48 not supported"),
    (dict(kind=7), "cache kind 7"),
    (dict(rotation_block=24), "rotation block 24"),
    (dict(rotation_block=512), "rotation block 512"),
    (dict(head_dim=64, rotation_block=128), "rotation block 128"),
    (dict(kind=library.KIND_BF16, rotation_block=64), "rotation block 64 needs an int4 cache"),
    (dict(rotation_block=0, rotate_v=1), "rotate_v 1 set without a rotation block"),
    (dict(num_q_heads=6, num_kv_heads=4), "num_q_heads 6 is not a multiple of num_kv_heads 4"),
    (dict(num_q_heads=64, num_kv_heads=2), "GQA group 32"),
    (dict(num_kv_heads=0), "num_kv_heads 0"),
    (dict(act_dtype=5), "activation dtype 5"),
    (dict(sm_scale=float("nan")), "sm_scale nan"),
])
def test_bad_config_is_named(lib, kw, message):
    cfg = _cfg(**kw)
    out = library.SawPageLayout()
    code = lib.saw_page_layout(ctypes.byref(cfg), ctypes.byref(out))
    assert code in (library.ERR_UNSUPPORTED, library.ERR_BAD_ARGUMENT)
    assert message in lib.saw_last_error_message().decode()
    # the launchers validate the same way before touching the GPU
    code = lib.saw_write_kv(ctypes.byref(cfg), 16, 10**6, 16, 1, 16, None)
    assert code in (library.ERR_UNSUPPORTED, library.ERR_BAD_ARGUMENT)
    assert message in lib.saw_last_error_message().decode()
    with pytest.raises(library.SawKernelError, match="rotation|head_dim|page_size|kind|heads|"
                       "group|dtype|scale|rotate_v"):
        library.check(code, lib)


def test_bad_arguments_are_named(lib):
    cfg = _cfg()
    ref = ctypes.byref(cfg)
    assert lib.saw_write_kv(ref, 16, 100, 16, 4, 16, None) == library.ERR_BAD_ARGUMENT
    assert "qkv stride 100" in lib.saw_last_error_message().decode()
    assert lib.saw_write_kv(ref, None, 4096, 16, 4, 16, None) == library.ERR_BAD_ARGUMENT
    assert "NULL pointer" in lib.saw_last_error_message().decode()
    assert lib.saw_write_kv(ref, 16, 4096, 16, -1, 16, None) == library.ERR_BAD_ARGUMENT
    assert "num_tokens -1" in lib.saw_last_error_message().decode()
    # max_seq_len larger than the block table can address
    code = lib.saw_prefill(ref, 16, 4096, 16, 16, 2, 16, 16, 1, 4, 4, 1000, 16, 16, 1 << 20, None)
    assert code == library.ERR_BAD_ARGUMENT
    assert "max_seq_len 1000" in lib.saw_last_error_message().decode()
    code = lib.saw_prefill(ref, 16, 4096, 16, 16, 8, 16, 16, 1, 4, 9, 8, 16, 16, 1 << 20, None)
    assert "max_q_len 9" in lib.saw_last_error_message().decode()
    # split-KV partials of a long decode: a workspace too small is refused, not overrun
    need = lib.saw_workspace_bytes(ref, 2, 2, 8192)
    assert need > 0
    code = lib.saw_attention_step(ref, 16, 4096, 16, 16, 128, 16, 16, 2, 2, 1, 8192, 16, 16,
                                  need - 1, None)
    assert code == library.ERR_BAD_ARGUMENT
    assert "workspace" in lib.saw_last_error_message().decode()
    # ... and one the split merge would read as float4 from a misaligned address
    code = lib.saw_decode(ref, 16, 4096, 16, 16, 128, 16, 2, 8192, 16, 24, need, None)
    assert code == library.ERR_BAD_ARGUMENT
    assert "workspace 0x18 must be 16-byte aligned" in lib.saw_last_error_message().decode()
    assert lib.saw_error_string(library.ERR_UNSUPPORTED) == b"unsupported configuration"


_U, _B = library.ERR_UNSUPPORTED, library.ERR_BAD_ARGUMENT


@pytest.mark.parametrize("args, code, message", [
    ((7, 16, 64, 16, None, 16, 64, 1, 64, 64), _U, "dtype 7"),
    ((1, 16, 64, 16, None, 16, 64, 9, 64, 64), _U, "m 9 outside [1, 8]"),
    ((1, 16, 64, 16, None, 16, 64, 0, 64, 64), _U, "m 0 outside"),
    ((1, 16, 60, 16, None, 16, 64, 1, 64, 60), _B, "k 60 a positive multiple of 8"),
    ((1, 16, 20000, 16, None, 16, 64, 8, 64, 20000), _U, "exceeds 163840 bytes"),
    ((1, 16, 60, 16, None, 16, 64, 1, 64, 64), _B, "x_stride 60"),
    ((1, 16, 64, 16, None, 16, 32, 1, 64, 64), _B, "y_stride 32"),
    ((1, None, 64, 16, None, 16, 64, 1, 64, 64), _B, "NULL pointer"),
    ((1, 24, 64, 16, None, 16, 64, 1, 64, 64), _B, "16-byte aligned"),
])
def test_linear_bad_arguments_are_named(lib, args, code, message):
    dtype, x, xs, w, b, y, ys, m, n, k = args
    assert lib.saw_linear(dtype, x, xs, w, b, y, ys, m, n, k, None) == code
    assert message in lib.saw_last_error_message().decode()


@pytest.mark.parametrize("fields, message", [
    (None, "prologue is NULL"),
    (dict(rope_cos=16), "both or neither"),
    (dict(rope_cos=16, rope_sin=16, rope_stride=64), "rope_stride 64 < head_dim 128"),
    (dict(q_norm=16, norm_eps=-1.0), "norm_eps -1"),
    (dict(k_norm=16, norm_eps=float("nan")), "norm_eps nan"),
    (dict(qkv_stride=100), "qkv stride 100"),
])
def test_attention_step_qk_bad_arguments_are_named(lib, fields, message):
    cfg = _cfg()
    fields = dict(fields or {})
    stride = fields.pop("qkv_stride", 4096)
    pro = None if message == "prologue is NULL" else \
        ctypes.byref(library.SawQKPrologue(**{"norm_eps": 1e-6, **fields}))
    code = lib.saw_attention_step_qk(ctypes.byref(cfg), 16, stride, pro, 16, 16, 8, 16, 16, 2,
                                     2, 1, 512, 16, 16, 1 << 20, None)
    assert code == library.ERR_BAD_ARGUMENT
    assert message in lib.saw_last_error_message().decode()


@pytest.mark.parametrize("args, fusion, code, message", [
    ((1, 16, 100, 16, 16, 64, 1, 64, 64, 1), None, _B, "x_stride 100 >= 2 * k"),
    ((1, 16, 128, 16, 16, 64, 9, 64, 64, 1), None, _U, "m 9 outside [1, 8]"),
    ((1, 24, 128, 16, 16, 64, 1, 64, 64, 1), None, _B, "16-byte aligned"),
    ((1, 16, 128, 16, 16, 32, 1, 64, 64, 1), None, _B, "y_stride 32"),
    ((1, 16, 128, 16, 16, 64, 1, 64, 64, 1), dict(norm_weight=16), _U, "glu and norm_weight"),
    ((1, 16, 64, 16, 16, 64, 1, 64, 64, 0), dict(norm_weight=24), _B, "norm_weight 0x18"),
    ((1, 16, 64, 16, 16, 64, 1, 64, 64, 0), dict(norm_weight=16, norm_eps=-1.0), _B,
     "norm_eps -1"),
    ((1, 16, 64, 16, 16, 64, 1, 64, 64, 0), dict(residual=16, residual_stride=32), _B,
     "residual_stride 32 < n 64"),
])
def test_linear_fused_bad_arguments_are_named(lib, args, fusion, code, message):
    dtype, x, xs, w, y, ys, m, n, k, glu = args
    f = None if fusion is None else ctypes.byref(library.SawLinearFusion(**fusion))
    assert lib.saw_linear_fused(dtype, x, xs, w, None, y, ys, m, n, k, glu, f, None) == code
    assert message in lib.saw_last_error_message().decode()


def test_workspace_covers_every_smaller_batch(lib):
    """saw_workspace_bytes(B) is sized once for a maximum batch (the TensorRT plugin sizes it at
    its profile's maxima): it must cover the split-KV partials of every batch b <= B, though
    fewer sequences get more splits each, and the bound must be one some batch needs."""
    cfg = _cfg()
    ref = ctypes.byref(cfg)
    for max_len in (512, 4096, 8192, 32768):
        need = [lib.saw_workspace_bytes(ref, b, b, max_len) for b in range(1, 97)]
        assert need == [max(need[:b]) for b in range(1, 97)], max_len
    assert lib.saw_workspace_bytes(ref, 64, 64, 8192) > 0


def test_zero_work_is_a_no_op(lib):
    cfg = _cfg()
    assert lib.saw_write_kv(ctypes.byref(cfg), None, 4096, None, 0, None, None) == 0
    assert lib.saw_linear(library.DTYPE_BF16, 16, 64, 16, None, 16, 64, 1, 0, 64, None) == 0
