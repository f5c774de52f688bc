"""The per-layer sensitivity ranking (sawtrt.calibration.layer_rank), the policy it suggests, and
`sawtrt build --rank-layers N`."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from click.testing import CliRunner

from runtime_helpers import build_tiny, digests, hf_checkpoint, tiny_spec
from sawtrt import kv_cache
from sawtrt.cli import main as cli
from sawtrt.build import BuildError, BuildOptions, build_engine, plan_build
from sawtrt.engine.llm_engine import LLMEngine
from sawtrt.calibration import layer_rank
from sawtrt.models import kv_transform as kvt
from sawtrt.models.model import AttentionMetadata, CausalLM
from sawtrt.models.weights import random_weights
from sawtrt.spec import KVPolicy, PageLayout, PolicyError

pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py

PAGE = 16


def _windows(spec, lengths=(41, 30), seed=5):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, spec.vocab_size, (n,), generator=g).tolist() for n in lengths]


def _full_model_log_probs(spec, weights, policy, ids, calibration=None):
    """log p of every next token from one prefill of the whole model (CausalLM.forward over
    the policy's pools: per-layer pools for a mixed policy)."""
    layout = PageLayout(policy, spec.head_dim, spec.num_kv_heads, PAGE)
    t = kvt.KVTransform(policy, calibration, spec.num_heads) if policy.transforms_k else None
    model = CausalLM(spec, layout, weights, dtype=torch.float32, kv_transform=t)
    n = len(ids)
    pages = -(-n // PAGE)
    pool = kv_cache.new_pool(layout, spec.num_layers, pages)
    meta = AttentionMetadata(torch.arange(n), torch.arange(n),
                             torch.arange(pages, dtype=torch.int32)[None],
                             torch.tensor([n], dtype=torch.int32),
                             torch.tensor([n], dtype=torch.int32), torch.arange(n - 1))
    return torch.log_softmax(model(torch.tensor(ids), meta, pool), -1)


@pytest.mark.parametrize("arch,text", [("llama", "int4-bdr:h=16,kv,center,whiten"),
                                       ("qwen3", "int4-bdr:h=16,center,balance=0.5"),
                                       ("llama", "int4")])
def test_fast_ranking_equals_the_full_mixed_model(arch, text):
    """Per layer l, the KL from recorded hidden states equals the KL of the whole model run
    with the policy `base,bf16=<every other layer>` (per-layer pools, K transform on layer l
    only) against the all-bf16 model: checks the shortcut and the per-layer pools together."""
    spec = tiny_spec(arch, num_layers=4)
    w = random_weights(spec, seed=4, dtype=torch.float32)
    base = KVPolicy.parse(text)
    ws = _windows(spec)
    cal = kvt.calibrate(spec, w, ws) if base.transforms_k else None
    seen = []
    ranking = layer_rank.rank_layers(spec, w, ws, base, cal, page_size=PAGE,
                                     progress=lambda d, t: seen.append((d, t)))
    total = layer_rank.layer_passes(spec.num_layers, len(ws))
    assert seen[-1] == (total, total) and len(seen) == total
    scored = sum(len(s) - 1 for s in ws)
    for l in range(spec.num_layers):
        others = tuple(i for i in range(spec.num_layers) if i != l)
        mixed = dataclasses.replace(base, layer_pages=(("bf16", others),))
        assert mixed.for_layer(l) == base and mixed.for_layer(others[0]) == KVPolicy("bf16")
        kl = dnll = 0.0
        for ids in ws:
            ref = _full_model_log_probs(spec, w, KVPolicy("bf16"), ids)
            lp = _full_model_log_probs(spec, w, mixed, ids, cal)
            tgt = torch.tensor(ids[1:])[:, None]
            kl += float((ref.exp() * (ref - lp)).sum())
            dnll += float(ref.gather(-1, tgt).sum() - lp.gather(-1, tgt).sum())
        row = ranking[l]
        assert row["layer"] == l and row["kl"] > 0
        assert row["kl"] == pytest.approx(kl / scored, rel=1e-6, abs=1e-12), (l, row, kl)
        assert row["dnll"] == pytest.approx(dnll / scored, rel=1e-5, abs=1e-9)
    assert sorted(r["rank"] for r in ranking) == [1, 2, 3, 4]
    assert sum(r["share"] for r in ranking) == pytest.approx(1.0)


def _with_key_offset(spec, weights, layer, scale=40.0, seed=9):
    """Layer `layer` gets a large K bias (and zero q/v biases) in the channel pair RoPE turns
    slowest (channels D/2 - 1 and D - 1: under a milliradian per position), so every key shares
    one big offset. Exact attention hardly sees it (q.(k + b) = q.k + q.b, one shift per query),
    but a per-token [min, max] of plain int4 spans the offset and leaves k itself a step or two."""
    w = dict(weights)
    g = torch.Generator().manual_seed(seed)
    d, hkv = spec.head_dim, spec.num_kv_heads
    for i in range(spec.num_layers):
        p = f"model.layers.{i}.self_attn."
        w[p + "q_proj.bias"] = torch.zeros(spec.num_heads * d)
        w[p + "k_proj.bias"] = torch.zeros(hkv * d)
        w[p + "v_proj.bias"] = torch.zeros(hkv * d)
    bias = torch.zeros(hkv, d)
    bias[:, [d // 2 - 1, d - 1]] = scale * torch.randn(hkv, 2, generator=g).sign()
    w[f"model.layers.{layer}.self_attn.k_proj.bias"] = bias.reshape(-1)
    return w


def test_a_layer_with_offset_keys_ranks_first_and_centring_fixes_it():
    spec = tiny_spec("llama", num_layers=4)
    w0 = random_weights(spec, seed=4, dtype=torch.float32)
    ws = _windows(spec)
    before = layer_rank.rank_layers(spec, w0, ws, KVPolicy.parse("int4"), page_size=PAGE)
    assert before[2]["rank"] > 1                       # measured: third of four
    w = _with_key_offset(spec, w0, layer=2)
    plain = layer_rank.rank_layers(spec, w, ws, KVPolicy.parse("int4"), page_size=PAGE)
    assert plain[2]["rank"] == 1 and plain[2]["share"] > 0.5, plain
    assert layer_rank.top_layers(plain, 1) == [2]
    # int4:center subtracts the calibrated mean K (the offset) in the ranked layer too
    centred = layer_rank.rank_layers(spec, w, ws, KVPolicy.parse("int4:center"),
                                     kvt.calibrate(spec, w, ws), page_size=PAGE)
    assert centred[2]["kl"] < plain[2]["kl"] / 10, (centred[2], plain[2])   # measured 1/80


def test_suggest_policy_and_its_errors():
    ranking = [{"layer": i, "kl": kl, "dnll": 0.0, "share": 0.0, "rank": r}
               for i, (kl, r) in enumerate([(1.0, 3), (3.0, 1), (0.5, 4), (2.0, 2)])]
    base = KVPolicy.parse("int4-bdr:h=64,kv,center,whiten")
    assert str(layer_rank.suggest_policy(base, ranking, 2)) == \
        "int4-bdr:h=64,kv,center,whiten,int8=1+3"
    assert str(layer_rank.suggest_policy(base, ranking, 1, kind="bf16")) == \
        "int4-bdr:h=64,kv,center,whiten,bf16=1"
    assert layer_rank.suggest_policy(base, ranking, 0) == base
    assert layer_rank.top_layers(ranking, 3) == [1, 3, 0]
    for n in (-1, 4):
        with pytest.raises(PolicyError, match="choose 0..3"):
            layer_rank.suggest_policy(base, ranking, n)
    with pytest.raises(PolicyError, match="already names per-layer pages"):
        layer_rank.suggest_policy(KVPolicy.parse("int4:int8=2"), ranking, 1)
    with pytest.raises(PolicyError, match="more precisely"):       # int8 does not widen int8
        layer_rank.suggest_policy(KVPolicy("int8"), ranking, 1)
    assert layer_rank.wide_kind(KVPolicy("int8")) == "bf16"
    assert layer_rank.wide_kind(KVPolicy("int4-bdr")) == "int8"
    assert "rank" in layer_rank.format_ranking(ranking, top=2).splitlines()[0]


def test_rank_layers_input_errors():
    spec = tiny_spec("llama")
    w = random_weights(spec, seed=4, dtype=torch.float32)
    ws = _windows(spec)
    with pytest.raises(PolicyError, match="reference"):
        layer_rank.rank_layers(spec, w, ws, KVPolicy("bf16"))
    with pytest.raises(ValueError, match="K calibration"):
        layer_rank.rank_layers(spec, w, ws, KVPolicy.parse("int4:center"))
    with pytest.raises(ValueError, match="at least 2 tokens"):
        layer_rank.rank_layers(spec, w, [[1]], KVPolicy("int4"))


@pytest.mark.parametrize("opts,msg", [
    (dict(random_weights=True), "random weights"),
    (dict(rank_layers=-1), r"in \[0, 1\]"),
    (dict(rank_layers=2), r"in \[0, 1\].*2 layers"),
    (dict(kv_cache="int4-bdr:int8=1"), "already names"),
    (dict(kv_cache="bf16"), "nothing to rank"),
])
def test_build_rank_layers_errors(tmp_path, opts, msg):
    spec = tiny_spec("qwen3")
    kw = dict(model="my-qwen", kv_cache="int4-bdr", rank_layers=1, output=str(tmp_path / "e"),
              compile_kernels=False)
    if opts.get("random_weights"):
        kw.update(model="tiny", spec=spec)
    else:
        hf_checkpoint(tmp_path / "ckpt", spec)
        kw["checkpoint"] = str(tmp_path / "ckpt")
    kw.update(opts)
    with pytest.raises(BuildError, match=msg):
        plan_build(BuildOptions(**kw))
    assert not (tmp_path / "e").exists()


def test_build_cli_rank_layers_error_is_clean(tmp_path):
    r = CliRunner().invoke(cli, ["build", "--model", "qwen3-0.6b", "--random-weights",
                                 "--rank-layers", "2", "--no-kernels", "--output",
                                 str(tmp_path / "e")])
    assert r.exit_code == 2 and "Traceback" not in r.output and "random weights" in r.output


def test_build_rank_layers_writes_the_policy_and_the_ranking(tmp_path):
    spec = tiny_spec("qwen3")
    hf_checkpoint(tmp_path / "ckpt", spec)
    opts = BuildOptions(model="my-qwen", checkpoint=str(tmp_path / "ckpt"),
                        kv_cache="int4-bdr:center,whiten", page_size=16, max_seq_len=128,
                        compile_kernels=False, output=str(tmp_path / "eng"), rank_layers=1)
    logs = []
    out = build_engine(opts, log=logs.append, progress=False)
    cfg = json.loads((out / "config.json").read_text())
    rank = cfg["extra"]["layer_rank"]
    assert len(rank["kl"]) == spec.num_layers and rank["tokens"] == 2 * (kvt.CALIBRATION_WINDOW - 1)
    top = max(range(spec.num_layers), key=lambda i: rank["kl"][i])
    assert rank["layers"] == [top] and rank["kind"] == "int8"
    assert cfg["kv_policy"] == f"int4-bdr:h=16,center,whiten,int8={top}"
    assert cfg["kv_calibration"]["moments"] is True
    # the ranking is the library's, on the engine's weights, calibration and calibration text
    from safetensors.torch import load_file
    from sawtrt.build import calibration_text_windows
    ws, _ = calibration_text_windows(spec, out)
    again = layer_rank.rank_layers(spec, load_file(str(out / "model.safetensors")), ws,
                                   KVPolicy.parse("int4-bdr:h=16,center,whiten"),
                                   kvt.KVCalibration.load(out / kvt.CALIBRATION_FILE, spec))
    assert [r["kl"] for r in again] == rank["kl"]
    eng = LLMEngine.from_engine_dir(out, device="cpu")
    assert eng.model.plain_layers == {top}
    # idempotent: the ranking is reused, nothing rewritten
    first = digests(out)
    logs.clear()
    build_engine(opts, log=logs.append, progress=False)
    assert digests(out) == first and any("layer rank: up to date" in m for m in logs)
    # N = 0 records the ranking (reused) and widens nothing; no flag: no ranking at all
    opts.rank_layers = 0
    build_engine(opts, log=lambda m: None, progress=False)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["kv_policy"] == "int4-bdr:h=16,center,whiten"
    kept = cfg["extra"]["layer_rank"]
    assert kept["kl"] == rank["kl"] and kept["layers"] == []
    opts.rank_layers = None
    build_engine(opts, log=lambda m: None, progress=False)
    assert "extra" not in json.loads((out / "config.json").read_text())


def test_build_without_the_flag_is_unchanged(tmp_path):
    spec = tiny_spec("llama")
    out = build_tiny(tmp_path, spec, kv_cache="int4-bdr")
    cfg = json.loads((out / "config.json").read_text())
    assert "extra" not in cfg and cfg["kv_policy"] == "int4-bdr:h=16"


@pytest.mark.parametrize("args,msg", [
    (["--model", "qwen3-4b"], "runtime path"),
    (["--model", "smollm2-135m", "--policy", "int4:int8=2"], "already names"),
    (["--model", "smollm2-135m", "--policy", "bf16"], "reference"),
    (["--model", "smollm2-135m", "--policy", "int5"], "unknown KV policy"),
])
def test_rank_layers_cli_rejects_bad_input_before_loading(args, msg):
    r = CliRunner().invoke(cli, ["rank-layers", *args])
    assert r.exit_code == 2 and "Traceback" not in r.output and msg in r.output, r.output
