import pytest
import torch

from sawtrt import quant
from sawtrt.spec import CLAMP


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("scale", [1e-3, 1.0, 300.0])
def test_error_is_at_most_half_a_step(bits, scale):
    x = torch.randn(500, 4, 128) * scale
    x[..., 7] *= 50   # an outlier channel widens the range but the bound must still hold
    codes, s, m = quant.quantize(x, bits)
    x = quant.sanitize(x)          # the bound holds for what is stored: |x| <= CLAMP
    assert codes.dtype == torch.uint8 and int(codes.max()) <= (1 << bits) - 1
    err = (quant.dequantize(codes, s, m) - x).abs()
    # fp32 arithmetic ((x - m) * (1/s), code * s + m) adds at most about one ulp of the
    # operands' magnitude on top of s/2 (measured worst: 0.96 * 2^-24 of it)
    mag = x.abs().amax(-1) + m.float().abs()
    assert torch.all(err <= s.float()[..., None] / 2 + mag[..., None] * 2.0**-22)
    # directed rounding: the stored range covers the data (to the same ulp)
    assert torch.all(m.float() <= x.amin(-1))
    assert torch.all(m.float() + (2**bits - 1) * s.float() >= x.amax(-1) - mag * 2.0**-22)


def test_constant_vector_rule():
    # a constant that fp16 represents: s = 0, codes 0, x_hat == x exactly
    x = torch.full((3, 2, 64), 0.75)
    x[1, 1] = -2.0
    codes, s, m = quant.quantize(x, 4)
    assert torch.all(s == 0) and torch.all(codes == 0)
    assert torch.equal(quant.dequantize(codes, s, m), x)
    # a constant fp16 cannot represent: m rounds down, s spans the gap, one code for all
    y = torch.full((4, 64), 0.7)
    codes, s, m = quant.quantize(y, 4)
    assert torch.all(codes == codes[..., :1])
    assert torch.all(s.float() < 1e-4)
    err = (quant.dequantize(codes, s, m) - y).abs()
    assert torch.all(err <= s.float()[..., None] / 2 + 1e-7)


def test_nan_and_inf_do_not_poison_neighbours():
    x = torch.randn(6, 3, 64)
    clean_codes, clean_s, clean_m = quant.quantize(x, 4)
    bad = x.clone()
    bad[2, 1, 5] = float("nan")
    bad[4, 0, 9] = float("inf")
    bad[4, 2, 0] = -float("inf")
    codes, s, m = quant.quantize(bad, 4)
    hit = torch.zeros(6, 3, dtype=torch.bool)
    hit[2, 1] = hit[4, 0] = hit[4, 2] = True
    # every other (token, head) is bit-identical to the clean run
    assert torch.equal(codes[~hit], clean_codes[~hit])
    assert torch.equal(s[~hit], clean_s[~hit]) and torch.equal(m[~hit], clean_m[~hit])
    # the hit ones follow the rule: the bad element is read as 0, the result is finite
    assert torch.isfinite(s).all() and torch.isfinite(m).all()
    rule = x.clone()
    rule[2, 1, 5] = rule[4, 0, 9] = rule[4, 2, 0] = 0.0
    rc, rs, rm = quant.quantize(rule, 4)
    assert torch.equal(codes, rc) and torch.equal(s, rs) and torch.equal(m, rm)


def test_huge_values_are_clamped_into_fp16_range():
    x = torch.randn(2, 64)
    x[0, 0] = 1e30
    codes, s, m = quant.quantize(x, 4)
    assert torch.isfinite(s.float()).all() and float(s[0]) * 15 >= CLAMP


def test_fp16_directed_rounding():
    x = torch.randn(100_000) * torch.logspace(-6, 4, 100_000)
    down, up = quant.fp16_round_down(x), quant.fp16_round_up(x)
    assert torch.all(down.float() <= x) and torch.all(up.float() >= x)
    # they are the same value or fp16 neighbours
    same = down.float() == up.float()
    assert torch.all(same | (quant._half_bits_step(down, up=True).float() == up.float()))
    exact = torch.tensor([0.5, -2.0, 65504.0, 0.0])
    assert torch.equal(quant.fp16_round_down(exact).float(), exact)


def test_int4_packing_order_and_round_trip():
    codes = torch.randint(0, 16, (7, 64), dtype=torch.uint8)
    packed = quant.pack_int4(codes)
    assert packed.shape == (7, 32)
    # documented order: element 2j in the low nibble, 2j+1 in the high nibble
    assert torch.equal(packed & 0xF, codes[:, 0::2]) and torch.equal(packed >> 4, codes[:, 1::2])
    assert torch.equal(quant.unpack_int4(packed), codes)
