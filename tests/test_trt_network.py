"""The TensorRT decoder network, defined with the real binding's INetworkDefinition.

TensorRT-RTX (what CI installs) has no plugin layers, so here the attention layer is a stand-in
(the query columns) and the test checks the rest of the graph: every layer is accepted, shapes
infer with dynamic token counts, the output is fp32 [S, vocab], the profile covers the limits.
Building and running the real engine is tests/test_trt_engine.py (needs full TensorRT + GPU)."""
from __future__ import annotations

import pytest
import torch

from sawtrt.models.specs import ModelSpec
from sawtrt.spec import KVPolicy, PageLayout
from sawtrt.trt import compat

try:
    trt = compat.load()
except compat.TensorRTUnavailable as e:      # pragma: no cover
    pytest.skip(f"no TensorRT Python API: {e}", allow_module_level=True)

from sawtrt.trt import network as N  # noqa: E402


def tiny_spec(arch="qwen3", tie=True):
    return ModelSpec("tiny", arch, num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=2,
                     head_dim=64, intermediate_size=96, vocab_size=128, rope_theta=1e6,
                     rms_norm_eps=1e-6, tie_embeddings=tie, max_position=512,
                     qk_norm=arch == "qwen3")


def tiny_weights(spec, bias=False, lm_head=False):
    from sawtrt.models.weights import random_weights
    w = random_weights(spec, seed=0)
    if bias:
        for i in range(spec.num_layers):
            for n, size in (("q", spec.num_heads), ("k", spec.num_kv_heads),
                            ("v", spec.num_kv_heads)):
                w[f"model.layers.{i}.self_attn.{n}_proj.bias"] = torch.randn(
                    size * spec.head_dim).bfloat16()
    if lm_head:
        w["lm_head.weight"] = torch.randn(spec.vocab_size, spec.hidden_size).bfloat16()
    return w


def query_columns(dn, qkv, pool, layer):
    """Stand-in attention: [T, Hq*D] of the right shape and dtype (the q columns)."""
    s = dn.spec
    heads = dn.reshape(qkv, (0, s.num_heads + 2 * s.num_kv_heads, s.head_dim), f"sa{layer}.3d")
    q = dn.gather(heads, list(range(s.num_heads)), 1, f"sa{layer}.q")
    return dn.reshape(q, (0, s.num_heads * s.head_dim), f"sa{layer}.out")


class Collect(trt.ILogger):
    """Keeps TensorRT's error messages (API misuse shows up here, not as exceptions)."""

    def __init__(self):
        trt.ILogger.__init__(self)
        self.errors = []

    def log(self, severity, msg):
        if severity in (trt.ILogger.Severity.ERROR, trt.ILogger.Severity.INTERNAL_ERROR) and \
                "Cuda" not in msg:              # no GPU here: CUDA init errors are expected
            self.errors.append(msg)


def define(spec, weights, dtype=torch.bfloat16, attention=query_columns, limits=None,
           logger=None, policy="int4-bdr", kv_transform=None):
    builder = trt.Builder(logger or Collect())
    net = N.create_network(trt, builder)
    layout = PageLayout(KVPolicy.parse(policy), spec.head_dim, spec.num_kv_heads, 16)
    limits = limits or N.Limits.for_engine(max_batch=4, max_seq_len=256, page_size=16,
                                           max_tokens=64)
    dn = N.DecoderNetwork(trt, net, spec, layout, weights, dtype, limits, attention=attention,
                          kv_transform=kv_transform)
    out = dn.build()
    return builder, net, dn, out


@pytest.mark.parametrize("arch, tie, bias, dtype", [
    ("qwen3", True, False, torch.bfloat16),
    ("llama", False, True, torch.float16),
])
def test_network_defines_with_dynamic_tokens(arch, tie, bias, dtype):
    spec = tiny_spec(arch, tie)
    log = Collect()
    _, net, dn, out = define(spec, tiny_weights(spec, bias=bias, lm_head=not tie), dtype,
                             logger=log)
    assert log.errors == []
    assert out.name == "logits"
    assert tuple(out.shape) == (-1, spec.vocab_size)
    assert out.dtype == trt.DataType.FLOAT
    names = [net.get_input(i).name for i in range(net.num_inputs)]
    assert names == list(N.INPUT_NAMES) + [N.pool_name(i) for i in range(spec.num_layers)]
    pool = net.get_input(len(N.INPUT_NAMES))
    assert pool.dtype == trt.DataType.UINT8
    assert tuple(pool.shape) == (-1, spec.num_kv_heads, dn.layout.head_block_bytes)
    layer_names = {net.get_layer(i).name for i in range(net.num_layers)}
    for i in range(spec.num_layers):
        assert f"layers.{i}.qkv" in layer_names and f"layers.{i}.swiglu" in layer_names
        assert (f"layers.{i}.q_norm" in layer_names) == spec.qk_norm
        assert (f"layers.{i}.qkv.bias" in layer_names) == bias
    # the tensor fed to attention is [T, (Hq+2Hkv)*D] in the build dtype
    constants = [net.get_layer(i) for i in range(net.num_layers)
                 if net.get_layer(i).name.startswith("model.embed_tokens.weight")]
    assert len(constants) == 1          # a tied LM head reuses the embedding constant
    qkv = next(net.get_layer(i).get_output(0) for i in range(net.num_layers)
               if net.get_layer(i).name == "layers.0.qkv_rope.2d")
    assert tuple(qkv.shape) == (-1, (spec.num_heads + 2 * spec.num_kv_heads) * spec.head_dim)
    assert qkv.dtype == N.trt_dtype(trt, dtype)


@pytest.mark.parametrize("policy, layers", [
    ("int4-bdr:center", ("k_center",)),
    ("int4-bdr:center,balance=0.5", ("k_center", "k_balance", "q_balance")),
    ("int4-bdr:center,whiten", ("k_center", "k_whiten.to_tokens", "q_whiten.to_tokens"))])
def test_network_applies_the_policys_k_transform(policy, layers):
    """center / balance: the same constants CausalLM uses, between RoPE and the attention input,
    shapes unchanged; a policy that needs them and gets none is refused."""
    from sawtrt.models.kv_transform import KVCalibration, KVTransform
    spec = tiny_spec()
    w = tiny_weights(spec)
    cal = KVCalibration.identity(spec, "test")
    cal.k_mean += 0.5
    t = KVTransform(KVPolicy.parse(policy), cal, spec.num_heads, torch.bfloat16)
    log = Collect()
    _, net, _, _ = define(spec, w, logger=log, policy=policy, kv_transform=t)
    assert log.errors == []
    by_name = {net.get_layer(i).name: net.get_layer(i) for i in range(net.num_layers)}
    for i in range(spec.num_layers):
        for name in layers:
            out = by_name[f"layers.{i}.{name}"].get_output(0)
            heads = spec.num_heads if name.startswith("q") else spec.num_kv_heads
            assert tuple(out.shape) == (-1, heads, spec.head_dim)
    assert ("layers.0.k_balance" in by_name) == ("balance" in policy)
    # the attention input is built from the transformed q and k
    cat = by_name["layers.0.qkv_rope"]
    last_k, last_q = layers[-2:] if len(layers) == 3 else (layers[0], None)
    assert cat.get_input(1).name == by_name[f"layers.0.{last_k}"].get_output(0).name
    if last_q:
        assert cat.get_input(0).name == by_name[f"layers.0.{last_q}"].get_output(0).name
    with pytest.raises(N.NetworkBuildError, match="K transform"):
        define(spec, w, policy=policy)


def test_profile_covers_limits():
    spec = tiny_spec()
    lim = N.Limits.for_engine(max_batch=4, max_seq_len=256, page_size=16, max_tokens=64)
    _, _, dn, _ = define(spec, tiny_weights(spec), limits=lim)
    shapes = dn.profile_shapes()
    assert shapes["input_ids"] == ((1,), (4,), (64,))
    assert shapes["block_tables"][2] == (4, 16)
    assert shapes["cu_q_lens"] == ((2,), (5,), (5,))
    assert shapes[N.pool_name(1)][2] == (4 * 16 + 1, spec.num_kv_heads,   # + scratch page 0
                                         dn.layout.head_block_bytes)
    assert set(shapes) == set(N.INPUT_NAMES) | {N.pool_name(i) for i in range(2)}
    profile = trt.Builder(trt.Logger(trt.Logger.ERROR)).create_optimization_profile()
    for name, (mn, opt, mx) in shapes.items():
        profile.set_shape(name, mn, opt, mx)
    assert tuple(profile.get_shape("input_ids")[2]) == (64,)


def test_per_layer_pages_give_each_layer_its_pool_and_plugin_layout():
    """int8 pages for layer 1: its pool input and profile are int8-wide, its plugin gets the
    int8 layout, and it takes no K transform (layer 0 keeps it)."""
    from sawtrt.models.kv_transform import KVCalibration, KVTransform
    spec = tiny_spec()
    policy = "int4-bdr:center,int8=1"
    t = KVTransform(KVPolicy.parse(policy), KVCalibration.identity(spec, "test"), spec.num_heads,
                    torch.bfloat16)
    log = Collect()
    _, net, dn, _ = define(spec, tiny_weights(spec), logger=log, policy=policy, kv_transform=t)
    assert log.errors == []
    lay0, lay1 = dn.layout.for_layer(0), dn.layout.for_layer(1)
    assert lay1.policy == KVPolicy("int8") and lay0.head_block_bytes < lay1.head_block_bytes
    for i, lay in enumerate((lay0, lay1)):
        assert tuple(dn.pools[i].shape) == (-1, spec.num_kv_heads, lay.head_block_bytes)
        assert dn.profile_shapes()[N.pool_name(i)][2][2] == lay.head_block_bytes
        plugin_lay = dn.attention_params(i).layout      # (the K transform is model-side)
        assert (plugin_lay.policy.kind, plugin_lay.head_block_bytes) == (lay.policy.kind,
                                                                         lay.head_block_bytes)
    names = {net.get_layer(i).name for i in range(net.num_layers)}
    assert "layers.0.k_center" in names and "layers.1.k_center" not in names
    with pytest.raises(N.NetworkBuildError, match="the model has 2 layers"):
        define(spec, tiny_weights(spec), policy="int4-bdr:int8=2")


def test_attention_params_per_layer():
    spec = tiny_spec()
    _, _, dn, _ = define(spec, tiny_weights(spec))
    p = dn.attention_params(1)
    assert (p.layer_index, p.num_q_heads, p.num_kv_heads, p.head_dim) == (1, 4, 2, 64)
    assert p.layout == dn.layout and p.dtype == "bf16" and p.max_batch == 4
    assert p.max_seq_len == 256 and p.sm_scale == pytest.approx(64 ** -0.5)


def test_errors_are_plain():
    spec = tiny_spec()
    w = tiny_weights(spec)
    del w["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(N.NetworkBuildError, match="up_proj"):
        define(spec, w)
    with pytest.raises(N.NetworkBuildError, match="max_tokens=2 < max_batch=4"):
        N.Limits(4, 128, 2, 10)
    if not compat.has_plugin_layers(trt):
        with pytest.raises(N.NetworkBuildError, match="accept no plugin layers"):
            define(spec, tiny_weights(spec), attention=None)
    gemma = ModelSpec("g", "gemma3", 1, 64, 4, 1, 64, 96, 128, 1e6, 1e-6, True, 512, True)
    with pytest.raises(N.NetworkBuildError, match="gemma3"):
        define(gemma, {})
