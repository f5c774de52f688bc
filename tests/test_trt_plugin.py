"""SawAttention plugin class logic with the real TensorRT binding types (tensorrt, or the
TensorRT-RTX bindings that `pip install -e '.[dev]'` brings): creator and registry, fields ->
serialize -> create_plugin(RUNTIME), format negotiation, shapes, workspace sizing, clone /
attach_to_context, errors. No GPU: the C ABI is replaced by a recorder where a call would launch."""
from __future__ import annotations

import itertools
import math
import types

import numpy as np
import pytest

from sawtrt.spec import PageLayout, KVPolicy
from sawtrt.trt import compat, core
from sawtrt.trt.params import (FIELD_NAMES, FIELDS, AttentionParams, PluginParamError)

try:
    trt = compat.load()
except compat.TensorRTUnavailable as e:      # pragma: no cover - CI installs the bindings
    pytest.skip(f"no TensorRT Python API: {e}", allow_module_level=True)

from sawtrt.trt import plugin as P  # noqa: E402

DT = trt.DataType
QWEN3 = dict(num_q_heads=16, num_kv_heads=8, head_dim=128)      # qwen3-0.6b / 1.7b
SMOL = dict(num_q_heads=9, num_kv_heads=3, head_dim=64)         # smollm2-135m


def params(**kw):
    return AttentionParams(**{**QWEN3, **kw})


# -- serialization the way an engine does it: bytes per field, parsed back by type ----------------
_NP_OF = {trt.PluginFieldType.INT32: np.int32, trt.PluginFieldType.FLOAT32: np.float32,
          trt.PluginFieldType.CHAR: np.int8}


def serialize(fc) -> bytes:
    out = bytearray()
    for f in fc:
        name = f.name.encode()
        data = np.ascontiguousarray(f.data).tobytes()
        out += len(name).to_bytes(4, "little") + name
        out += int(f.type).to_bytes(4, "little") if hasattr(f.type, "__int__") else \
            f.type.value.to_bytes(4, "little")
        out += len(data).to_bytes(4, "little") + data
    return bytes(out)


def deserialize(blob: bytes):
    fields, keep, i = [], [], 0
    by_value = {t.value if hasattr(t, "value") else int(t): t for t in _NP_OF}
    while i < len(blob):
        n = int.from_bytes(blob[i:i + 4], "little"); i += 4
        name = blob[i:i + n].decode(); i += n
        typ = by_value[int.from_bytes(blob[i:i + 4], "little")]; i += 4
        m = int.from_bytes(blob[i:i + 4], "little"); i += 4
        arr = np.frombuffer(blob[i:i + m], dtype=_NP_OF[typ]).copy(); i += m
        keep += [name, arr]
        fields.append(trt.PluginField(name, arr, typ))
    return P._Fields(fields), keep


# -- fake descriptors with the real types ---------------------------------------------------------
def dyn_desc(dims, dtype, fmt=None, max_dims=None):
    d = trt.DynamicPluginTensorDesc()
    pd = trt.PluginTensorDesc()
    pd.dims = trt.Dims(list(dims))
    pd.type = dtype
    if fmt is not None:
        pd.format = fmt
    d.desc = pd
    d.min = trt.Dims([max(1, x) if x < 0 else x for x in dims])
    d.max = trt.Dims(list(max_dims if max_dims is not None else dims))
    d.opt = d.max
    return d


def tensor_desc(dims, dtype):
    pd = trt.PluginTensorDesc()
    pd.dims = trt.Dims(list(dims))
    pd.type = dtype
    return pd


def io_dims(p: AttentionParams, tokens=7, batch=3, max_pages=4, pages=32):
    lay = p.layout
    return [(tokens, p.qkv_width), (pages, p.num_kv_heads, lay.head_block_bytes),
            (batch, max_pages), (batch,), (batch + 1,)], [(tokens, p.out_width)]


# ===================================================================================================
def test_binding_is_real():
    assert hasattr(trt, "IPluginV3") and hasattr(trt, "IPluginCreatorV3One")
    assert issubclass(P.SawAttention, trt.IPluginV3)
    for base in (trt.IPluginV3OneCore, trt.IPluginV3OneBuild, trt.IPluginV3OneRuntime):
        assert issubclass(P.SawAttention, base)
    assert issubclass(P.SawAttentionCreator, trt.IPluginCreatorV3One)


def test_creator_identity_and_field_names():
    c = P.SawAttentionCreator()
    assert (c.name, c.plugin_namespace, c.plugin_version) == ("SawAttention", "sawtrt", "1")
    names = [f.name for f in c.field_names]
    assert names == list(FIELD_NAMES)
    kinds = {f.name: f.type for f in c.field_names}
    assert kinds["num_q_heads"] == trt.PluginFieldType.INT32
    assert kinds["kv_kind"] == trt.PluginFieldType.CHAR
    assert kinds["sm_scale"] == trt.PluginFieldType.FLOAT32


def test_register_is_idempotent_and_found_in_registry():
    c1 = P.register()
    c2 = P.register()
    assert c1 is c2
    found = trt.get_plugin_registry().get_creator("SawAttention", "1", "sawtrt")
    assert found is c1
    assert trt.get_plugin_registry().get_creator("SawAttention", "2", "sawtrt") is None


@pytest.mark.parametrize("kw", [
    {},
    dict(kv_kind="int4", page_size=16, layer_index=27, max_seq_len=40960, max_batch=1),
    dict(kv_kind="int4-bdr", rotation_block=32, rotate_v=1, sign_seed=12345, dtype="bf16"),
    dict(kv_kind="int8", dtype="fp16", sm_scale=0.125),
    dict(kv_kind="bf16", page_size=128),
    dict(**SMOL, kv_kind="int4-bdr", rotation_block=16),
    dict(num_q_heads=4, num_kv_heads=1, head_dim=256, sign_seed=0),     # gemma3-270m shape
])
def test_fields_serialize_create_plugin_runtime_round_trip(kw):
    p = params(**kw)
    plugin = P.create(p)                                   # BUILD phase, through the creator
    assert plugin.phase == trt.TensorRTPhase.BUILD
    assert plugin.params == p
    fc = plugin.get_fields_to_serialize()
    assert [f.name for f in fc] == list(FIELD_NAMES)       # every field is serialized
    blob = serialize(fc)
    fc2, _keep = deserialize(blob)
    rt = P.register().create_plugin("SawAttention", fc2, trt.TensorRTPhase.RUNTIME)
    assert isinstance(rt, P.SawAttention)
    assert rt.phase == trt.TensorRTPhase.RUNTIME
    assert rt.params == p
    assert rt.params.layout == p.layout
    assert serialize(rt.get_fields_to_serialize()) == blob
    assert (rt.plugin_name, rt.plugin_namespace, rt.plugin_version) == \
        ("SawAttention", "sawtrt", "1")
    assert rt.num_outputs == 1


def test_fields_survive_garbage_collection():
    import gc
    fc = P.plugin_fields(params(layer_index=5, kv_kind="int4", sign_seed=-1))
    gc.collect()
    _junk = [np.full(4096, 7, dtype=np.int32) for _ in range(64)]
    assert AttentionParams.from_fields((f.name, f.data) for f in fc).layer_index == 5


def test_char_fields_tolerate_nul_terminator():
    p = params(kv_kind="int8")
    fields = [(n, d) for n, d, _ in p.to_fields()]
    fields = [(n, np.append(d, 0).astype(np.int8) if n in ("kv_kind", "dtype") else d)
              for n, d in fields]
    assert AttentionParams.from_fields(fields) == p


def test_defaults_and_derived_values():
    p = AttentionParams.from_fields([("num_q_heads", [32]), ("num_kv_heads", [8]),
                                     ("head_dim", [128])])
    assert p.page_size == 64 and p.kv_kind == "int4-bdr" and p.dtype == "auto"
    assert p.policy == KVPolicy("int4-bdr")
    assert p.layout.policy.rotation_block == 128
    assert p.qkv_width == (32 + 16) * 128 and p.out_width == 32 * 128
    assert p.scale == pytest.approx(1 / math.sqrt(128))
    lay = PageLayout(KVPolicy.parse("int4-bdr:h=64,kv,seed=9"), 64, 3, 32)
    q = AttentionParams.from_layout(9, lay, layer_index=2)
    assert q.layout == lay and q.needs_signs and q.layer_index == 2


@pytest.mark.parametrize("fields, match", [
    ({"num_q_heads": 0}, "must be >= 1"),
    ({"num_q_heads": 12, "num_kv_heads": 8}, "not a multiple"),
    ({"num_q_heads": 34, "num_kv_heads": 2}, "GQA group 17"),
    ({"head_dim": 96}, "head_dim=96"),
    ({"page_size": 48}, "page_size=48"),
    ({"kv_kind": "int3"}, "unknown KV policy"),
    ({"kv_kind": "int4", "rotation_block": 64}, "takes no rotation options"),
    ({"kv_kind": "int8", "sign_seed": 3}, "takes no rotation options"),
    ({"rotation_block": 48}, "power of two"),
    ({"head_dim": 64, "rotation_block": 128}, "rotation"),
    ({"rotate_v": 2}, "rotate_v=2"),
    ({"sign_seed": -2}, "sign_seed=-2"),
    ({"max_seq_len": 0}, "max_seq_len=0"),
    ({"max_batch": -1}, "max_batch=-1"),
    ({"layer_index": -1}, "layer_index=-1"),
    ({"dtype": "fp32"}, "dtype='fp32'"),
    ({"sm_scale": float("nan")}, "sm_scale"),
    ({"num_q_heads": 1.5}, "integer"),
])
def test_bad_fields_raise_clear_errors(fields, match):
    with pytest.raises(PluginParamError, match=match):
        params(**fields)
    # and the same through the creator, as TensorRT would hit it
    good = dict(params().__dict__)
    good.update(fields)
    fc = []
    for f in FIELDS:
        v = good[f.name]
        if f.kind == "char":
            fc.append(trt.PluginField(f.name, np.frombuffer(v.encode(), np.int8).copy(),
                                      trt.PluginFieldType.CHAR))
        elif f.kind == "float32":
            fc.append(trt.PluginField(f.name, np.array([v], np.float32),
                                      trt.PluginFieldType.FLOAT32))
        else:
            fc.append(trt.PluginField(f.name, np.array([v], np.float64 if isinstance(v, float)
                                                       else np.int32),
                                      trt.PluginFieldType.INT32))
    coll = P._Fields(fc)
    with pytest.raises(PluginParamError, match="SawAttention"):
        P.register().create_plugin("SawAttention", coll, trt.TensorRTPhase.RUNTIME)


def test_unknown_missing_and_malformed_fields():
    with pytest.raises(PluginParamError, match="unknown field 'num_heads'"):
        AttentionParams.from_fields([("num_heads", [8])])
    with pytest.raises(PluginParamError, match=r"missing required field\(s\) \['head_dim'\]"):
        AttentionParams.from_fields([("num_q_heads", [8]), ("num_kv_heads", [8])])
    with pytest.raises(PluginParamError, match="exactly 1 value"):
        AttentionParams.from_fields([("num_q_heads", [8, 8]), ("num_kv_heads", [8]),
                                     ("head_dim", [64])])
    with pytest.raises(PluginParamError, match="given twice"):
        AttentionParams.from_fields([("num_q_heads", [8]), ("num_q_heads", [8])])
    with pytest.raises(PluginParamError, match="AttentionParams"):
        P.SawAttention({"num_q_heads": 8})


# -- format negotiation -------------------------------------------------------------------------
TYPES = [DT.FLOAT, DT.HALF, DT.BF16, DT.INT32, DT.UINT8, DT.INT8]


def _expected(p, pos, t, qkv_t):
    if pos == 0:
        return t in ({DT.HALF, DT.BF16} if p.dtype == "auto" else
                     {"fp16": {DT.HALF}, "bf16": {DT.BF16}}[p.dtype])
    if pos == 1:
        return t in (DT.UINT8, DT.INT8)
    if pos in (2, 3, 4):
        return t == DT.INT32
    return t == qkv_t and t in (DT.HALF, DT.BF16)


@pytest.mark.parametrize("dtype", ["auto", "fp16", "bf16"])
def test_format_negotiation_matrix(dtype):
    p = params(dtype=dtype)
    plugin = P.create(p)
    ins, outs = io_dims(p)
    dims = ins + outs
    checked = 0
    for qkv_t in TYPES:
        for pos in range(6):
            for t in TYPES:
                types_ = [qkv_t, DT.UINT8, DT.INT32, DT.INT32, DT.INT32, qkv_t]
                types_[pos] = t
                if pos == 0:
                    types_[5] = t
                io = [dyn_desc(d, ty) for d, ty in zip(dims, types_)]
                got = plugin.supports_format_combination(pos, io, 5)
                assert got == _expected(p, pos, t, types_[0]), (dtype, pos, t, qkv_t)
                checked += 1
    assert checked == 6 * 6 * 6


def test_format_negotiation_rejects_non_linear_and_wrong_arity():
    p = params()
    plugin = P.create(p)
    ins, outs = io_dims(p)
    types_ = [DT.HALF, DT.UINT8, DT.INT32, DT.INT32, DT.INT32, DT.HALF]
    io = [dyn_desc(d, t) for d, t in zip(ins + outs, types_)]
    assert all(plugin.supports_format_combination(i, io, 5) for i in range(6))
    for pos in range(6):
        bad = [dyn_desc(d, t, fmt=trt.TensorFormat.HWC if i == pos else None)
               for i, (d, t) in enumerate(zip(ins + outs, types_))]
        assert not plugin.supports_format_combination(pos, bad, 5)
    assert not plugin.supports_format_combination(0, io[:5], 4)
    assert not plugin.supports_format_combination(6, io, 5)


# -- shapes and types ------------------------------------------------------------------------------
def test_output_data_types_follow_qkv():
    plugin = P.create(params())
    for t in (DT.HALF, DT.BF16):
        assert plugin.get_output_data_types([t, DT.UINT8, DT.INT32, DT.INT32, DT.INT32]) == [t]
    with pytest.raises(core.ShapeError, match="5 inputs"):
        plugin.get_output_data_types([DT.HALF])


class _Expr:
    def __init__(self, v=None):
        self.v = v

    def is_constant(self):
        return self.v is not None

    def get_constant_value(self):
        return self.v


class _Builder:
    def constant(self, v):
        return _Expr(v)


def test_output_shapes(monkeypatch):
    monkeypatch.setattr(P, "_dims_exprs", list)     # a real builder makes IDimensionExprs
    p = params(**SMOL)
    plugin = P.create(p)
    tokens = _Expr()                                 # dynamic token count
    ins = [[tokens, _Expr(p.qkv_width)], [_Expr(), _Expr(3), _Expr(1)], [_Expr(), _Expr()],
           [_Expr()], [_Expr()]]
    (out,) = plugin.get_output_shapes(ins, [], _Builder())
    assert out[0] is tokens and out[1].get_constant_value() == 9 * 64
    ins[0] = [tokens, _Expr(p.qkv_width + 64)]
    with pytest.raises(core.ShapeError, match=f"{p.qkv_width + 64} columns"):
        plugin.get_output_shapes(ins, [], _Builder())
    ins[0] = [tokens]
    with pytest.raises(core.ShapeError, match="rank 2"):
        plugin.get_output_shapes(ins, [], _Builder())


def test_configure_and_shape_change_check_dims():
    p = params(**SMOL, page_size=16)
    plugin = P.create(p)
    ins, outs = io_dims(p, tokens=-1, batch=-1, max_pages=-1, pages=-1)
    types_ = [DT.HALF, DT.UINT8, DT.INT32, DT.INT32, DT.INT32]
    plugin.configure_plugin([dyn_desc(d, t) for d, t in zip(ins, types_)],
                            [dyn_desc(outs[0], DT.HALF)])
    ins, outs = io_dims(p, tokens=54, batch=2, max_pages=7, pages=100)
    plugin.on_shape_change([tensor_desc(d, t) for d, t in zip(ins, types_)],
                           [tensor_desc(outs[0], DT.HALF)])
    # the pool may also come as [pages, page_bytes]
    ins2 = list(ins)
    ins2[1] = (100, p.layout.page_bytes)
    plugin.on_shape_change([tensor_desc(d, t) for d, t in zip(ins2, types_)],
                           [tensor_desc(outs[0], DT.HALF)])
    cases = {
        0: ((54, p.qkv_width - 1), "qkv must be"),
        1: ((100, 3, p.layout.head_block_bytes + 16), "pool must be"),
        3: ((3,), "seq_lens must be"),
        4: ((2,), "cu_q_lens must be"),
    }
    for pos, (bad, match) in cases.items():
        b = list(ins)
        b[pos] = bad
        with pytest.raises(core.ShapeError, match=match):
            plugin.on_shape_change([tensor_desc(d, t) for d, t in zip(b, types_)],
                                   [tensor_desc(outs[0], DT.HALF)])
    with pytest.raises(core.ShapeError, match="out must be"):
        plugin.on_shape_change([tensor_desc(d, t) for d, t in zip(ins, types_)],
                               [tensor_desc((54, 9 * 64 + 1), DT.HALF)])
    big = P.create(p.replace(max_batch=1))
    with pytest.raises(core.ShapeError, match="max_batch=1"):
        big.on_shape_change([tensor_desc(d, t) for d, t in zip(ins, types_)],
                            [tensor_desc(outs[0], DT.HALF)])


# -- workspace and enqueue dispatch (C ABI replaced by a recorder) --------------------------------
class FakeCapi:
    """Records the C ABI calls core makes; workspace grows with every argument."""

    def __init__(self):
        self.calls = []

    def workspace_bytes(self, cfg, num_seqs, num_tokens, max_seq_len):
        self.calls.append(("workspace_bytes", cfg, num_seqs, num_tokens, max_seq_len))
        return 1000 * num_seqs + 10 * num_tokens + max_seq_len

    def attention_step_ptr(self, *args):
        self.calls.append(("attention_step_ptr",) + args)
        return 0


@pytest.fixture
def fake_capi(monkeypatch):
    fake = FakeCapi()
    monkeypatch.setattr(core, "_capi", lambda: fake)
    monkeypatch.setattr(core, "make_config",
                        lambda params, act, signs_ptr=0: ("cfg", params, act, signs_ptr))
    return fake


def test_workspace_uses_profile_maxima(fake_capi):
    p = params(page_size=16, max_seq_len=1000, max_batch=64)
    plugin = P.create(p)
    ins, outs = io_dims(p, tokens=-1, batch=-1, max_pages=-1, pages=-1)
    maxes, _ = io_dims(p, tokens=512, batch=32, max_pages=128, pages=4096)
    types_ = [DT.BF16, DT.UINT8, DT.INT32, DT.INT32, DT.INT32]
    descs = [dyn_desc(d, t, max_dims=m) for d, t, m in zip(ins, types_, maxes)]
    ws = plugin.get_workspace_size(descs, [dyn_desc(outs[0], DT.BF16, max_dims=(512, 2048))])
    # max_seq_len = min(field 1000, 128 pages * 16) = 1000; act dtype from qkv
    name, cfg, seqs, tokens, max_len = fake_capi.calls[-1]
    assert (name, seqs, tokens, max_len) == ("workspace_bytes", 32, 512, 1000)
    assert cfg[2] == "bf16"
    assert ws == 1000 * 32 + 10 * 512 + 1000
    maxes, _ = io_dims(p, tokens=8, batch=8, max_pages=4, pages=64)  # 4 pages * 16 < 1000
    descs = [dyn_desc(d, t, max_dims=m) for d, t, m in zip(ins, types_, maxes)]
    plugin.get_workspace_size(descs, [])
    assert fake_capi.calls[-1][2:] == (8, 8, 64)


def test_workspace_from_real_library_when_built():
    try:
        from sawtrt.kernels import capi  # noqa: F401
        p = params()
        real = core.workspace_size(p, 8, 8, 4096)
    except Exception as e:  # library not built on this machine
        pytest.skip(f"kernel library not loadable here: {type(e).__name__}: {e}")
    assert real >= core.workspace_size(p, 1, 1, 64) >= 0
    assert core.workspace_size(p, 0, 0, 4096) == 0


@pytest.mark.parametrize("tokens, batch, max_q", [(5, 5, 1), (54, 2, 53), (97, 3, 95), (1, 1, 1)])
def test_enqueue_dispatches_the_c_abi_with_its_own_fields(fake_capi, tokens, batch, max_q):
    p = params(**SMOL, page_size=16, max_seq_len=100, kv_kind="int4-bdr")
    plugin = P.create(p, trt.TensorRTPhase.RUNTIME)
    ins, outs = io_dims(p, tokens=tokens, batch=batch, max_pages=8, pages=40)
    types_ = [DT.HALF, DT.UINT8, DT.INT32, DT.INT32, DT.INT32]
    in_desc = [tensor_desc(d, t) for d, t in zip(ins, types_)]
    out_desc = [tensor_desc(outs[0], DT.HALF)]
    ptrs = [0x1000, 0x2000, 0x3000, 0x4000, 0x5000]
    plugin.enqueue(in_desc, out_desc, ptrs, [0x6000], 0x7000, 0x8000)
    ws_call, step = fake_capi.calls[-2], fake_capi.calls[-1]
    assert ws_call[2:] == (batch, tokens, 100)         # min(100, 8 pages * 16 = 128)
    (name, cfg, qkv, stride, pool, bt, max_pages, sl, cu, nseq, ntok, mq, msl, out, wsp, wsb,
     stream) = step
    assert name == "attention_step_ptr" and cfg[1] == p and cfg[2] == "fp16" and cfg[3] == 0
    assert (qkv, pool, bt, sl, cu, out, wsp, stream) == \
        (0x1000, 0x2000, 0x3000, 0x4000, 0x5000, 0x6000, 0x7000, 0x8000)
    assert (stride, max_pages, nseq, ntok, mq, msl) == ((9 + 6) * 64, 8, batch, tokens, max_q,
                                                         100)
    assert wsb == 1000 * batch + 10 * tokens + 100


def test_enqueue_empty_batch_launches_nothing(fake_capi):
    p = params()
    plugin = P.create(p, trt.TensorRTPhase.RUNTIME)
    ins, outs = io_dims(p, tokens=0, batch=0, max_pages=4, pages=8)
    types_ = [DT.HALF, DT.UINT8, DT.INT32, DT.INT32, DT.INT32]
    plugin.enqueue([tensor_desc(d, t) for d, t in zip(ins, types_)],
                   [tensor_desc(outs[0], DT.HALF)], [1, 2, 3, 4, 5], [6], 7, 8)
    assert fake_capi.calls == []


def test_enqueue_rejects_bad_types_and_token_counts(fake_capi):
    p = params()
    plugin = P.create(p, trt.TensorRTPhase.RUNTIME)
    ins, outs = io_dims(p, tokens=4, batch=2)
    good = [DT.HALF, DT.UINT8, DT.INT32, DT.INT32, DT.INT32]
    bad = [DT.FLOAT] + good[1:]
    with pytest.raises(core.ShapeError, match="FLOAT at position 0"):
        plugin.enqueue([tensor_desc(d, t) for d, t in zip(ins, bad)],
                       [tensor_desc(outs[0], DT.FLOAT)], [1] * 5, [1], 0, 0)
    with pytest.raises(core.ShapeError, match="position 5"):
        plugin.enqueue([tensor_desc(d, t) for d, t in zip(ins, good)],
                       [tensor_desc(outs[0], DT.BF16)], [1] * 5, [1], 0, 0)
    ins, outs = io_dims(p, tokens=2, batch=3)
    with pytest.raises(core.ShapeError, match="each sequence needs >= 1 new token"):
        plugin.enqueue([tensor_desc(d, t) for d, t in zip(ins, good)],
                       [tensor_desc(outs[0], DT.HALF)], [1] * 5, [1], 0, 0)
    assert not any(c[0] == "attention_step_ptr" for c in fake_capi.calls)


def test_enqueue_with_signs_needs_the_buffer(fake_capi):
    p = params(sign_seed=7)
    ins, outs = io_dims(p, tokens=2, batch=2)
    good = [DT.HALF, DT.UINT8, DT.INT32, DT.INT32, DT.INT32]
    with pytest.raises(PluginParamError, match="signs device buffer"):
        core.enqueue(p, [tensor_desc(d, t) for d, t in zip(ins, good)],
                     [tensor_desc(outs[0], DT.HALF)], [1] * 5, [1], 0, 0, signs_ptr=0)


# -- clone / attach_to_context ---------------------------------------------------------------------
def test_clone_and_attach_to_context_copy_deeply():
    p = params(layer_index=3, sign_seed=11, dtype="bf16")
    plugin = P.create(p, trt.TensorRTPhase.RUNTIME)
    for copy in (plugin.clone(), plugin.attach_to_context(None)):
        assert isinstance(copy, P.SawAttention) and copy is not plugin
        assert copy.params == p and copy.phase == plugin.phase
        assert serialize(copy.get_fields_to_serialize()) == \
            serialize(plugin.get_fields_to_serialize())
        assert copy._signs is not plugin._signs and not copy.signs_allocated
        assert copy.timing_cache_id == plugin.timing_cache_id
    plugin.destroy()
    assert plugin.params == p       # destroy releases device state only


def test_timing_cache_id_ignores_layer_index():
    a, b = P.create(params(layer_index=0)), P.create(params(layer_index=17))
    assert a.timing_cache_id == b.timing_cache_id
    assert P.create(params(kv_kind="int8")).timing_cache_id != a.timing_cache_id


def test_get_capability_interface_returns_self():
    plugin = P.create(params())
    for cap in (trt.PluginCapabilityType.CORE, trt.PluginCapabilityType.BUILD,
                trt.PluginCapabilityType.RUNTIME):
        assert plugin.get_capability_interface(cap) is plugin


def test_compat_reports_engine_path():
    mod, reason = compat.full_tensorrt()
    if mod is None:
        assert "TensorRT not importable" in reason or "add_plugin_v3" in reason
        if compat.flavor(trt) == "tensorrt_rtx":
            assert "no plugin" in reason
    else:
        assert compat.has_plugin_layers(mod) and reason is None


def test_readme_documents_every_field_and_the_register_entry_point(capsys):
    from pathlib import Path
    readme = (Path(__file__).resolve().parents[1] / "trt_plugin" / "README.md").read_text()
    rows = {}
    for line in readme.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 5 and cells[1].startswith("`") and cells[0].startswith("`"):
            rows[cells[1].strip("`")] = (cells[0].strip("`"), cells[2], cells[3])
    for f in FIELDS:
        assert f.name in rows, f"README lacks field {f.name}"
        kind, version, default = rows[f.name]
        assert (kind, version) == (f.kind, f.version)
        assert default.strip("`") == ("required" if f.default is None else str(f.default))
    import trt_plugin
    import importlib
    reg = importlib.import_module("trt_plugin.register")
    assert trt_plugin.SawAttention is P.SawAttention
    assert reg.main() == 0
    assert "sawtrt::SawAttention v1" in capsys.readouterr().out
