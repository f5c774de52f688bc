"""The held-out protocol of `sawtrt eval`: disjoint pinned texts, realisations and their spread,
the overfit check, the whitening shrinkage, and (slow) determinism on the real model."""
import math
import statistics

import pytest
import torch

from sawtrt.data import corpus
from sawtrt.eval import heldout as ho
from sawtrt.models import kv_transform as kvt
from sawtrt.spec import KVPolicy


def _available(name):
    try:
        return corpus.get_text(name)
    except corpus.CorpusError as e:
        pytest.skip(str(e))


# -- texts ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", corpus.EVAL_SOURCES + corpus.CALIB_SOURCES)
def test_packaged_texts_are_pinned_and_genred(name):
    t = _available(name)
    assert t.genre in ("technical", "legal", "conversational")
    if name in corpus.PINS:
        assert t.sha256 == corpus.PINS[name] and t.pinned
    d = t.describe()
    assert d["sha256"] == t.sha256 and d["source"] == name and d["chars"] == len(t.text)


def test_eval_and_calibration_cover_three_genres_each():
    assert {corpus.GENRES[s] for s in corpus.EVAL_SOURCES} == \
        {"technical", "legal", "conversational"}
    assert {corpus.GENRES[s] for s in corpus.CALIB_SOURCES} == \
        {corpus.GENRES[s] for s in corpus.EVAL_SOURCES}
    assert not set(corpus.EVAL_SOURCES) & set(corpus.CALIB_SOURCES)


def test_a_changed_text_is_refused():
    t = _available("chat")
    forged = corpus.Text("chat", t.text + " ", t.origin, t.genre)
    with pytest.raises(corpus.CorpusError, match="sha256"):
        corpus._pinned(forged)
    corpus._pinned(t)                     # the real one passes


def test_packaged_sources_are_disjoint():
    for n in corpus.EVAL_SOURCES + corpus.CALIB_SOURCES:
        _available(n)
    rows = corpus.check_disjoint(corpus.CALIB_SOURCES, corpus.EVAL_SOURCES)
    assert len(rows) == 9 and max(r["shared_passages"] for r in rows) < 0.01


def test_overlapping_calibration_is_refused(tmp_path):
    gpl = _available("gpl3")
    with pytest.raises(corpus.CorpusError, match="also evaluated"):
        corpus.check_disjoint(["gpl3"], ["gpl3", "pyref"])
    # a user's calibration file that quotes a fifth of the GPL
    words = gpl.text.split()
    quote = " ".join(words[: len(words) // 5])
    f = tmp_path / "mine.txt"
    f.write_text("Some words of my own to begin with.\n" + quote)
    with pytest.raises(corpus.CorpusError, match="shares"):
        corpus.check_disjoint([corpus.file_text(f)], ["gpl3"])
    # a short common phrase is no shared passage
    g = tmp_path / "other.txt"
    g.write_text("This program is free software, and this text shares only a phrase.")
    assert corpus.check_disjoint([corpus.file_text(g)], ["gpl3"])[0]["shared_passages"] == 0


def test_user_files(tmp_path):
    f = tmp_path / "notes.txt"
    f.write_text("hello there")
    t = corpus.file_text(f)
    assert t.name == "file:notes.txt" and not t.pinned and t.text == "hello there"
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(corpus.CorpusError, match="empty"):
        corpus.file_text(tmp_path / "empty.txt")
    with pytest.raises(corpus.CorpusError, match="cannot read"):
        corpus.file_text(tmp_path / "missing.txt")
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(corpus.CorpusError, match="cannot read"):
        corpus.file_text(tmp_path / "bin.txt")


def test_chat_prompts_are_held_out():
    _available("chat")
    prompts = corpus.chat_prompts(50)
    assert len(prompts) == len({p.lower() for p in prompts}) == 50
    calib = [_available(n).text.lower() for n in corpus.CALIB_SOURCES]
    assert not [p for p in prompts if any(p.lower() in c for c in calib)]
    with pytest.raises(corpus.CorpusError):
        corpus.chat_prompts(100000)


# -- realisations and their spread --------------------------------------------------------
def test_expand_seeds():
    p = KVPolicy.parse("int4-bdr:h=64,kv,center,whiten,int8=1+10")
    reals = ho.expand_seeds(p, 4)
    assert [r.sign_seed for r in reals] == [1, 2, 3, 4]
    assert all(r.k_whiten and r.layer_pages == p.layer_pages and r.rotate_v for r in reals)
    assert ho.expand_seeds(KVPolicy.parse("int4-bdr:seed=7"), 2)[1].sign_seed == 2
    assert [r.sign_seed for r in ho.expand_seeds(p, 3, first=5)] == [5, 6, 7]
    for unrotated in ("int8", "int4", "bf16"):
        assert ho.expand_seeds(KVPolicy.parse(unrotated), 4) == [KVPolicy.parse(unrotated)]


def test_spread_arithmetic():
    s = ho.spread([1.0, 2.0, 3.0, 6.0])
    assert s["mean"] == 3.0 and s["n"] == 4 and s["min"] == 1.0 and s["max"] == 6.0
    assert math.isclose(s["sd"], statistics.stdev([1, 2, 3, 6]))
    assert math.isclose(s["sd"], math.sqrt(((4 + 1 + 0 + 9) / 3)))
    assert math.isclose(s["se"], s["sd"] / 2)
    one = ho.spread([2.5])
    assert one["sd"] == 0.0 and one["mean"] == 2.5
    with pytest.raises(ValueError):
        ho.spread([])


def test_overfit_flag():
    assert not ho.overfit_flag(gain_heldout=3.0, gain_calib=3.5)     # keeps most of its gain
    assert ho.overfit_flag(gain_heldout=0.5, gain_calib=4.0)         # keeps an eighth
    assert ho.overfit_flag(gain_heldout=-1.0, gain_calib=1.0)        # hurts held-out text
    assert not ho.overfit_flag(gain_heldout=0.1, gain_calib=0.4)     # both within noise


class _FakeTok:
    bos_token_id = 0
    eos_token_id = 1

    def __call__(self, text, add_special_tokens=False):
        class R:
            input_ids = [2 + (hash(w) % 50) for w in text.split()]
        return R()


class _FakeScorer:
    """nll per token = base(source) + a policy- and seed-dependent offset: the protocol's
    arithmetic can be checked exactly."""
    runtime = None
    path = "fake"
    label = "fake"

    class cfg:
        sliding_window = None

    tok = _FakeTok()
    OFF = {"bf16": 0.0, "int4-bdr": 0.02, "int8": 0.001}

    def __init__(self):
        self.calls = 0

    def configure(self, *a):
        pass

    def score(self, policy, windows):
        self.calls += 1
        acc = {}
        for w in windows:
            base = {"pyref": 2.0, "gpl3": 1.5, "chat": 3.0}.get(w.source, 2.5)
            off = self.OFF[policy.kind] * (1 + 0.1 * (policy.sign_seed or 0))
            off -= 0.01 if policy.k_whiten else 0.0
            a = acc.setdefault(w.source, [0.0, 0])
            a[0] += (base + off) * w.scored
            a[1] += w.scored
        return acc

    def bytes_per_token(self, policy):
        return 100 * policy.bits


def test_default_window_fits_the_sliding_window():
    def cfg(sw):
        return type("Cfg", (), {"sliding_window": sw})
    bos, nobos = _FakeTok(), type("Tok", (), {"bos_token_id": None})()
    assert bos.bos_token_id is not None
    assert ho.default_window(cfg(512), bos) == 511            # Gemma-3-270M
    assert ho.default_window(cfg(None), bos) == 512
    assert ho.default_window(cfg(4096), bos) == 512
    assert ho.default_window(cfg(300), nobos) == 300
    assert ho.default_window(object(), bos) == 512


def test_protocol_arithmetic_with_a_fake_model():
    for n in corpus.EVAL_SOURCES + corpus.CALIB_SOURCES:
        _available(n)
    sc = _FakeScorer()
    res = ho.heldout(policies=["int8", "int4-bdr:h=64", "int4-bdr:h=64,kv,center,whiten"],
                     seeds=3, tokens=64, calib_tokens=32, window=32, log=lambda s: None,
                     scorer=sc)
    rows = {r["policy"]: r for r in res["results"]}
    assert res["scored_tokens"] == 3 * 64 and res["threads"] == torch.get_num_threads()
    assert [r["seed"] for r in rows["int4-bdr:h=64"]["realisations"]] == [1, 2, 3]
    assert len(rows["int8"]["realisations"]) == 1
    # every source's nll moves by the same offset: each per-source and pooled change is
    # exp(offset) - 1, and the realisations differ only by the seed's share
    for s in (1, 2, 3):
        want = 100 * (math.exp(0.02 * (1 + 0.1 * s)) - 1)
        r = rows["int4-bdr:h=64"]["realisations"][s - 1]
        assert math.isclose(r["delta_pct"], want, rel_tol=1e-9)
        assert all(math.isclose(v, want, rel_tol=1e-9) for v in r["per_source"].values())
    d = rows["int4-bdr:h=64"]["delta"]
    vals = [100 * (math.exp(0.02 * (1 + 0.1 * s)) - 1) for s in (1, 2, 3)]
    assert math.isclose(d["mean"], statistics.fmean(vals)) and \
        math.isclose(d["sd"], statistics.stdev(vals))
    w = rows["int4-bdr:h=64,kv,center,whiten"]
    # the transform's gain is 0.01 nats on either text: kept, not flagged
    assert w["overfit"] is False
    assert math.isclose(w["gain_calib"]["mean"], w["gain_heldout"]["mean"], rel_tol=1e-6)
    assert rows["int8"]["bytes_per_token"] == 800
    # memo: the same scorer and memo do not score a calibration-independent policy twice
    memo: dict = {}
    ho.heldout(policies=["int4-bdr:h=64"], seeds=2, tokens=32, window=32, overfit=False,
               log=lambda s: None, scorer=sc, memo=memo)
    before = sc.calls
    ho.heldout(policies=["int4-bdr:h=64"], seeds=2, tokens=32, window=32, overfit=False,
               log=lambda s: None, scorer=sc, memo=memo)
    assert sc.calls == before
    assert "held-out vs bf16" in ho.format_heldout(res)


# -- whitening shrinkage ------------------------------------------------------------------
def _moments(seed=0, d=16):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, 40, d, generator=g, dtype=torch.float64)
    x[..., :4] *= 30                                  # a few loud channels
    x[..., -3:] *= 1e-3                               # and directions text barely uses
    q = torch.randn(2, 3, 40, d, generator=g, dtype=torch.float64)
    mom = lambda t: t.transpose(-1, -2) @ t / t.shape[-2]        # noqa: E731
    return mom(x).float(), mom(q).float()


def test_shrinkage_regularises_the_whitening():
    k, q = _moments()
    a0 = kvt.whitening(k, q)
    assert torch.equal(a0, kvt.whitening(k, q, 0.0))
    a1 = kvt.whitening(k, q, 1.0)                     # both moments -> scaled identity
    assert torch.allclose(a1, torch.eye(16).expand_as(a1), atol=1e-5)
    cond = lambda a: torch.linalg.cond(a.double()).max().item()  # noqa: E731
    assert cond(kvt.whitening(k, q, 0.1)) < cond(a0) / 2
    m = kvt.shrink_moment(k, 0.25)
    tr = k.double().diagonal(dim1=-2, dim2=-1).sum(-1)
    assert torch.allclose(m.diagonal(dim1=-2, dim2=-1).sum(-1), tr)   # trace kept
    with pytest.raises(kvt.KVCalibrationError):
        kvt.shrink_moment(k, 1.5)


def test_shrinkage_travels_with_the_calibration_file(tmp_path):
    from sawtrt.models.specs import ModelSpec  # noqa: F401
    k, q = _moments(1)
    L, H, D = 2, 3, 16
    cal = kvt.KVCalibration(torch.zeros(L, H, D), torch.ones(L, H, D), torch.ones(L, H, D),
                            {"source": "test", "whiten_shrink": 0.2}, k, q)
    path = tmp_path / kvt.CALIBRATION_FILE
    cal.save(path, moments=True)

    class Spec:
        num_layers, num_kv_heads, head_dim = L, H, D
    back = kvt.KVCalibration.load(path, Spec)
    assert back.shrink == 0.2
    assert torch.allclose(back.whitening(), kvt.whitening(k, q, 0.2))
    old = kvt.KVCalibration(cal.k_mean, cal.k_rms, cal.q_rms, {"source": "old"}, k, q)
    assert old.shrink == 0.0 and torch.allclose(old.whitening(), kvt.whitening(k, q))


# -- the CLI ------------------------------------------------------------------------------
def test_cli_refuses_bad_text_files_and_variants(tmp_path):
    from click.testing import CliRunner
    from sawtrt.cli.eval import eval_cmd
    r = CliRunner().invoke(eval_cmd, ["--model", "smollm2-135m", "--eval-text",
                                      str(tmp_path / "nope.txt")])
    assert r.exit_code != 0 and "cannot read" in r.output
    r = CliRunner().invoke(eval_cmd, ["--model", "smollm2-135m", "--policies",
                                      "int4-bdr:h=64@clip"])
    assert r.exit_code != 0 and "same-source" in r.output


# -- the real model (slow) ----------------------------------------------------------------
@pytest.mark.slow
def test_heldout_is_deterministic_on_the_served_path():
    pytest.importorskip("transformers")
    from sawtrt.eval import hf_models
    try:
        hf_models.load("smollm2-135m")
    except hf_models.ModelUnavailable as e:
        pytest.skip(str(e))
    kw = dict(policies=["int4-bdr:h=64,kv,center,whiten"], seeds=2, tokens=64, window=64,
              calib_tokens=128, overfit=False, log=lambda s: None)
    a = ho.heldout("smollm2-135m", threads=1, **kw)
    b = ho.heldout("smollm2-135m", threads=1, **kw)
    ra, rb = a["results"][0]["realisations"], b["results"][0]["realisations"]
    assert [r["ppl"] for r in ra] == [r["ppl"] for r in rb]
    assert a["bf16_ppl"] == b["bf16_ppl"] and a["threads"] == 1
    assert ra[0]["ppl"] != ra[1]["ppl"]            # the seeds are different realisations
