"""The compiled SawAttention plugin (libsawtrt_trt_plugin.so) against the Python plugin's
definition, without libnvinfer.

A C++ harness (trt_plugin/harness/harness.cpp, compiled here with g++) loads the library the way
TensorRT does (dlopen, setLoggerFinder, getCreators), creates plugins from
PluginFieldCollections and drives the build and runtime interfaces; every answer is compared
with what sawtrt/trt/params.py and core.py (the Python plugin's logic) say for the same input:
field table, serialized fields, rejection messages, format negotiation, output types and shapes
(through a minimal IExprBuilder), shape checks, workspace sizing and the arguments enqueue hands
the kernels' C ABI (a recording stand-in library on CPU). The gpu test runs enqueue on device
buffers and compares with the golden reference and sawtrt.kernels.ops.attention_step.

TensorRT's public headers: $SAWTRT_TRT_INCLUDE, else ../shared/third_party/tensorrt/include
next to the repository (CI's layout)."""
from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from sawtrt.spec import KVPolicy
from sawtrt.trt import core
from sawtrt.trt.params import FIELDS, AttentionParams, PluginParamError

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "build_scripts"))
import build_trt_plugin as B  # noqa: E402

HARNESS = ROOT / "trt_plugin" / "harness"
BUILD = ROOT / "build" / "trt-plugin-test"


def trt_include() -> Path | None:
    for cand in (os.environ.get("SAWTRT_TRT_INCLUDE"),
                 ROOT.parent / "shared" / "third_party" / "tensorrt" / "include"):
        if cand and (Path(cand) / "NvInferRuntime.h").is_file():
            return Path(cand)
    return None


def _compile(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout}{proc.stderr}"


def test_find_cuda_follows_nvcc(tmp_path, monkeypatch):
    """$NVCC picks the toolkit (as for the kernel library), ahead of the nvcc on PATH."""
    root = tmp_path / "cuda-x"
    (root / "bin").mkdir(parents=True)
    (root / "include").mkdir()
    (root / "bin" / "nvcc").write_text("")
    (root / "include" / "cuda_runtime_api.h").write_text("")
    for var in ("CUDA_HOME", "CUDA_PATH"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NVCC", str(root / "bin" / "nvcc"))
    assert B.find_cuda() == root


@pytest.fixture(scope="module")
def built():
    inc = trt_include()
    if inc is None:
        pytest.skip("TensorRT headers not found: set SAWTRT_TRT_INCLUDE or put shared/ next to "
                    "the repository (shared/third_party/tensorrt/include)")
    if not (shutil.which("g++") or os.environ.get("CXX")):
        pytest.skip("no C++ compiler")
    lib = B.build(BUILD, inc)
    cuda = B.find_cuda()
    cxx = os.environ.get("CXX") or shutil.which("g++")
    flags = ["-std=c++17", "-O1", f"-isystem{inc}", f"-isystem{cuda / 'include'}"]
    harness = BUILD / "harness"
    _compile([cxx, *flags, str(HARNESS / "harness.cpp"), "-o", str(harness), "-ldl"])
    # the same harness as a library, for the gpu test (which loads it into its own process)
    _compile([cxx, *flags, "-fPIC", "-shared", "-DHARNESS_LIBRARY", str(HARNESS / "harness.cpp"),
              "-o", str(BUILD / "libharness.so"), "-ldl"])
    recording = BUILD / "recording" / "librecording_kernels.so"
    recording.parent.mkdir(exist_ok=True)
    _compile([os.environ.get("CC") or "gcc", "-O1", "-fPIC", "-shared",
              f"-I{ROOT / 'cpp' / 'include'}", f"-I{cuda / 'include'}",
              str(HARNESS / "recording_kernels.c"), "-o", str(recording)])
    return SimpleNamespace(lib=lib, harness=harness, recording=recording, include=inc)


def ask(built, lines: list[str], kernel_lib: str | Path | None = None, plugin=None) -> list[str]:
    """Send commands to one harness process; returns one answer per command ("call ..." lines
    that the recording kernels printed are prepended to the next answer, joined by ' | ').
    kernel_lib "": no $SAWTRT_KERNEL_LIB (the plugin searches beside itself)."""
    env = dict(os.environ)
    env["SAWTRT_KERNEL_LIB"] = str(built.recording if kernel_lib is None else kernel_lib)
    if kernel_lib == "":
        env.pop("SAWTRT_KERNEL_LIB")
    env.pop("LD_LIBRARY_PATH", None)
    proc = subprocess.run([str(built.harness), str(plugin or built.lib)],
                          input="\n".join(lines) + "\n",
                          capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    answers, calls = [], []
    for line in proc.stdout.splitlines():
        if line.startswith("call "):
            calls.append(line)
        else:
            answers.append(" | ".join(calls + [line]))
            calls = []
    assert len(answers) == len(lines), proc.stdout
    return answers


# -- fields in both encodings ---------------------------------------------------------------------
_NP = {"i": "int32", "I": "int64", "f": "float32", "d": "float64", "b": "int8"}


def field_token(name: str, kind: str, value) -> str:
    if kind == "c":
        raw = value if isinstance(value, bytes) else value.encode()
        return f"{name}=c:" + "".join(chr(c) if chr(c).isalnum() or chr(c) in "-_."
                                      else f"%{c:02X}" for c in raw)
    vals = value if isinstance(value, (list, tuple)) else [value]
    return f"{name}={kind}:" + ",".join(repr(float(v)) if kind in "fd" else str(v) for v in vals)


def field_data(kind: str, value):
    import numpy as np          # (not on the GPU machine; only the CPU tests need it)
    if kind == "c":
        raw = value if isinstance(value, bytes) else value.encode()
        return np.frombuffer(raw, dtype=np.int8).copy()
    vals = value if isinstance(value, (list, tuple)) else [value]
    return np.array(vals, dtype=_NP[kind])


def create_line(fields, phase="BUILD") -> str:
    return " ".join(["create", phase] + [field_token(*f) for f in fields])


def python_message(fields) -> str | None:
    try:
        AttentionParams.from_fields([(n, field_data(k, v)) for n, k, v in fields])
    except PluginParamError as e:
        return str(e)
    return None


def fields_of(params: AttentionParams):
    """(name, kind, value) of every field, as the Python plugin serializes them."""
    kinds = {"int32": "i", "float32": "f", "char": "c"}
    return [(f.name, kinds[f.kind], getattr(params, f.name)) for f in FIELDS]


def serialized_text(params: AttentionParams) -> str:
    """The harness's text form of params.to_fields() (what the Python plugin serializes)."""
    names = {"int32": "INT32", "float32": "FLOAT32", "char": "CHAR"}
    out = []
    for name, data, kind in params.to_fields():
        if kind == "char":
            val = data.tobytes().decode()
        elif kind == "float32":
            val = ("%.9g" % float(data[0]))
        else:
            val = str(int(data[0]))
        out.append(f"{name}={names[kind]}:{val}")
    return ";".join(out)


BASE = [("num_q_heads", "i", 8), ("num_kv_heads", "i", 2), ("head_dim", "i", 128)]
PARAM_SETS = [
    dict(num_q_heads=32, num_kv_heads=8, head_dim=128),
    dict(num_q_heads=16, num_kv_heads=16, head_dim=64, page_size=16, kv_kind="bf16",
         layer_index=5, max_seq_len=8192, max_batch=64, dtype="bf16", sm_scale=0.125),
    dict(num_q_heads=32, num_kv_heads=2, head_dim=256, page_size=128, kv_kind="int4-bdr",
         rotation_block=64, rotate_v=1, sign_seed=7, dtype="fp16"),
    dict(num_q_heads=12, num_kv_heads=4, head_dim=128, page_size=32, kv_kind="int8"),
    dict(num_q_heads=8, num_kv_heads=1, head_dim=64, kv_kind="int4", sm_scale=0.3),
]


# -- library, entry points, identity --------------------------------------------------------------
def test_library_exports_the_plugin_entry_points_and_needs_no_libnvinfer(built):
    lib = ctypes.CDLL(str(built.lib))
    assert lib.getCreators and lib.setLoggerFinder
    readelf = shutil.which("readelf")
    if readelf:
        dyn = subprocess.run([readelf, "-d", "-W", str(built.lib)], capture_output=True,
                             text=True).stdout
        needed = [ln for ln in dyn.splitlines() if "NEEDED" in ln]
        assert needed and not any("nvinfer" in ln or "cudart.so" in ln or "sawtrt_kernels" in ln
                                  for ln in needed), needed
        syms = subprocess.run([readelf, "--dyn-syms", "-W", str(built.lib)], capture_output=True,
                              text=True).stdout
        exported = {ln.split()[-1] for ln in syms.splitlines()
                    if " GLOBAL " in ln and " UND " not in ln}
        assert exported == set(B.EXPORTS)


def test_creator_identity_and_field_table_match_python(built):
    ident, names = ask(built, ["identity", "field_names"])
    assert ident == ("creators=1 name=SawAttention version=1 namespace=sawtrt "
                     "interface=PLUGIN CREATOR_V3ONE/1.0")
    types = {"int32": "INT32", "float32": "FLOAT32", "char": "CHAR"}
    got = [tuple(x.split(":")[:2]) for x in names.split()]
    assert got == [(f.name, types[f.kind]) for f in FIELDS]


@pytest.mark.parametrize("kw", PARAM_SETS)
def test_fields_serialize_and_round_trip_like_the_python_plugin(built, kw):
    """Only the given fields in, every field out: the defaults, order, types and values the C++
    plugin serializes are the Python plugin's; re-creating from them (RUNTIME) gives the same."""
    params = AttentionParams(**kw)
    given = [f for f in fields_of(params) if f[0] in kw]
    created, ser, rt, cl, timing, meta = ask(built, [create_line(given), "serialize", "roundtrip",
                                                     "clone", "timing", "meta"])
    assert created == "ok"
    assert ser == serialized_text(params)
    assert rt == "same " + ser
    assert cl == "same"
    assert timing == params.replace(layer_index=0).summary()
    assert meta == params.summary()


def test_text_fields_accept_nul_terminator_and_spaces(built):
    fields = BASE + [("kv_kind", "c", b"int4\0"), ("dtype", "c", b" bf16 ")]
    created, ser = ask(built, [create_line(fields), "serialize"])
    assert created == "ok"
    assert ser == serialized_text(AttentionParams(8, 2, 128, kv_kind="int4", dtype="bf16"))


BAD_FIELDS = [
    BASE + [("num_heads", "i", 4)],
    BASE + [("head_dim", "i", 64)],
    BASE[:1],
    [("num_q_heads", "i", [8, 8])] + BASE[1:],
    [("num_q_heads", "f", 2.5)] + BASE[1:],
    [("num_q_heads", "d", 8.0)] + BASE[1:] + [("page_size", "I", 48)],
    [("num_q_heads", "i", 0)] + BASE[1:],
    [("num_q_heads", "i", 9)] + BASE[1:],
    [("num_q_heads", "i", 34), ("num_kv_heads", "i", 2), ("head_dim", "i", 128)],
    BASE[:2] + [("head_dim", "i", 96)],
    BASE + [("page_size", "i", 48)],
    BASE + [("rotate_v", "i", 2)],
    BASE + [("sign_seed", "i", -2)],
    BASE + [("sign_seed", "I", 2**31)],
    BASE + [("rotation_block", "i", -1)],
    BASE + [("layer_index", "i", -1)],
    BASE + [("max_seq_len", "i", 0)],
    BASE + [("max_batch", "b", 0)],
    BASE + [("dtype", "c", "fp32")],
    BASE + [("sm_scale", "f", -1.0)],
    BASE + [("sm_scale", "f", -0.1)],
    BASE + [("sm_scale", "d", float("nan"))],
    BASE + [("sm_scale", "f", float("inf"))],
    BASE + [("kv_kind", "c", "int5")],
    BASE + [("kv_kind", "c", "")],
    BASE + [("kv_kind", "c", "int4"), ("rotation_block", "i", 64)],
    BASE + [("kv_kind", "c", "int8"), ("sign_seed", "i", 1)],
    BASE + [("kv_kind", "c", "bf16"), ("rotate_v", "i", 1)],
    BASE + [("rotation_block", "i", 24)],
    BASE + [("rotation_block", "i", 512)],
    BASE + [("rotation_block", "i", 256)],
    [("num_q_heads", "i", 4), ("num_kv_heads", "i", 1), ("head_dim", "i", 64),
     ("rotation_block", "i", 128)],
    BASE + [("kv_kind", "c", "int4-bdr".encode() + b"\xc3\xa9")],
]


@pytest.mark.parametrize("fields", BAD_FIELDS, ids=range(len(BAD_FIELDS)))
def test_bad_fields_are_rejected_with_the_python_plugins_message(built, fields):
    want = python_message(fields)
    assert want is not None, "the case must be one the Python plugin rejects"
    (got,) = ask(built, [create_line(fields)])
    assert got == "error " + want


def test_fields_of_the_wrong_type_or_range_are_rejected_naming_the_field(built):
    lines = [create_line(BASE[:2]) + " head_dim=t:FLOAT16=1",
             create_line(BASE) + " kv_kind=t:INT32=1",
             create_line(BASE) + " max_seq_len=I:4294967296"]
    a, b, c = ask(built, lines)
    assert a == ("error SawAttention: field head_dim has PluginFieldType FLOAT16, expected a "
                 "number (INT32 or FLOAT32)")
    assert b == "error SawAttention: field kv_kind has PluginFieldType INT32, expected CHAR text"
    assert c == "error SawAttention: field max_seq_len=4294967296 does not fit in int32"


def test_signs_are_the_specs_signs(built):
    lines, want = [], []
    for seed in (0, 1, 3, 12345, 2**31 - 1):
        for d in (64, 128, 256):
            lines.append(f"signs {seed} {d}")
            want.append(",".join(str(int(x)) for x in KVPolicy("int4-bdr", sign_seed=seed)
                                 .signs(d).tolist()))
    assert ask(built, lines) == want


# -- format negotiation, output types and shapes --------------------------------------------------
TYPES = ["FLOAT", "HALF", "INT8", "INT32", "BOOL", "UINT8", "FP8", "BF16", "INT64", "INT4",
         "FP4", "E8M0"]


@pytest.mark.parametrize("dtype", ["auto", "fp16", "bf16"])
def test_format_negotiation_matrix_matches_python(built, dtype):
    params = AttentionParams(8, 2, 128, dtype=dtype)
    lines, want = [create_line(BASE + [("dtype", "c", dtype)])], ["ok"]
    for act in ("HALF", "BF16"):
        decided = [act, "UINT8", "INT32", "INT32", "INT32", act]
        for pos in range(6):
            for t in TYPES:
                types = decided[:pos] + [t] + ["FLOAT"] * (5 - pos)   # later positions: garbage
                lines.append(f"formats {pos} 5 " + " ".join(f"{x}:LINEAR" for x in types))
                want.append(str(int(core.supports_format(params, pos, types, ["LINEAR"] * 6, 5))))
    # non-LINEAR formats and a wrong number of inputs are refused at every position
    for pos in range(6):
        types = ["HALF", "UINT8", "INT32", "INT32", "INT32", "HALF"]
        fmts = ["LINEAR"] * 6
        fmts[pos] = "CHW32"
        lines.append(f"formats {pos} 5 " + " ".join(f"{t}:{f}" for t, f in zip(types, fmts)))
        want.append("0")
        lines.append(f"formats {min(pos, 4)} 4 " + " ".join(f"{t}:LINEAR" for t in types[1:]))
        want.append("0")
    got = ask(built, lines)
    assert got == want
    assert sum(x == "1" for x in got[1:]) > 10      # the matrix accepts something


def test_output_types_and_shapes(built):
    p = AttentionParams(8, 2, 128)
    lines = [create_line(BASE), "outtypes HALF UINT8 INT32 INT32 INT32",
             "outtypes BF16 INT8 INT32 INT32 INT32", "outtypes HALF UINT8 INT32 INT32",
             "shapes ?,1536;?,2,2176;?,?;?;?", "shapes 7,?;?,2,2176;?,?;?;?",
             "shapes ?,1500;?,2,2176;?,?;?;?", "shapes ?;?,2,2176;?,?;?;?",
             "shapes ?,1536;?,2,2176;?,?;?"]
    got = ask(built, lines)
    assert got[1:4] == ["ok HALF", "ok BF16", "error SawAttention takes 5 inputs, got 4"]
    assert got[4] == f"ok [qkv[0], {p.out_width}]"
    assert got[5] == f"ok [qkv[0], {p.out_width}]"
    with pytest.raises(core.ShapeError) as e:
        core.output_width(p, 1500)
    assert got[6] == f"error {e.value}"
    assert got[7] == "error SawAttention: qkv must have rank 2, got rank 1"
    assert got[8] == "error SawAttention takes 5 inputs, got 4"


# -- shape checks (configurePlugin / onShapeChange) -----------------------------------------------
SHAPE_CASES = [
    # qkv, pool, block_tables, seq_lens, cu_q_lens, out
    ("?,1536", "?,2,2176", "?,?", "?", "?", "?,1024"),
    ("?,1536", "?,4352", "?,?", "?", "?", "?,1024"),
    ("12,1536", "40,2,2176", "4,6", "4", "5", "12,1024"),
    ("?,1500", "?,2,2176", "?,?", "?", "?", "?,1024"),
    ("?,1536", "?,3,2176", "?,?", "?", "?", "?,1024"),
    ("?,1536", "?,2,1088", "?,?", "?", "?", "?,1024"),
    ("?,1536", "?,4000", "?,?", "?", "?", "?,1024"),
    ("?,1536", "4352", "?,?", "?", "?", "?,1024"),
    ("?,1536", "?,2,2176", "?", "?", "?", "?,1024"),
    ("?,1536", "?,2,2176", "4,?", "5", "?", "?,1024"),
    ("?,1536", "?,2,2176", "4,3", "4", "4", "?,1024"),
    ("?,1536", "?,2,2176", "9,3", "9", "10", "?,1024"),
    ("?,1536", "?,2,2176", "?,?", "9", "?", "?,1024"),
    ("?,1536", "?,2,2176", "?,?", "?", "10", "?,1024"),
    ("?,1536", "?,2,2176", "?,?", "5", "?", "?,1024"),
    ("?,1536", "?,2,2176", "?,?", "?", "?", "?,1000"),
    ("12,1536", "?,2,2176", "?,?", "?", "?", "13,1024"),
]


def _dims(text: str):
    return tuple(-1 if x == "?" else int(x) for x in text.split(",")) if text else ()


def _python_check(params, dims) -> str:
    try:
        core.check_shapes(params, [_dims(d) for d in dims[:-1]], [_dims(dims[-1])])
    except core.ShapeError as e:
        return f"error {e}"
    return "ok"


def test_configure_and_shape_change_check_dims_like_python(built):
    params = AttentionParams(8, 2, 128, page_size=16, max_batch=8, layer_index=3)
    create = create_line(BASE + [("page_size", "i", 16), ("max_batch", "i", 8),
                                 ("layer_index", "i", 3)])
    types = ["HALF", "UINT8", "INT32", "INT32", "INT32", "HALF"]
    lines, want = [create], ["ok"]
    for case in SHAPE_CASES:
        tensors = " ".join(f"{t}@{d}" for t, d in zip(types, case))
        lines += [f"configure {tensors}", f"shapechange {tensors}"]
        want += [_python_check(params, case)] * 2
    short = " ".join(f"{t}@{d}" for t, d in zip(types[1:], SHAPE_CASES[0][1:]))
    lines.append(f"configure {short}")
    want.append("error SawAttention takes 5 inputs (qkv, pool, block_tables, seq_lens, "
                "cu_q_lens), got 4")
    got = ask(built, lines)
    assert got == want
    assert want.count("ok") >= 5 and len(set(want)) > 10     # both outcomes are exercised


def test_configure_fails_when_the_kernel_library_is_missing(built):
    tensors = " ".join(f"{t}@{d}" for t, d in zip(["HALF", "UINT8", "INT32", "INT32", "INT32",
                                                   "HALF"], SHAPE_CASES[0]))
    _, got = ask(built, [create_line(BASE + [("page_size", "i", 16)]), f"configure {tensors}"],
                 kernel_lib="/nonexistent/libsawtrt_kernels.so")
    assert got.startswith("error SawAttention layer 0: kernel library libsawtrt_kernels.so not "
                          "loadable")
    assert "/nonexistent/libsawtrt_kernels.so" in got
    assert str(built.lib.parent / "libsawtrt_kernels.so") in got     # looked next to itself


# -- workspace and enqueue dispatch ---------------------------------------------------------------
class RecordingCapi:
    """The Python side of trt_plugin/harness/recording_kernels.c: the same workspace formula,
    the same text per call."""

    def __init__(self):
        self.calls = []

    @staticmethod
    def _cfg(c) -> str:
        return (f"cfg={c.num_q_heads},{c.num_kv_heads},{c.head_dim},{c.page_size},{c.kind},"
                f"{c.rotation_block},{c.rotate_v},{c.act_dtype},{c.sm_scale:.9g},"
                f"{int(bool(c.signs))}")

    def workspace_bytes(self, cfg, num_seqs, num_tokens, max_seq_len):
        self.calls.append(f"call workspace {self._cfg(cfg)} B={num_seqs} T={num_tokens} "
                          f"L={max_seq_len}")
        return 1000000 + 1000 * num_seqs + 10 * num_tokens + max_seq_len

    def attention_step_ptr(self, cfg, qkv, stride, pool, bt, max_pages, sl, cu, num_seqs,
                           num_tokens, max_q_len, max_seq_len, out, ws, ws_bytes, stream):
        ptrs = ",".join(hex(p) for p in (qkv, pool, bt, sl, cu, out, ws, stream))
        self.calls.append(f"call step {self._cfg(cfg)} ptrs={ptrs} stride={stride} "
                          f"max_pages={max_pages} B={num_seqs} T={num_tokens} max_q={max_q_len} "
                          f"L={max_seq_len} ws={ws_bytes}")
        if num_seqs == 7:
            raise RuntimeError("[10002] recording kernels: refused num_seqs 7")


@pytest.fixture
def recording(monkeypatch):
    capi = RecordingCapi()
    monkeypatch.setattr(core, "_capi", lambda: capi)
    return capi


WS_CASES = [  # params, qkv max, seq_lens max, block_tables max, act
    (dict(num_q_heads=8, num_kv_heads=2, head_dim=128, page_size=16, max_seq_len=512,
          max_batch=8), (64, 1536), (8,), (8, 32), "HALF"),
    (dict(num_q_heads=8, num_kv_heads=2, head_dim=128, page_size=16, max_seq_len=512,
          max_batch=8), (64, 1536), (20,), (20, 16), "BF16"),
    (dict(num_q_heads=32, num_kv_heads=8, head_dim=128, kv_kind="int4-bdr", sign_seed=3,
          rotate_v=1, max_seq_len=8192, max_batch=64), (2048, 6144), (64,), (64, -1), "BF16"),
    (dict(num_q_heads=16, num_kv_heads=16, head_dim=64, kv_kind="bf16", page_size=64,
          max_seq_len=4096, max_batch=256), (256, 3072), (256,), (256, 64), "HALF"),
    (dict(num_q_heads=12, num_kv_heads=4, head_dim=256, kv_kind="int8", page_size=32,
          max_seq_len=1000, max_batch=4), (4096, 5120), (4,), (4, 40), "HALF"),
]


def _ws_line(kw, qkv_max, sl_max, bt_max, act) -> str:
    p = AttentionParams(**kw)
    lay = p.layout
    pool = f"?,{p.num_kv_heads},{lay.head_block_bytes}"
    ts = [(act, "?," + str(p.qkv_width), ",".join(map(str, qkv_max))),
          ("UINT8", pool, pool.replace("?", "100")),
          ("INT32", "?,?", ",".join(str(x) if x >= 0 else "?" for x in bt_max)),
          ("INT32", "?", str(sl_max[0])), ("INT32", "?", str(sl_max[0] + 1)),
          (act, f"?,{p.out_width}", f"{qkv_max[0]},{p.out_width}")]
    return "workspace " + " ".join(f"{t}@{d}@{m}" for t, d, m in ts)


def _create_for(kw) -> str:
    return create_line([f for f in fields_of(AttentionParams(**kw)) if f[0] in kw])


@pytest.mark.parametrize("case", WS_CASES, ids=range(len(WS_CASES)))
def test_workspace_asks_the_c_abi_at_the_profile_maxima(built, recording, case):
    kw, qkv_max, sl_max, bt_max, act = case
    _, got = ask(built, [_create_for(kw), _ws_line(*case)])
    size = core.workspace_for_profile(AttentionParams(**kw), [qkv_max, (), bt_max, sl_max, ()],
                                      core.ACT_TYPES[act])
    assert got == " | ".join(recording.calls + [f"ok {size}"])


def test_workspace_from_the_real_kernel_library(built):
    """The same sizes as the Python plugin asks of the real library (loads on CPU)."""
    from sawtrt.kernels import library
    lib = library.try_load()
    if lib is None:
        pytest.skip("kernel library not built (python build_scripts/build.py --dev)")
    path = Path(lib._name)
    lines, want, sizes = [], [], []
    for case in WS_CASES:
        kw, qkv_max, sl_max, bt_max, act = case
        lines += [_create_for(kw), _ws_line(*case)]
        size = core.workspace_for_profile(AttentionParams(**kw),
                                          [qkv_max, (), bt_max, sl_max, ()], core.ACT_TYPES[act])
        sizes.append(size)
        want += ["ok", f"ok {size}"]
    # split-KV partials: none where sequences hold <= 256 tokens (16 pages of 16: never split),
    # some for every other profile
    assert sizes[1] == 0 and all(n > 0 for i, n in enumerate(sizes) if i != 1), sizes
    assert ask(built, lines, kernel_lib=path) == want


ENQ_CASES = [  # params, T, B, max_pages, pages, act
    (dict(num_q_heads=8, num_kv_heads=2, head_dim=128, page_size=16, max_seq_len=512,
          max_batch=8), 5, 3, 6, 40, "HALF"),                          # mixed
    (dict(num_q_heads=8, num_kv_heads=2, head_dim=128, page_size=16, max_seq_len=512,
          max_batch=8), 4, 4, 40, 40, "BF16"),                         # decode, L capped
    (dict(num_q_heads=32, num_kv_heads=8, head_dim=128, kv_kind="int4", dtype="bf16",
          max_seq_len=4096, max_batch=64), 300, 1, 5, 9, "BF16"),      # prefill
    (dict(num_q_heads=16, num_kv_heads=16, head_dim=64, kv_kind="bf16", page_size=64,
          sm_scale=0.2), 9, 2, 3, 10, "HALF"),
    (dict(num_q_heads=12, num_kv_heads=4, head_dim=256, kv_kind="int8", page_size=32,
          rotation_block=0), 3, 3, 2, 7, "BF16"),
    (dict(num_q_heads=8, num_kv_heads=2, head_dim=128, kv_kind="int4-bdr", rotation_block=32,
          rotate_v=1), 12, 2, 4, 9, "HALF"),
    (dict(num_q_heads=8, num_kv_heads=2, head_dim=128, max_batch=8), 7, 7, 2, 9, "HALF"),
    (dict(num_q_heads=8, num_kv_heads=2, head_dim=128, page_size=16, max_seq_len=512), 85, 2, 5,
     20, "BF16"),                       # T - B + 1 = 84 > max_pages * page = 80: max_q = 80
]


def _enqueue_descs(kw, T, Bn, max_pages, pages, act):
    p = AttentionParams(**kw)
    dims = [(T, p.qkv_width), (pages, p.num_kv_heads, p.layout.head_block_bytes), (Bn, max_pages),
            (Bn,), (Bn + 1,), (T, p.out_width)]
    types = [act, "UINT8", "INT32", "INT32", "INT32", act]
    return p, dims, types


def _enqueue_line(dims, types) -> str:
    return "enqueue " + " ".join(f"{t}@{','.join(map(str, d))}" for t, d in zip(types, dims))


@pytest.mark.parametrize("case", ENQ_CASES, ids=range(len(ENQ_CASES)))
def test_enqueue_hands_the_c_abi_what_the_python_plugin_does(built, recording, case):
    p, dims, types = _enqueue_descs(*case)
    descs = [SimpleNamespace(dims=d, type=t) for d, t in zip(dims, types)]
    try:
        core.enqueue(p, descs[:5], descs[5:], [0x1000 * (i + 1) for i in range(5)], [0x9000],
                     0xA000, 0xB000)
        want = "ok"
    except RuntimeError as e:
        want = f"error SawAttention layer {p.layer_index}: saw_attention_step failed: {e}"
    _, got = ask(built, [_create_for(case[0]).replace("BUILD", "RUNTIME"),
                         _enqueue_line(dims, types)])
    assert got == " | ".join(recording.calls + [want])
    assert "call step" in got
    if case is ENQ_CASES[-1]:
        assert " max_q=80 L=80 " in got


def test_enqueue_launches_nothing_in_the_build_phase_or_for_an_empty_batch(built):
    kw = ENQ_CASES[0][0]
    _, dims, types = _enqueue_descs(*ENQ_CASES[0])
    empty = [(0, dims[0][1]), dims[1], (0, 6), (0,), (1,), (0, dims[5][1])]
    got = ask(built, [_create_for(kw), _enqueue_line(dims, types),
                      _create_for(kw).replace("BUILD", "RUNTIME"), _enqueue_line(empty, types)])
    assert got == ["ok", "ok", "ok", "ok"]


def test_enqueue_rejects_what_the_python_plugin_rejects(built, recording):
    kw = ENQ_CASES[0][0]
    p, dims, types = _enqueue_descs(*ENQ_CASES[0])
    bad = [(dims, ["FLOAT", *types[1:5], "FLOAT"]),            # fp32 activations
           (dims, [*types[:5], "BF16"]),                          # out type != qkv type
           (dims, [types[0], "INT32", *types[2:]]),               # pool type
           ([(2, dims[0][1]), dims[1], (3, 6), (3,), (4,), (2, dims[5][1])], types),  # T < B
           ([dims[0], dims[1], (3, 6), (3,), (3,), dims[5]], types)]                 # cu size
    lines, want = [_create_for(kw).replace("BUILD", "RUNTIME")], ["ok"]
    for d, t in bad:
        descs = [SimpleNamespace(dims=x, type=y) for x, y in zip(d, t)]
        with pytest.raises((core.ShapeError, PluginParamError)) as e:
            core.enqueue(p, descs[:5], descs[5:], [1, 2, 3, 4, 5], [6], 7, 8)
        lines.append(_enqueue_line(d, t))
        want.append(f"error {e.value}")
    assert ask(built, lines) == want
    assert not recording.calls


def test_enqueue_with_signs_makes_its_device_buffer_or_says_why(built):
    """sign_seed >= 0 needs the signs on the device: on a machine without a GPU the plugin
    reports that it could not make them (and launches nothing)."""
    kw = dict(num_q_heads=8, num_kv_heads=2, head_dim=128, sign_seed=3)
    _, dims, types = _enqueue_descs(kw, 5, 3, 6, 40, "HALF")
    _, got = ask(built, [_create_for(kw).replace("BUILD", "RUNTIME"), _enqueue_line(dims, types)])
    try:
        import torch
        gpu = torch.cuda.is_available()
    except ImportError:
        gpu = False
    if gpu:
        assert got.endswith("ok") and ",1 ptrs=" in got           # cfg.signs set
    else:
        assert got.startswith("error SawAttention layer 0: sign_seed=3 needs the signs device "
                              "buffer, which could not be made: "), got
        assert "call step" not in got


# -- the build script -----------------------------------------------------------------------------
def test_build_skips_clearly_without_headers(monkeypatch, tmp_path):
    monkeypatch.delenv("TENSORRT_ROOT", raising=False)
    monkeypatch.setattr(B, "SYSTEM_TRT_INCLUDES", (str(tmp_path / "none"),))
    logs = []
    assert B.build_or_skip(tmp_path / "out", log=logs.append) is None
    assert logs and logs[0].startswith("TensorRT plugin: skipped (TensorRT headers "
                                       "(NvInferRuntime.h) not found in ")
    assert str(tmp_path / "none") in logs[0] and "--trt-include" in logs[0]
    assert not (tmp_path / "out" / B.LIB_NAME).exists()
    with pytest.raises(B.HeadersNotFound, match="--trt-include .* has no NvInferRuntime.h"):
        B.build(tmp_path / "out", trt_include=tmp_path)


def test_build_finds_headers_through_tensorrt_root(built, monkeypatch, tmp_path):
    monkeypatch.setenv("TENSORRT_ROOT", str(built.include.parent))
    monkeypatch.setattr(B, "SYSTEM_TRT_INCLUDES", ())
    assert B.find_trt_include() == built.include.resolve()
    assert B.trt_version(built.include).count(".") == 2


def test_self_registration_for_processes_that_only_dlopen_the_library(built):
    """Triton's TensorRT backend only dlopens `plugins=` libraries: with
    SAWTRT_TRT_PLUGIN_SELF_REGISTER=1 the library registers its creator with the loaded
    libnvinfer's registry (here a stand-in with the same entry points) and getCreators then
    offers nothing; a libnvinfer of another major, or none, is refused with a message."""
    major = B.trt_version(built.include).split(".")[0]
    fake = BUILD / "fake" / f"libnvinfer.so.{major}"
    fake.parent.mkdir(exist_ok=True)
    cuda = B.find_cuda()
    _compile([os.environ.get("CXX") or shutil.which("g++"), "-std=c++17", "-fPIC", "-shared",
              f"-isystem{built.include}", f"-isystem{cuda / 'include'}",
              str(HARNESS / "fake_nvinfer.cpp"), "-o", str(fake), f"-Wl,-soname,{fake.name}"])

    def run(**env):
        e = {k: v for k, v in os.environ.items() if k not in ("SAWTRT_TRT_PLUGIN_SELF_REGISTER",
                                                              "HARNESS_PRELOAD")}
        e.update(env, SAWTRT_KERNEL_LIB=str(built.recording))
        p = subprocess.run([str(built.harness), str(built.lib)], input="identity\n",
                           capture_output=True, text=True, env=e, timeout=60)
        assert p.returncode == 0, p.stdout + p.stderr
        return p.stdout.strip(), p.stderr

    out, _ = run(HARNESS_PRELOAD=str(fake), SAWTRT_TRT_PLUGIN_SELF_REGISTER="1")
    assert out == "call registerCreator SawAttention/1/sawtrt ns=sawtrt\ncreators=0"
    out, _ = run(HARNESS_PRELOAD=str(fake))                      # not asked: getCreators only
    assert out.startswith("creators=1 ")
    out, err = run(HARNESS_PRELOAD=str(fake), SAWTRT_TRT_PLUGIN_SELF_REGISTER="1",
                   FAKE_NVINFER_VERSION="90300")
    assert out.startswith("creators=1 ") and "not self-registering" in err and "90300" in err
    out, err = run(SAWTRT_TRT_PLUGIN_SELF_REGISTER="1")
    assert out.startswith("creators=1 ") and "no libnvinfer is loaded" in err


# -- sawtrt's TensorRT integration (sawtrt/trt/plugin_library.py) ----------------------------------
class FakeRegistry:
    def __init__(self):
        self.loaded = []

    def load_library(self, path):
        self.loaded.append(path)
        return object()


def test_register_prefers_the_compiled_library_and_falls_back_to_python(built, monkeypatch):
    from sawtrt.trt import plugin_library as PL
    monkeypatch.setenv("SAWTRT_TRT_PLUGIN_LIB", str(built.lib))
    reg = FakeRegistry()
    assert PL.register(SimpleNamespace(), registry=reg) == ("compiled", built.lib)
    assert PL.register(SimpleNamespace(), registry=reg) == ("compiled", built.lib)   # once
    assert reg.loaded == [str(built.lib)]

    monkeypatch.delenv("SAWTRT_TRT_PLUGIN_LIB")
    monkeypatch.setattr(PL, "find", lambda engine_dir=None: None)
    python_registered = []
    fake_plugin = SimpleNamespace(register=python_registered.append)
    import sawtrt.trt
    monkeypatch.setitem(sys.modules, "sawtrt.trt.plugin", fake_plugin)
    monkeypatch.setattr(sawtrt.trt, "plugin", fake_plugin, raising=False)
    reg2 = FakeRegistry()
    assert PL.register(SimpleNamespace(), registry=reg2) == ("python", None)
    assert python_registered == [reg2] and reg2.loaded == []


def test_engine_directory_carries_the_plugin_and_it_finds_the_kernels_there(built, monkeypatch,
                                                                            tmp_path):
    """install() puts the library next to model.plan; loaded from there with no
    $SAWTRT_KERNEL_LIB, the plugin finds the kernels in the engine's lib/ (here: the recording
    library under the kernel library's name)."""
    from sawtrt.trt import plugin_library as PL
    engine = tmp_path / "engine"
    (engine / "lib").mkdir(parents=True)
    shutil.copyfile(built.recording, engine / "lib" / PL.KERNEL_LIB_NAME)
    monkeypatch.setenv("SAWTRT_TRT_PLUGIN_LIB", str(built.lib))
    monkeypatch.setattr(PL, "_kernel_library_path", lambda engine_dir=None: None)
    info = PL.install(engine)
    assert info["library"] == PL.LIB_NAME and info["kernels"] == "lib/" + PL.KERNEL_LIB_NAME
    assert (engine / PL.LIB_NAME).read_bytes() == built.lib.read_bytes()
    monkeypatch.delenv("SAWTRT_TRT_PLUGIN_LIB")
    assert PL.find(engine) == engine / PL.LIB_NAME
    case = ENQ_CASES[0]
    line = _ws_line(case[0], (64, 1536), (8,), (8, 32), "HALF")
    _, got = ask(built, [_create_for(case[0]), line], kernel_lib="", plugin=engine / PL.LIB_NAME)
    assert got.startswith("call workspace ") and got.endswith("ok 1009152")   # 10^6 + 1000 B + 10 T + L
    # an engine without lib/ gets the kernel library beside the plugin
    bare = tmp_path / "bare"
    bare.mkdir()
    monkeypatch.setattr(PL, "_kernel_library_path", lambda engine_dir=None: built.recording)
    info = PL.install(bare, source=built.lib)
    assert info["kernels"] == PL.KERNEL_LIB_NAME and (bare / PL.KERNEL_LIB_NAME).is_file()


def test_harness_library_passes_the_callers_buffers(built):
    """The gpu test's path (harness as a library in the caller's process): enqueue hands the
    kernels exactly the addresses, workspace and stream it was given."""
    case = ENQ_CASES[0]
    _, dims, types = _enqueue_descs(*case)
    tensors = " ".join(f"{t}@{','.join(map(str, d))}" for t, d in zip(types, dims))
    code = f"""
import ctypes
h = ctypes.CDLL({str(BUILD / "libharness.so")!r})
for fn in ("harness_open", "harness_call", "harness_enqueue"):
    getattr(h, fn).restype = ctypes.c_char_p
assert h.harness_open({str(built.lib)!r}.encode()) == b"ok"
assert h.harness_call({_create_for(case[0]).replace("BUILD", "RUNTIME")!r}.encode()) == b"ok"
ptrs = (ctypes.c_uint64 * 5)(0x11, 0x22, 0x33, 0x44, 0x55)
print(h.harness_enqueue({tensors!r}.encode(), ptrs, ctypes.c_uint64(0x66),
                        ctypes.c_uint64(0x77), ctypes.c_uint64(0x88)).decode())
"""
    env = dict(os.environ, SAWTRT_KERNEL_LIB=str(built.recording))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert "ptrs=0x11,0x22,0x33,0x44,0x55,0x66,0x77,0x88 " in out.stdout
    assert out.stdout.rstrip().endswith("ok")


# -- on the GPU: enqueue with device buffers ------------------------------------------------------
GPU_CASES = [
    # policy, activation dtype, cached prefix per sequence, new tokens per sequence
    ("int4-bdr", "float16", [0, 37, 96], [54, 1, 1]),             # prefill + decode mixed
    ("int4-bdr", "bfloat16", [5, 15, 16, 63], [1, 1, 1, 1]),      # decode only
    ("int4-bdr", "bfloat16", [0, 0], [77, 8]),                     # prefill only
    ("int4-bdr:h=64,kv,seed=3", "float16", [0, 20], [97, 12]),     # signs, V rotated, chunks
    ("bf16", "float16", [0, 19, 70], [33, 1, 1]),
    ("bf16", "bfloat16", [3, 40], [1, 1]),
    ("bf16", "bfloat16", [0], [65]),
    ("int4", "bfloat16", [31, 0], [1, 17]),
    ("int8", "float16", [3, 9], [1, 1]),
]


@pytest.mark.gpu
@pytest.mark.parametrize("policy, dtype, prefix, new", GPU_CASES)
def test_compiled_enqueue_matches_reference_and_ops(policy, dtype, prefix, new):
    """The compiled plugin's enqueue, called in this process on torch device buffers, checked as
    tests/test_trt_enqueue.py checks the Python plugin (golden reference, same-pool reference,
    ops.attention_step on the same inputs)."""
    import torch
    from test_trt_enqueue import run_case
    from sawtrt.kernels import library
    kernel_lib = library.try_load()
    if kernel_lib is None:
        pytest.skip("kernel library not built")
    plugin_path = os.environ.get("SAWTRT_TRT_PLUGIN_LIB") or str(BUILD / B.LIB_NAME)
    harness_path = os.environ.get("SAWTRT_PLUGIN_HARNESS") or str(BUILD / "libharness.so")
    if not Path(plugin_path).is_file() or not Path(harness_path).is_file():
        pytest.skip("plugin library / harness library not built (see trt_plugin/README.md)")
    os.environ.setdefault("SAWTRT_KERNEL_LIB", str(kernel_lib._name))
    h = ctypes.CDLL(harness_path)
    for fn in ("harness_open", "harness_call", "harness_enqueue"):
        getattr(h, fn).restype = ctypes.c_char_p
    h.harness_call.argtypes = [ctypes.c_char_p]
    h.harness_enqueue.argtypes = [ctypes.c_char_p, ctypes.POINTER(ctypes.c_uint64),
                                  ctypes.c_uint64, ctypes.c_uint64, ctypes.c_uint64]
    assert h.harness_open(plugin_path.encode()) == b"ok"
    stream = torch.cuda.Stream()
    names = {torch.float16: "HALF", torch.bfloat16: "BF16", torch.int32: "INT32",
             torch.uint8: "UINT8"}
    used = {}

    def launch(params, in_desc, out_desc, in_ptrs, out_ptrs, ws_ptr, tensors):
        created = h.harness_call(create_line(fields_of(params), "RUNTIME").encode()).decode()
        assert created == "ok", created
        line = " ".join(f"{names[t.dtype]}@{','.join(map(str, t.shape))}" for t in tensors)
        ptrs = (ctypes.c_uint64 * 5)(*in_ptrs)
        with torch.cuda.stream(stream):
            got = h.harness_enqueue(line.encode(), ptrs, out_ptrs[0], ws_ptr,
                                    stream.cuda_stream).decode()
        stream.synchronize()
        assert got == "ok", got
        used["ok"] = True

    run_case(policy, getattr(torch, dtype), prefix, new, torch.device("cuda"), launch)
    assert used
