import math

import pytest
import torch

from sawtrt import hadamard
from sawtrt.spec import KVPolicy

BLOCKS = [16, 32, 64, 128, 256]


@pytest.mark.parametrize("block", BLOCKS)
def test_fwht_equals_dense_hadamard(block):
    d = 256
    x = torch.randn(5, 3, d, dtype=torch.float64)
    h = hadamard.hadamard_matrix(block)
    dense = (x.reshape(5, 3, d // block, block) @ h).reshape(5, 3, d)
    torch.testing.assert_close(hadamard.fwht(x, block), dense, rtol=0, atol=1e-10)


@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("seed", [None, 7])
def test_rotation_is_orthogonal_and_preserves_dot(block, seed):
    d = 256
    signs = KVPolicy("int4-bdr", block, sign_seed=seed).signs(d)
    eye = torch.eye(d, dtype=torch.float64)
    r = hadamard.rotate(eye, block, signs)                 # rows: e_i R
    torch.testing.assert_close(r @ r.T, eye, rtol=0, atol=1e-12)
    q, k = torch.randn(10, d, dtype=torch.float64), torch.randn(10, d, dtype=torch.float64)
    qr, kr = hadamard.rotate(q, block, signs), hadamard.rotate(k, block, signs)
    torch.testing.assert_close((qr * kr).sum(-1), (q * k).sum(-1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(hadamard.inverse_rotate(qr, block, signs), q, rtol=0, atol=1e-12)


def test_rotation_spreads_an_outlier_channel():
    d, block = 128, 64
    x = torch.zeros(d)
    x[3] = 100.0
    y = hadamard.rotate(x, block)
    # one channel's energy is spread evenly over its whole block
    torch.testing.assert_close(y[:block].abs(), torch.full((block,), 100.0 / math.sqrt(block)))
    assert torch.all(y[block:] == 0)


@pytest.mark.parametrize("d,block", [(64, 128), (96, 64), (128, 24), (128, 8), (512, 512)])
def test_bad_block_is_a_clear_error(d, block):
    with pytest.raises(hadamard.RotationError, match="rotation block"):
        hadamard.rotate(torch.randn(2, d), block)
