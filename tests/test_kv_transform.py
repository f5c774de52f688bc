"""The policy's model-side K transforms (center / balance / whiten): the calibration file of an engine,
and the runtime's output with them (sawtrt.models.kv_transform)."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from runtime_helpers import build_tiny, digests, hf_checkpoint, tiny_spec
from sawtrt import kv_cache
from sawtrt.build import BuildOptions, build_engine
from sawtrt.engine.config import EngineConfigError
from sawtrt.engine.llm_engine import LLMEngine
from sawtrt.models import kv_transform as kvt
from sawtrt.models.model import AttentionMetadata, CausalLM
from sawtrt.models.weights import random_weights
from sawtrt.spec import KVPolicy, PageLayout

pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py


def _spd(shape, g):
    """Random well-conditioned second-moment matrices of `shape` [..., D, D]."""
    x = torch.randn(*shape[:-2], 4 * shape[-1], shape[-1], generator=g)
    return x.transpose(-1, -2) @ x / x.shape[-2] + 0.1 * torch.eye(shape[-1])


def _calibration(spec, seed=0, mean_scale=3.0):
    """Non-trivial statistics: |mu| a few times the typical K element, s spread over ~4x,
    random second-moment matrices."""
    g = torch.Generator().manual_seed(seed)
    shape = (spec.num_layers, spec.num_kv_heads, spec.head_dim)
    return kvt.KVCalibration(torch.randn(shape, generator=g) * mean_scale,
                             torch.rand(shape, generator=g) * 3 + 0.5,
                             torch.rand(shape, generator=g) * 3 + 0.5, {"source": "test"},
                             _spd(shape + (spec.head_dim,), g),
                             _spd(shape + (spec.head_dim,), g)).check(spec)


def test_whitening_is_the_optimum_and_generalises_the_balance():
    """A^2 = M solves M Sigma_k M = lambda Sigma_q (the stationarity condition of
    tr(Sigma_q M^-1) tr(Sigma_k M)); A is symmetric with det 1; for diagonal moments it is the
    balance=0.5 scale: A = diag(1 / s)."""
    g = torch.Generator().manual_seed(7)
    sk, sq = _spd((3, 16, 16), g).double(), _spd((3, 16, 16), g).double()
    a = kvt.whitening(sk, sq).double()
    assert torch.allclose(a, a.transpose(-1, -2), atol=1e-5)
    assert torch.allclose(torch.linalg.det(a), torch.ones(3, dtype=torch.float64), atol=1e-4)
    m = a @ a
    lhs, rhs = m @ sk @ m, sq
    lam = (lhs * rhs).sum((-1, -2)) / (rhs * rhs).sum((-1, -2))
    assert torch.allclose(lhs, lam[:, None, None] * rhs, rtol=1e-4, atol=1e-4)
    # diagonal second moments: the balance
    kr, qr = torch.rand(2, 3, 16, generator=g) + 0.2, torch.rand(2, 3, 16, generator=g) + 0.2
    cal = kvt.KVCalibration(torch.zeros(2, 3, 16), kr, qr, {}, torch.diag_embed(kr ** 2),
                            torch.diag_embed(qr ** 2))
    assert torch.allclose(cal.whitening(), torch.diag_embed(1 / cal.scales(0.5)), rtol=1e-4)


def _logits(spec, weights, policy, transform=None, n=37, page_size=16):
    """One prefill of n tokens through CausalLM (fp32, CPU: write_kv + paged_attention)."""
    layout = PageLayout(policy, spec.head_dim, spec.num_kv_heads, page_size)
    model = CausalLM(spec, layout, weights, dtype=torch.float32, kv_transform=transform)
    pages = -(-n // page_size)
    pool = kv_cache.new_pool(layout, spec.num_layers, pages)
    ids = torch.randint(0, spec.vocab_size, (n,), generator=torch.Generator().manual_seed(1))
    meta = AttentionMetadata(torch.arange(n), torch.arange(n),
                             torch.arange(pages, dtype=torch.int32)[None],
                             torch.tensor([n], dtype=torch.int32),
                             torch.tensor([n], dtype=torch.int32), torch.arange(n))
    return model(ids, meta, pool)


@pytest.fixture(scope="module")
def tiny():
    spec = tiny_spec("llama")
    return spec, random_weights(spec, seed=2, dtype=torch.float32)


@pytest.mark.parametrize("text", ["int4-bdr:h=16,center", "int4-bdr:h=16,center,balance=0.5",
                                  "int4-bdr:h=16,seed=3,balance=0.25", "int4:center"])
def test_identity_calibration_is_the_plain_policy_bit_for_bit(tiny, text):
    """mu = 0 and s = 1: k - 0, k * 1 and q * 1 are exact, so the served output is the plain
    policy's to the last bit (the transform adds no other arithmetic)."""
    spec, w = tiny
    pol = KVPolicy.parse(text)
    plain = dataclasses.replace(pol, k_center=False, k_balance=None)
    assert not plain.transforms_k
    t = kvt.KVTransform(pol, kvt.KVCalibration.identity(spec, "test"), spec.num_heads)
    assert torch.equal(_logits(spec, w, pol, t), _logits(spec, w, plain))


def test_transform_leaves_exact_attention_unchanged(tiny):
    """With a bf16 cache (K/V stored almost exactly) a large mu and a spread s change nothing
    but rounding: softmax ignores q.mu and s cancels in q.k. The same constants applied to V,
    or mu to q instead of K, change the output far beyond that tolerance (checked below, so a
    wrong transform cannot pass)."""
    spec, w = tiny
    cal = _calibration(spec)
    bf16 = KVPolicy("bf16")
    ref = _logits(spec, w, bf16)
    err = lambda x: float((x - ref).norm() / ref.norm())          # noqa: E731
    errs = {}
    for text in ("int4-bdr:center,balance=0.5", "int4-bdr:center,whiten"):   # what they do
        t = kvt.KVTransform(KVPolicy.parse(text), cal, spec.num_heads)
        errs[text] = err(_logits(spec, w, bf16, t))
    ok = max(errs.values())
    assert ok < 1.5e-2, errs     # measured 6e-3, 8e-3: bf16 rounding of k - mu (3x larger than k)

    class MeanOnQ(kvt.KVTransform):
        def __call__(self, layer, q, k):
            return q - self.k_mean[layer].repeat_interleave(q.shape[1] // k.shape[1], 0), k

    wrong_q = err(_logits(spec, w, bf16, MeanOnQ(KVPolicy.parse("int4:center"), cal,
                                                 spec.num_heads)))
    assert wrong_q > 10 * ok, (wrong_q, ok)      # measured 1.05
    # mu subtracted from V instead (the hook has no V: through the weights, v_proj bias = -mu)
    wv = dict(w)
    for i in range(spec.num_layers):
        wv[f"model.layers.{i}.self_attn.q_proj.bias"] = torch.zeros(spec.num_heads * spec.head_dim)
        wv[f"model.layers.{i}.self_attn.k_proj.bias"] = torch.zeros(
            spec.num_kv_heads * spec.head_dim)
        wv[f"model.layers.{i}.self_attn.v_proj.bias"] = -cal.k_mean[i].reshape(-1)
    wrong_v = err(_logits(spec, wv, bf16))
    assert wrong_v > 10 * ok, (wrong_v, ok)      # measured 1.44


def test_centring_and_balance_lower_the_error_of_offset_keys(tiny):
    """On keys with a common offset and uneven channels (like real K), the served transform
    with the model's own calibration brings int4-bdr closer to the exact cache."""
    spec, w = tiny
    w = dict(w)
    for i in range(spec.num_layers):          # a K bias: the offset centring removes
        w[f"model.layers.{i}.self_attn.q_proj.bias"] = torch.zeros(spec.num_heads * spec.head_dim)
        w[f"model.layers.{i}.self_attn.k_proj.bias"] = torch.randn(
            spec.num_kv_heads * spec.head_dim, generator=torch.Generator().manual_seed(i)) * 4
        w[f"model.layers.{i}.self_attn.v_proj.bias"] = torch.zeros(
            spec.num_kv_heads * spec.head_dim)
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, spec.vocab_size, (256,), generator=g).tolist()
    cal = kvt.calibrate(spec, w, kvt.calibration_windows(ids, None, tokens=256, window=128))
    ref = _logits(spec, w, KVPolicy("bf16"))
    err = {}
    for text in ("int4-bdr", "int4-bdr:center", "int4-bdr:center,balance=0.5",
                 "int4-bdr:center,whiten"):
        pol = KVPolicy.parse(text)
        t = kvt.KVTransform(pol, cal, spec.num_heads) if pol.transforms_k else None
        err[text] = float((_logits(spec, w, pol, t) - ref).norm() / ref.norm())
    assert err["int4-bdr:center"] < 0.8 * err["int4-bdr"], err
    assert err["int4-bdr:center,balance=0.5"] < err["int4-bdr"], err
    assert err["int4-bdr:center,whiten"] < err["int4-bdr"], err


def test_calibration_file_round_trip_and_errors(tmp_path, tiny):
    spec, _ = tiny
    cal = _calibration(spec)
    path = tmp_path / kvt.CALIBRATION_FILE
    digest = cal.save(path)
    back = kvt.KVCalibration.load(path, spec, digest)
    for name in kvt.STATS:
        assert torch.equal(getattr(back, name), getattr(cal, name))
    assert back.meta["source"] == "test"
    # the same numbers give the same bytes (config.json records the sha256), also with
    # several metadata entries
    cal.meta.update(tokens=1024, texts="a,b", whiten_shrink=0.1)
    first = cal.save(tmp_path / "again.safetensors")
    assert all(cal.save(tmp_path / f"again{i}.safetensors") == first for i in range(8))
    assert kvt.KVCalibration.load(tmp_path / "again.safetensors", spec).meta["tokens"] == "1024"
    s = back.scales(0.5)
    assert torch.allclose(s.log().mean(-1), torch.zeros(()), atol=1e-5)   # geometric mean 1
    assert torch.allclose(s[..., 1:] / s[..., :-1],
                          ((cal.k_rms / cal.q_rms) ** 0.5)[..., 1:]
                          / ((cal.k_rms / cal.q_rms) ** 0.5)[..., :-1], rtol=1e-5)
    with pytest.raises(kvt.KVCalibrationError, match="sha256"):
        kvt.KVCalibration.load(path, spec, "0" * 64)
    with pytest.raises(kvt.KVCalibrationError, match="missing"):
        kvt.KVCalibration.load(tmp_path / "nope.safetensors", spec)
    with pytest.raises(kvt.KVCalibrationError, match="shape"):
        kvt.KVCalibration.load(path, tiny_spec("llama", num_layers=3))
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(kvt.KVCalibrationError, match="readable"):
        kvt.KVCalibration.load(tmp_path / "bad.safetensors", spec)
    from safetensors.torch import save_file
    save_file({"k_mean": cal.k_mean}, str(tmp_path / "part.safetensors"))
    with pytest.raises(kvt.KVCalibrationError, match="lacks"):
        kvt.KVCalibration.load(tmp_path / "part.safetensors", spec)
    nan = _calibration(spec)
    nan.k_mean[0, 0, 0] = float("nan")
    with pytest.raises(kvt.KVCalibrationError, match="non-finite"):
        nan.check(spec)


def test_whiten_without_moments_is_a_clear_error(tmp_path, tiny):
    spec, _ = tiny
    path = tmp_path / kvt.CALIBRATION_FILE
    _calibration(spec).save(path)                    # moments=False: center / balance files
    cal = kvt.KVCalibration.load(path, spec)
    assert cal.k_moment is None
    kvt.KVTransform(KVPolicy.parse("int4-bdr:center,balance=0.5"), cal, spec.num_heads)
    with pytest.raises(kvt.KVCalibrationError, match="k_moment"):
        kvt.KVTransform(KVPolicy.parse("int4-bdr:center,whiten"), cal, spec.num_heads)


def test_model_refuses_a_transform_policy_without_its_transform(tiny):
    spec, w = tiny
    with pytest.raises(ValueError, match="K transform"):
        _logits(spec, w, KVPolicy.parse("int4-bdr:center"))


def test_build_writes_and_load_reads_the_calibration(tmp_path, monkeypatch):
    spec = tiny_spec("qwen3")
    hf_checkpoint(tmp_path / "ckpt", spec)
    opts = BuildOptions(model="my-qwen", checkpoint=str(tmp_path / "ckpt"),
                        kv_cache="int4-bdr:center,balance=0.5", page_size=16, max_seq_len=128,
                        compile_kernels=False, output=str(tmp_path / "eng"))
    logs = []
    out = build_engine(opts, log=logs.append, progress=False)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["kv_policy"] == "int4-bdr:h=16,center,balance=0.5"
    info = cfg["kv_calibration"]
    assert info["file"] == kvt.CALIBRATION_FILE and info["source"] == "calib"
    assert info["tokens"] == kvt.CALIBRATION_TOKENS
    assert digests(out)[kvt.CALIBRATION_FILE] == info["sha256"]
    # computed by the model itself on the calibration text: a real, non-zero mean
    cal = kvt.KVCalibration.load(out / kvt.CALIBRATION_FILE, spec)
    assert cal.k_mean.abs().max() > 1e-3
    eng = LLMEngine.from_engine_dir(out, device="cpu")
    t = eng.model.kv_transform
    assert torch.equal(t.k_mean, cal.k_mean) and torch.equal(t.q_scale[:, ::2], cal.scales(0.5))
    # idempotent: nothing rewritten on a second build
    first = digests(out)
    logs.clear()
    build_engine(opts, log=logs.append, progress=False)
    assert digests(out) == first and any("K calibration: up to date" in m for m in logs)
    # whiten needs the moment matrices: a new calibration file, not "up to date"
    opts.kv_cache = "int4-bdr:center,whiten"
    build_engine(opts, log=lambda m: None, progress=False)
    assert json.loads((out / "config.json").read_text())["kv_calibration"]["moments"] is True
    assert kvt.KVCalibration.load(out / kvt.CALIBRATION_FILE, spec).k_moment is not None
    assert LLMEngine.from_engine_dir(out, device="cpu").model.kv_transform.k_mat is not None
    opts.kv_cache = "int4-bdr:center,balance=0.5"
    build_engine(opts, log=lambda m: None, progress=False)
    # overriding the policy at load with one the file cannot serve: an engine config error
    with pytest.raises(EngineConfigError, match="whiten.*k_moment|k_moment"):
        LLMEngine.from_engine_dir(out, device="cpu", kv_policy="int4-bdr:center,whiten")
    # a calibration of an older recipe is redone (the recipe's version is one of its inputs)
    monkeypatch.setattr(kvt, "CALIBRATION_VERSION", kvt.CALIBRATION_VERSION + 1)
    logs.clear()
    build_engine(opts, log=logs.append, progress=False)
    assert any("K calibration: wrote" in m for m in logs)

    p = out / kvt.CALIBRATION_FILE
    p.write_bytes(p.read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(EngineConfigError, match="sha256"):
        LLMEngine.from_engine_dir(out, device="cpu")
    p.unlink()
    with pytest.raises(EngineConfigError, match="missing"):
        LLMEngine.from_engine_dir(out, device="cpu")
    # a plain policy removes the file and the config entry
    opts.kv_cache = "int4-bdr"
    build_engine(opts, log=lambda m: None, progress=False)
    assert not p.exists()
    assert "kv_calibration" not in json.loads((out / "config.json").read_text())


def test_random_weights_build_uses_the_identity_and_override_needs_a_calibration(tmp_path):
    spec = tiny_spec("qwen3")
    out = build_tiny(tmp_path, spec, kv_cache="int4-bdr:center,balance=0.5")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["kv_calibration"]["source"] == "identity"
    eng = LLMEngine.from_engine_dir(out, device="cpu")
    t = eng.model.kv_transform
    assert torch.equal(t.k_mean, torch.zeros_like(t.k_mean))
    plain = build_tiny(tmp_path, spec, kv_cache="int4-bdr")
    with pytest.raises(EngineConfigError, match="no.*calibration|has none"):
        LLMEngine.from_engine_dir(plain, device="cpu", kv_policy="int4-bdr:center")
