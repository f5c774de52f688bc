"""sawtrt.eval without a model: fake quantization == the cache codec, variants, text, parsing."""
import hashlib
import re

import pytest
import torch

from sawtrt import hadamard, kv_cache
from sawtrt.data import corpus
from sawtrt.eval.kvquant import KVScheme, fake_quant, split_schemes
from sawtrt.eval.runner import agreement
from sawtrt.spec import KVPolicy, PageLayout, PolicyError


def _outlier_keys(n, hkv, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, hkv, d, generator=g)
    x[..., 3] *= 20.0                       # a channel outlier, like real K
    x[..., d // 2 + 1] += 8.0
    return x


@pytest.mark.parametrize("policy", ["bf16", "int8", "int4", "int4-bdr:h=16", "int4-bdr:h=64",
                                    "int4-bdr:h=32,kv,seed=3", "int4-bdr:h=256,kv"])
@pytest.mark.parametrize("d", [64, 256])
def test_fake_quant_is_the_cache_codec(policy, d):
    """fake_quant(x) == R^T decode(encode(x)) bit for bit, K and V, for every served policy."""
    pol = KVPolicy.parse(policy)
    if pol.rotated and d % pol.rotation_block:
        pytest.skip("block does not divide D")
    if pol.rotated and pol.rotation_block > d:
        pytest.skip("block larger than D")
    layout = PageLayout(pol, d, 2, 16)
    x = _outlier_keys(37, 2, d)
    for which, rotated in (("k", pol.rotated), ("v", pol.rotated and pol.rotate_v)):
        codes, params = kv_cache.encode(x, layout, rotated)
        y = kv_cache.decode(codes, params, layout)
        if rotated:
            y = hadamard.inverse_rotate(y, layout.policy.rotation_block, layout.policy.signs(d))
        assert torch.equal(fake_quant(x, pol, which), y)


def test_scheme_parsing_and_bytes():
    assert split_schemes("fp32,bf16,int4-bdr:h=32,kv,seed=1@konly,int4,int4-bdr:h=64,int8=0+1"
                         ) == ["fp32", "bf16", "int4-bdr:h=32,kv,seed=1@konly", "int4",
                               "int4-bdr:h=64,int8=0+1"]
    s = KVScheme.parse("int4-bdr:h=64,center,int8=0+1@v8")
    assert s.policy == KVPolicy.parse("int4-bdr:h=64,center,int8=0+1") and s.v8
    assert not s.is_plain and s.calibrated
    assert KVScheme.parse("int4-bdr:h=64").is_plain
    assert s.policy_for_layer(1).kind == "int8" and s.policy_for_layer(2).kind == "int4-bdr"
    assert s.policy_for(2, "v").kind == "int8" and s.policy_for(2, "k").kind == "int4-bdr"
    # SmolLM2-135M: 30 layers, 3 KV heads, D = 64
    assert KVScheme.parse("bf16").cache_bytes_per_token(30, 3, 64) == 30 * 3 * 2 * 128
    assert KVScheme.parse("int4").cache_bytes_per_token(30, 3, 64) == 30 * 3 * 2 * (32 + 4)
    assert KVScheme.parse("int4@vonly").cache_bytes_per_token(30, 3, 64) == 30 * 3 * (128 + 36)
    assert KVScheme.parse("int4-bdr:h=64,int8=0+1").cache_bytes_per_token(30, 3, 64) == \
        3 * (2 * 2 * 68 + 28 * 2 * 36)
    with pytest.raises(PolicyError, match="unknown eval option"):
        KVScheme.parse("int4@bogus")
    with pytest.raises(PolicyError, match="one of konly, vonly"):
        KVScheme.parse("int4@konly@vonly")
    with pytest.raises(PolicyError, match="unknown option"):     # the policy's own parser
        KVScheme.parse("int4:bogus@konly")


@pytest.mark.parametrize("old, new", [
    ("int4-bdr:h=64@center", "int4-bdr:h=64,center"),
    ("int4-bdr:h=64,kv@center@whitenraw@v8", "int4-bdr:h=64,kv,center,whiten@v8"),
    ("int4-bdr:h=64@center@balraw=0.5", "int4-bdr:h=64,center,balance=0.5"),
    ("int4-bdr@bal=0.5", "int4-bdr:balance=0.5"), ("int4@k8=13+14", "int4:int8=13+14"),
])
def test_served_variants_name_their_policy_option(old, new):
    with pytest.raises(PolicyError, match="policy options now: write " + re.escape(new) + "$"):
        KVScheme.parse(old)
    KVScheme.parse(new)                         # and what it names parses


@pytest.mark.parametrize("variant", ["clip", "lut", "vcenter", "balmax=0.5", "balrot=0.5",
                                     "vbal=0.5", "vwhiten"])
def test_prototypes_that_did_not_help_are_refused(variant):
    with pytest.raises(PolicyError, match="measured not to help"):
        KVScheme.parse(f"int4-bdr:h=64,center@{variant}")
    with pytest.raises(TypeError):                # nor reachable from Python
        KVScheme(KVPolicy.parse("int4"), **{variant.split("=")[0]: True})


def test_agreement():
    assert agreement([1, 2, 3, 4], [1, 2, 3, 4]) == {"first_divergence": None,
                                                     "identical_pct": 100.0, "tokens": 4}
    a = agreement([1, 2, 3, 4], [1, 9, 3, 4])
    assert a["first_divergence"] == 1 and a["identical_pct"] == 75.0


def test_texts_are_pinned():
    t = corpus.gpl3_text()
    assert hashlib.sha256(t.text.encode()).hexdigest() == corpus.GPL3_SHA256
    assert t.text.lstrip().startswith("GNU GENERAL PUBLIC LICENSE")
    assert t.text.endswith("END OF TERMS AND CONDITIONS")
    p = corpus.pyref_text()
    assert p.text.startswith("Objects, values and types") and "Execution model" in p.text
    assert corpus.calib_text().text[:200] not in p.text


def test_centering_keys_leaves_attention_unchanged():
    """The premise of the "center" variant: subtracting a fixed vector from every key shifts
    all scores of a query by the same amount, which softmax ignores."""
    from sawtrt.eval.hooks import KVHook
    g = torch.Generator().manual_seed(3)
    q = torch.randn(6, 9, 64, generator=g)     # [Hq, n, D]
    k = torch.randn(3, 9, 64, generator=g)     # [Hkv, L, D]
    v = torch.randn(3, 9, 64, generator=g)
    mu = torch.randn(3, 1, 64, generator=g) * 5
    a = KVHook._attend(q, k, v, 0.125)
    b = KVHook._attend(q, k - mu, v, 0.125)
    assert torch.allclose(a, b, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(a, KVHook._attend(q, k * 1.5, v, 0.125), rtol=1e-4, atol=1e-5)


def test_centring_shrinks_the_error_of_offset_keys():
    """Keys with a common channel offset (like real K): centring before BDR lowers the error
    (what the served `center` option does)."""
    g = torch.Generator().manual_seed(4)
    offset = torch.randn(64, generator=g) * 4
    k = torch.randn(400, 64, generator=g) + offset
    pol = KVPolicy.parse("int4-bdr:h=64")
    plain = (fake_quant(k, pol, "k") - k).pow(2).mean()
    centred = (fake_quant(k, pol, "k", mean=offset) - k).pow(2).mean()
    assert centred < 0.5 * plain


