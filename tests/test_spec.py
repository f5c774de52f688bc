import pytest
import torch

from sawtrt.spec import KVPolicy, PageLayout, PolicyError, split_policy_list


@pytest.mark.parametrize("text", ["bf16", "int8", "int4", "int4-bdr", "int4-bdr:h=64",
                                  "int4-bdr:h=16,kv,seed=3", "int4-bdr:kv"])
def test_policy_text_and_dict_round_trip(text):
    p = KVPolicy.parse(text)
    assert KVPolicy.parse(str(p)) == p
    assert KVPolicy.from_dict(p.to_dict()) == p


@pytest.mark.parametrize("text", ["int3", "int4:h=64", "int4-bdr:h=24", "int4-bdr:h=x",
                                  "int4-bdr:foo", "bf16:kv"])
def test_bad_policies_are_clear_errors(text):
    with pytest.raises(PolicyError):
        KVPolicy.parse(text)


def test_default_block_and_divisibility():
    assert PageLayout(KVPolicy.parse("int4-bdr"), 64, 1).policy.rotation_block == 64
    assert PageLayout(KVPolicy.parse("int4-bdr"), 256, 1).policy.rotation_block == 128
    with pytest.raises(PolicyError, match="does not divide"):
        PageLayout(KVPolicy.parse("int4-bdr:h=256"), 128, 8)
    with pytest.raises(PolicyError, match="head_dim"):
        PageLayout(KVPolicy.parse("int4"), 100, 8)


def test_bytes_per_token_match_the_design():
    # DESIGN.md: 64 + 64 + 4 + 4 = 136 bytes per token per KV head at D = 128, vs 512 in BF16
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
