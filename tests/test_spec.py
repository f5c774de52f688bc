import pytest
import torch

from sawtrt.spec import KVPolicy, PageLayout, PolicyError, split_policy_list


@pytest.mark.parametrize("text", ["bf16", "int8", "int4", "int4-bdr", "int4-bdr:h=64",
                                  "int4-bdr:h=16,kv,seed=3", "int4-bdr:kv", "int4-bdr:h=64,center",
                                  "int4-bdr:h=64,seed=2,center,balance=0.5", "int4:center",
                                  "int8:balance=0.25", "int4-bdr:h=64,kv,seed=1,center,whiten",
                                  "int4-bdr:h=64,kv,center,whiten,int8=19+1+10", "int4:bf16=0,int8=3+2",
                                  "int8:bf16=1"])
def test_policy_text_and_dict_round_trip(text):
    p = KVPolicy.parse(text)
    assert KVPolicy.parse(str(p)) == p
    assert KVPolicy.from_dict(p.to_dict()) == p


@pytest.mark.parametrize("text, msg", [
    ("int3", "unknown KV policy"), ("int4:h=64", "no rotation options"),
    ("int4-bdr:h=24", "power of two"), ("int4-bdr:h=x", "bad KV policy"),
    ("int4-bdr:foo", "unknown option"), ("bf16:kv", "no rotation options"),
    ("bf16:center", "nothing a bf16 cache"), ("bf16:balance=0.5", "nothing a bf16 cache"),
    ("int4-bdr:balance=0", r"\(0, 1\]"), ("int4-bdr:balance=1.5", r"\(0, 1\]"),
    ("int4-bdr:balance", "unknown option"), ("int4-bdr:center=1", "unknown option"),
    ("int4-bdr:balance=x", "bad KV policy"), ("bf16:whiten", "nothing a bf16 cache"),
    ("int4-bdr:whiten,balance=0.5", "full-matrix form"), ("int4-bdr:whiten=1", "unknown option"),
    ("int4:int8=1,bf16=1", "named twice"), ("int4:int8=1+1", "named twice"),
    ("bf16:int8=1", "nothing more precisely"), ("int8:int8=1", "nothing more precisely"),
    ("int4:int8=", "bad KV policy"), ("int4:int8=-2", ">= 0"), ("int4:int4=1", "unknown option"),
    ("int4:int8=1,int8=2", "given twice"), ("int4:int8", "unknown option"),
    ("int4-bdr:h=64,h=32", "'h' given twice"), ("int4-bdr:k,kv", "'kv' given twice"),
    ("int4-bdr:rotate=kv,k", "given twice"), ("int4-bdr:seed=1,seed=1", "given twice"),
    ("int4:center,center", "given twice"), ("int8:balance=0.5,balance=0.25", "given twice")])
def test_bad_policies_are_clear_errors(text, msg):
    with pytest.raises(PolicyError, match=msg):
        KVPolicy.parse(text)


def test_k_transform_options_keep_old_configs_and_layouts():
    """center / balance are model-side: the layout (bytes, offsets) is the plain policy's, and
    a policy without them serialises exactly as before they existed."""
    plain, cen = KVPolicy.parse("int4-bdr:h=64"), KVPolicy.parse("int4-bdr:h=64,center,balance=0.5")
    assert plain.to_dict() == {"kind": "int4-bdr", "rotation_block": 64, "rotate_v": False,
                               "sign_seed": None}
    assert cen.to_dict()["k_center"] is True and cen.to_dict()["k_balance"] == 0.5
    assert cen.transforms_k and not plain.transforms_k
    a, b = PageLayout(plain, 64, 3), PageLayout(cen, 64, 3)
    assert (a.token_bytes, a.head_block_bytes, a.v_params) == (b.token_bytes, b.head_block_bytes,
                                                               b.v_params)


def test_policy_text_is_exact_for_any_balance():
    """The text form is what config.json stores: it parses back to the same float."""
    for a in (0.5, 1 / 3, 0.123456789, 1.0):
        p = KVPolicy(kind="int4", k_balance=a)
        assert KVPolicy.parse(str(p)).k_balance == a
    assert str(KVPolicy(kind="int4", k_balance=0.5)) == "int4:balance=0.5"


def test_layout_record_holds_the_policy_text_and_reads_the_old_field_form():
    lay = PageLayout(KVPolicy.parse("int4-bdr:kv,seed=4,int8=2"), 128, 2, 32)
    d = lay.to_dict()
    assert d["policy"] == "int4-bdr:h=128,kv,seed=4,int8=2"
    assert PageLayout.from_dict(d) == lay
    assert PageLayout.from_dict(dict(d, policy=lay.policy.to_dict())) == lay


@pytest.mark.parametrize("page_size", [0, 1, 8, 48, 256])
def test_page_size_is_the_spec_invariant(page_size):
    with pytest.raises(PolicyError, match=f"page size {page_size} must be one of 16, 32, 64, 128"):
        PageLayout(KVPolicy.parse("int4"), 128, 2, page_size)


def test_default_block_and_divisibility():
    assert PageLayout(KVPolicy.parse("int4-bdr"), 64, 1).policy.rotation_block == 64
    assert PageLayout(KVPolicy.parse("int4-bdr"), 256, 1).policy.rotation_block == 128
    with pytest.raises(PolicyError, match="does not divide"):
        PageLayout(KVPolicy.parse("int4-bdr:h=256"), 128, 8)
    with pytest.raises(PolicyError, match="head_dim"):
        PageLayout(KVPolicy.parse("int4"), 100, 8)


def test_bytes_per_token_match_the_design():
    # docs/design.md: 64 + 64 + 4 + 4 = 136 bytes per token per KV head at D = 128, vs 512 in BF16
    assert PageLayout(KVPolicy.parse("int4-bdr"), 128, 8).token_bytes == 136
    assert PageLayout(KVPolicy.parse("bf16"), 128, 8).token_bytes == 512
    lay = PageLayout(KVPolicy.parse("int4"), 128, 8, page_size=64)
    # regions are contiguous, ordered, 16-byte aligned and tile the head block exactly
    offs = [lay.k_codes, lay.k_params, lay.v_codes, lay.v_params, lay.head_block_bytes]
    assert offs == sorted(offs) and all(o % 16 == 0 for o in offs)
    assert lay.head_block_bytes == 64 * 136 and lay.page_bytes == 8 * 64 * 136


def test_signs_are_deterministic_and_balanced():
    a = KVPolicy("int4-bdr", sign_seed=5).signs(256)
    assert torch.equal(a, KVPolicy("int4-bdr", sign_seed=5).signs(256))
    assert not torch.equal(a, KVPolicy("int4-bdr", sign_seed=6).signs(256))
    assert set(a.tolist()) == {-1.0, 1.0} and abs(a.sum().item()) < 64
    assert KVPolicy("int4-bdr").signs(128) is None


def test_policy_lists_keep_options_with_their_policy():
    assert split_policy_list("bf16, int4,int4-bdr:h=32,kv,seed=1;int4-bdr:rotate=kv") == [
        "bf16", "int4", "int4-bdr:h=32,kv,seed=1", "int4-bdr:rotate=kv"]
    assert [str(KVPolicy.parse(p)) for p in split_policy_list("int4-bdr:h=64,kv,int8")] == [
        "int4-bdr:h=64,kv", "int8"]
    assert split_policy_list("int4-bdr:h=64,center,balance=0.5,int4:center,bf16") == [
        "int4-bdr:h=64,center,balance=0.5", "int4:center", "bf16"]


def test_per_layer_pages_layout():
    """SmolLM2 shape (30 layers, 3 KV heads, D = 64): int8 pages for three layers cost
    3 x 192 B/token more than uniform int4 (docs/accuracy.md: 7 056 vs 6 480 B/token)."""
    pol = KVPolicy.parse("int4-bdr:h=64,kv,center,whiten,int8=1+10+19")
    assert pol.mixed and pol.wide_layers == (1, 10, 19) and str(pol).endswith(",int8=1+10+19")
    assert pol.for_layer(10) == KVPolicy("int8") and pol.for_layer(2) == pol.base
    assert not pol.base.mixed and pol.base.k_whiten and pol.base.rotate_v
    lay = PageLayout(pol, 64, 3)
    uniform = PageLayout(pol.base, 64, 3)
    assert lay.bytes_per_token(30) == 7056 and uniform.bytes_per_token(30) == 6480
    assert lay.for_layer(1) == PageLayout(KVPolicy("int8"), 64, 3)
    assert lay.for_layer(0) == uniform and uniform.for_layer(1) is uniform
    assert lay.pool_page_bytes(30) == 27 * uniform.page_bytes + 3 * lay.for_layer(1).page_bytes
    with pytest.raises(PolicyError, match="per layer"):
        lay.token_bytes                                      # noqa: B018 (a mixed layout has none)
    with pytest.raises(PolicyError, match=r"layer\(s\) \[19\]; the model has 12"):
        lay.layers(12)
    d = lay.to_dict()
    assert d["head_block_bytes"] == uniform.head_block_bytes
    assert d["layer_head_block_bytes"] == {"int8": lay.for_layer(1).head_block_bytes}
    assert PageLayout.from_dict(d) == lay
    assert "layer_head_block_bytes" not in uniform.to_dict()
    with pytest.raises(PolicyError, match="layer_head_block_bytes disagrees"):
        PageLayout.from_dict(dict(d, layer_head_block_bytes={"int8": 1}))
    with pytest.raises(PolicyError, match="mapping"):
        KVPolicy.from_dict(dict(pol.to_dict(), layer_pages=[1, 10]))
    # a policy list splits around the per-layer option, "int8" alone is a policy
    assert split_policy_list("int4-bdr:h=64,int8=1+2,int8,bf16,int4:bf16=0") == [
        "int4-bdr:h=64,int8=1+2", "int8", "bf16", "int4:bf16=0"]


def test_per_layer_pages_bad_config_values_are_policy_errors():
    for bad in ({"int8": 3}, {"int8": ["x"]}, {"fp8": [1]}, {"int8": []}):
        with pytest.raises(PolicyError):
            KVPolicy.from_dict({"kind": "int4", "layer_pages": bad})
