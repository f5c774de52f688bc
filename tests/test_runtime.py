"""The runtime API contract (SamplingParams, LLMEngine, LLM) and `sawtrt build` / `generate`
on tiny random-weight engines."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from runtime_helpers import build_tiny, digests, hf_checkpoint, tiny_spec
from sawtrt.cli import main as cli
from sawtrt.build import BuildError, BuildOptions, build_engine, plan_build
from sawtrt.engine.llm import LLM
from sawtrt.engine.llm_engine import LLMEngine
from sawtrt.engine.sampling import SamplingParams

pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny(tmp_path_factory.mktemp("tiny"), tiny_spec("qwen3"), kv_cache="int4-bdr",
                      max_seq_len=64, max_batch=8)


@pytest.fixture()
def engine(tiny_dir):
    return LLMEngine.from_engine_dir(tiny_dir, device="cpu")


def drain(engine):
    outs = {}
    while engine.has_unfinished():
        for o in engine.step():
            outs.setdefault(o.request_id, []).append(o)
    return outs


# -- SamplingParams ------------------------------------------------------------------------------
@pytest.mark.parametrize("kw,msg", [
    ({"max_tokens": -1}, "max_tokens"), ({"max_tokens": 10 ** 9}, "absurd"),
    ({"max_tokens": 2.5}, "int"), ({"temperature": -0.1}, "temperature"),
    ({"temperature": float("nan")}, "finite"), ({"temperature": 1e6}, "absurd"),
    ({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p"), ({"top_k": -1}, "top_k"),
    ({"seed": -3}, "seed"), ({"stop": ("",)}, "stop"), ({"stop": tuple("x" * 17)}, "stop"),
])
def test_sampling_params_validate(kw, msg):
    with pytest.raises(ValueError, match=msg):
        SamplingParams(**kw).validate()


def test_sampling_params_defaults_valid():
    p = SamplingParams().validate()
    assert (p.max_tokens, p.temperature, p.top_k, p.top_p, p.seed, p.stop, p.ignore_eos) == \
        (64, 0.0, 0, 1.0, None, (), False)
    assert SamplingParams(stop="ab").validate().stop == ("ab",)


# -- LLMEngine -----------------------------------------------------------------------------------
def test_add_request_rejects_before_allocating(engine):
    for prompt in ("", []):
        with pytest.raises(ValueError, match="empty"):
            engine.add_request("a", prompt, SamplingParams())
    with pytest.raises(ValueError, match="max_seq_len"):
        engine.add_request("a", [5] * engine.max_seq_len, SamplingParams())
    with pytest.raises(ValueError, match="token ids"):
        engine.add_request("a", [5, 10 ** 6], SamplingParams())
    with pytest.raises(ValueError, match="top_p"):
        engine.add_request("a", [5], SamplingParams(top_p=2.0))
    assert not engine.has_unfinished()
    engine.add_request("a", [5, 6], SamplingParams(max_tokens=2))
    with pytest.raises(ValueError, match="duplicate"):
        engine.add_request("a", [7], SamplingParams())
    assert engine.kv_cache_usage()["used_pages"] == 0           # nothing allocated yet
    outs = drain(engine)
    assert [o.finished for o in outs["a"]] == [False, True]
    assert engine.kv_cache_usage() == {"used_pages": 0, "total_pages": engine.kv_cache_usage()[
        "total_pages"], "page_size": 16}


def test_step_outputs_and_lengths(engine):
    engine.add_request("x", [1, 2, 3], SamplingParams(max_tokens=5, ignore_eos=True))
    engine.add_request("z", [4], SamplingParams(max_tokens=0))
    engine.add_request("edge", [9] * (engine.max_seq_len - 2),
                       SamplingParams(max_tokens=50, ignore_eos=True))
    outs = drain(engine)
    x = outs["x"]
    assert sum(len(o.new_token_ids) for o in x) == 5
    assert x[-1].finished and x[-1].finish_reason == "length"
    assert all(not o.finished for o in x[:-1])
    assert [o.num_output_tokens for o in x] == [1, 2, 3, 4, 5]
    assert all(o.num_prompt_tokens == 3 for o in x)
    assert outs["z"][0].finished and outs["z"][0].new_token_ids == [] and \
        outs["z"][0].finish_reason == "length"
    # prompt + output never exceed max_seq_len
    assert outs["edge"][-1].num_output_tokens == 2 and outs["edge"][-1].finish_reason == "length"
    assert engine.kv_cache_usage()["used_pages"] == 0


def test_eos_stops_unless_ignored(engine):
    engine.add_request("ref", [3, 1, 4], SamplingParams(max_tokens=8, ignore_eos=True))
    ref = [t for o in drain(engine)["ref"] for t in o.new_token_ids]
    eos = ref[3]
    engine.eos_token_ids = {eos}
    engine.add_request("a", [3, 1, 4], SamplingParams(max_tokens=8))
    engine.add_request("b", [3, 1, 4], SamplingParams(max_tokens=8, ignore_eos=True))
    outs = drain(engine)
    a = [t for o in outs["a"] for t in o.new_token_ids]
    assert a == ref[:ref.index(eos) + 1] and outs["a"][-1].finish_reason == "stop"
    assert [t for o in outs["b"] for t in o.new_token_ids] == ref


def test_abort_frees_pages(engine):
    engine.add_request("long", [1] * 40, SamplingParams(max_tokens=20, ignore_eos=True))
    engine.add_request("other", [2] * 10, SamplingParams(max_tokens=20, ignore_eos=True))
    engine.step()
    engine.step()
    used = engine.kv_cache_usage()["used_pages"]
    assert used >= 4
    assert engine.abort_request("long")
    assert engine.kv_cache_usage()["used_pages"] == 1      # "other": 12 tokens, one page
    assert not engine.abort_request("long") and not engine.abort_request("nope")
    outs = engine.step()
    ab = [o for o in outs if o.request_id == "long"]
    assert ab and ab[0].finished and ab[0].finish_reason == "abort"
    assert engine.abort_request("other")
    engine.step()
    assert not engine.has_unfinished()
    assert engine.kv_cache_usage()["used_pages"] == 0
    engine.block_manager.check([])


def test_seeded_sampling_reproducible_and_batch_independent(engine):
    p = SamplingParams(max_tokens=12, temperature=30.0, top_k=20, top_p=0.9, seed=1234,
                       ignore_eos=True)
    engine.add_request("a", [5, 6, 7], p)
    alone = [t for o in drain(engine)["a"] for t in o.new_token_ids]
    engine.add_request("noise", [9] * 20, SamplingParams(max_tokens=12, temperature=1.0, seed=9,
                                                         ignore_eos=True))
    engine.add_request("a", [5, 6, 7], p)
    crowd = [t for o in drain(engine)["a"] for t in o.new_token_ids]
    assert alone == crowd
    engine.add_request("c", [5, 6, 7], SamplingParams(max_tokens=12, temperature=30.0, top_k=20,
                                                      top_p=0.9, seed=4321, ignore_eos=True))
    other = [t for o in drain(engine)["c"] for t in o.new_token_ids]
    assert other != alone


def test_top_k_one_is_greedy(engine):
    engine.add_request("g", [8, 8, 1], SamplingParams(max_tokens=10, ignore_eos=True))
    engine.add_request("k", [8, 8, 1], SamplingParams(max_tokens=10, temperature=5.0, top_k=1,
                                                      seed=3, ignore_eos=True))
    outs = drain(engine)
    toks = {r: [t for o in v for t in o.new_token_ids] for r, v in outs.items()}
    assert toks["g"] == toks["k"]


def test_warm_up_once_per_stepping_thread(engine, monkeypatch):
    """The prefill plans (per-thread state) are warmed by the first step of every thread that
    steps, and not again; a CPU model has none to build."""
    import threading
    calls = []
    monkeypatch.setattr(engine.model, "warm_up_prefill",
                        lambda n: calls.append((threading.get_ident(), n)) or 0)
    engine.add_request("a", [3, 4, 5], SamplingParams(max_tokens=2, ignore_eos=True))
    engine.step()
    engine.step()
    assert calls == [(threading.get_ident(), 64)]          # min(budget 512, max_seq_len 64)
    other = threading.Thread(target=engine.step)
    other.start()
    other.join()
    assert len(calls) == 2 and calls[1][0] != calls[0][0]
    assert engine.prefill_note == "no cuDNN prefill plans"


def test_engine_steps_a_stand_in_model(tiny_dir):
    """A model without warm_up_prefill (the TensorRT plan runner, the host-overhead bench's
    free forward) still serves: host_overhead times engine steps with one."""
    from sawtrt.bench import host_overhead
    assert host_overhead.engine_step_ms(tiny_dir, batch=2, context=8, output=2, reps=3) > 0


def test_llm_generate_and_stream(tiny_dir):
    llm = LLM(tiny_dir, device="cpu")
    p = SamplingParams(max_tokens=6, ignore_eos=True)
    outs = llm.generate(["abc", "hello world", "x"], p)
    assert [len(o.token_ids) for o in outs] == [6, 6, 6]
    assert all(o.finish_reason == "length" for o in outs)
    single = llm.generate(["hello world"], p)[0]
    assert single.token_ids == outs[1].token_ids          # batching does not change greedy
    assert "".join(llm.stream("hello world", p)) == single.text
    assert llm.engine.kv_cache_usage()["used_pages"] == 0


# -- sawtrt build ---------------------------------------------------------------------------------
@pytest.mark.parametrize("opts,msg", [
    (dict(model="nope-1b", random_weights=True), "unknown model"),
    (dict(model="qwen3-4b"), "--checkpoint PATH"),
    (dict(model="qwen3-4b", checkpoint="/does/not/exist"), "does not exist"),
    (dict(model="qwen3-4b", checkpoint="/tmp", random_weights=True), "not both"),
    (dict(model="qwen3-4b", random_weights=True, kv_cache="int4-bdr:h=256"), "divide"),
    (dict(model="smollm2-135m", random_weights=True, kv_cache="int4-bdr:h=128"), "head_dim=64"),
    (dict(model="qwen3-4b", random_weights=True, kv_cache="int4-bdr:h=24"), "power of two"),
    (dict(model="qwen3-4b", random_weights=True, kv_cache="bf16:kv"), "takes no rotation"),
    (dict(model="qwen3-4b", random_weights=True, kv_cache="int4-bdr:h=64,h=32"), "given twice"),
    (dict(model="qwen3-4b", random_weights=True, kv_cache="fp8"), "unknown KV policy"),
    (dict(model="qwen3-4b", random_weights=True, kv_cache="int4:int8=3+36"),
     r"layer\(s\) \[36\]; the model has 36 layers"),
    (dict(model="qwen3-4b", random_weights=True, page_size=48), "page size 48"),
    (dict(model="qwen3-4b", random_weights=True, max_seq_len=10 ** 6), "max-seq-len"),
    (dict(model="qwen3-4b", random_weights=True, max_batch=0), "max-batch"),
    (dict(model="qwen3-4b", random_weights=True, gpu_arch=("sm_9x",)), "gpu-arch"),
])
def test_build_validates_up_front(tmp_path, opts, msg):
    out = tmp_path / "engine"
    with pytest.raises(BuildError, match=msg):
        o = BuildOptions(output=str(out), **opts)
        if opts.get("gpu_arch"):
            import sawtrt.build.kernels as b
            if b.shutil.which("nvcc") is None or not b.BUILD_SCRIPT.is_file():
                raise BuildError("gpu-arch not checked without nvcc")   # nothing to validate
        plan_build(o)
    assert not out.exists()


def test_build_refuses_foreign_directory(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(BuildError, match="not an engine directory"):
        plan_build(BuildOptions(model="qwen3-4b", random_weights=True,
                                output=str(tmp_path / "mine")))


@pytest.mark.parametrize("flags,msg", [
    (["--kv-cache", "int4-bdr", "--rotation-block", "256"], "divide"),
    (["--kv-cache", "int4-bdr:h=64", "--rotation-block", "32"], "'h' given twice"),
    (["--kv-cache", "int4-bdr:kv", "--rotate", "k"], "given twice"),
    (["--kv-cache", "int4-bdr:seed=1", "--sign-seed", "2"], "'seed' given twice"),
    (["--kv-cache", "bf16", "--rotate", "kv"], "takes no rotation options"),
    (["--kv-cache", "int8", "--sign-seed", "3"], "takes no rotation options"),
])
def test_build_cli_errors_are_clean(tmp_path, flags, msg):
    """The rotation flags are aliases of the policy's options: one parser judges both."""
    r = CliRunner().invoke(cli, ["build", "--model", "qwen3-4b", *flags, "--random-weights",
                                 "--output", str(tmp_path / "e")])
    assert r.exit_code == 2 and "Traceback" not in r.output and msg in r.output, r.output
    assert not (tmp_path / "e").exists()


def test_version_1_config_still_loads(tmp_path):
    """An engine written before the policy was stored once (format version 1: the policy as
    fields, as text and inside page_layout) loads to the same config; a version-1 config whose
    two policy records disagree is refused."""
    from sawtrt.engine.config import EngineConfig, EngineConfigError
    from sawtrt.spec import KVPolicy
    out = build_tiny(tmp_path, tiny_spec("qwen3"), kv_cache="int4-bdr:h=16,kv,seed=3,int8=1")
    new = EngineConfig.load(out)
    v2 = json.loads((out / "config.json").read_text())
    pol = KVPolicy.parse(v2["kv_policy"])
    v1 = dict(v2, version=1, kv_policy=pol.to_dict(), kv_policy_str=str(pol),
              page_layout=dict(v2["page_layout"], policy=pol.to_dict()))
    assert v1["kv_policy"]["layer_pages"] == {"int8": [1]}
    old = EngineConfig.from_dict(v1)
    assert old.layout == new.layout and old.to_json() == new.to_json()
    v1["kv_policy"] = dict(v1["kv_policy"], rotate_v=False)
    with pytest.raises(EngineConfigError, match="disagree"):
        EngineConfig.from_dict(v1)


def test_build_from_safetensors_is_idempotent(tmp_path):
    spec = tiny_spec("qwen3")
    w = hf_checkpoint(tmp_path / "ckpt", spec)
    opts = BuildOptions(model="my-qwen", checkpoint=str(tmp_path / "ckpt"), kv_cache="int8",
                        page_size=16, max_seq_len=128, compile_kernels=False,
                        output=str(tmp_path / "eng"))
    logs = []
    out = build_engine(opts, log=logs.append, progress=False)
    first = digests(out)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["version"] == 2 and cfg["kv_policy"] == "int8"
    assert cfg["weights"]["sha256"] == first["model.safetensors"]
    assert cfg["model"]["num_layers"] == 2 and cfg["page_layout"]["page_size"] == 16
    logs.clear()
    build_engine(opts, log=logs.append, progress=False)
    assert digests(out) == first
    assert any("up to date" in m for m in logs) and any("unchanged" in m for m in logs)
    eng = LLMEngine.from_engine_dir(out, device="cpu", dtype=torch.bfloat16)
    assert torch.equal(eng.model.embed, w["model.embed_tokens.weight"])
    assert eng.tokenizer.decode(eng.tokenizer.encode("héllo wörld")) == "héllo wörld"
    # a changed option rewrites the config, not the weights
    opts.kv_cache = "int4-bdr"
    build_engine(opts, log=lambda m: None, progress=False)
    again = digests(out)
    assert again["model.safetensors"] == first["model.safetensors"]
    assert again["config.json"] != first["config.json"]


def test_random_build_idempotent_and_generate_cli(tmp_path):
    out = tmp_path / "r"
    args = ["build", "--model", "qwen3-0.6b", "--random-weights", "--kv-cache", "int4-bdr",
            "--rotate", "kv", "--sign-seed", "5", "--max-seq-len", "256", "--no-kernels",
            "--output", str(out)]
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0, r.output
    first = digests(out)
    assert "model.safetensors" not in first            # random weights are regenerated
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["weights"] == {"format": "random", "seed": 0, "dtype": "bfloat16",
                              "note": cfg["weights"]["note"]}
    assert cfg["kv_policy"] == "int4-bdr:h=128,kv,seed=5"      # the policy, stored once
    assert "policy" not in cfg["page_layout"] and "kv_policy_str" not in cfg
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0 and digests(out) == first


def test_generate_cli(tiny_dir):
    r = CliRunner().invoke(cli, ["generate", "--engine", str(tiny_dir), "--max-tokens", "5",
                                 "--ignore-eos", "--device", "cpu", "hello"])
    assert r.exit_code == 0, r.output
    assert "5 tokens" in r.output
    r = CliRunner().invoke(cli, ["generate", "--engine", str(tiny_dir), "--top-p", "0",
                                 "--device", "cpu", "hello"])
    assert r.exit_code == 2 and "top_p" in r.output
    r = CliRunner().invoke(cli, ["generate", "--engine", str(tiny_dir), "--stream",
                                 "--device", "cpu", "a", "b"])
    assert r.exit_code == 2 and "--stream takes exactly one prompt" in r.output


def test_hf_config_rope_forms():
    from sawtrt.models.specs import from_hf_config
    base = dict(model_type="qwen3", num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
                intermediate_size=128, vocab_size=256)
    assert from_hf_config({**base, "rope_theta": 1e6}).rope_theta == 1e6
    assert from_hf_config({**base, "rope_parameters": {"rope_type": "default",
                                                       "rope_theta": 5e5}}).rope_theta == 5e5
    for bad in ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}},
                {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6}}):
        with pytest.raises(ValueError, match="not supported"):
            from_hf_config({**base, **bad})


@pytest.mark.parametrize("text", ["plain ascii, then h\u00e9llo \u20acuro \U0001d11e \u2026 done",
                                  "\u4e2d\u6587\u5b57\u7b26 mixed \U0001f600 emoji"])
def test_incremental_detokenization_equals_full_decode(engine, text):
    """Output bytes arrive one token at a time (multi-byte characters split across steps): the
    streamed deltas never show a broken character and add up to a full decode of the output."""
    from sawtrt.engine.sequence import Sequence
    ids = list(text.encode("utf-8"))
    seq = Sequence("d", [65], SamplingParams(max_tokens=10_000, ignore_eos=True), 0)
    deltas = []
    for t in ids:
        seq.token_ids.append(t)
        out = engine._process_token(seq, t)
        assert "\ufffd" not in out.new_text
        deltas.append(out.new_text)
    assert "".join(deltas) == engine.tokenizer.decode(ids) == text
    assert sum(1 for d in deltas if d) == len(text)       # one delta per completed character


def test_per_layer_pages_engine_budget_pools_and_bad_layers(tmp_path, tiny_dir):
    """int8 pages for one layer: the KV budget counts every layer's width, the pools are one
    tensor per layer of that width, a request runs; layers the model lacks are refused before
    any weight is loaded (override) or when the config is read (edited config)."""
    from sawtrt.engine.config import EngineConfigError
    from sawtrt.spec import PolicyError
    spec = tiny_spec("qwen3")
    d = build_tiny(tmp_path, spec, kv_cache="int4-bdr:int8=1", max_seq_len=64, max_batch=8)
    budget = 40_000
    eng = LLMEngine.from_engine_dir(d, device="cpu", kv_memory_bytes=budget)
    lay = eng.config.layout
    assert eng.block_manager.num_pages == budget // lay.pool_page_bytes(spec.num_layers)
    assert [t.shape[-1] for t in eng.kv_pool] == [
        lay.for_layer(i).head_block_bytes for i in range(spec.num_layers)]
    assert eng.kv_pool[1].shape[-1] > eng.kv_pool[0].shape[-1]          # layer 1 is int8
    eng.add_request("a", [1, 2, 3, 4, 5], SamplingParams(max_tokens=3, ignore_eos=True))
    assert sum(len(o.new_token_ids) for o in drain(eng)["a"]) == 3
    with pytest.raises(PolicyError, match="the model has"):
        LLMEngine.from_engine_dir(tiny_dir, device="cpu",
                                  kv_policy=f"int4-bdr:int8={spec.num_layers}")
    cfg = json.loads((d / "config.json").read_text())
    base, _, _ = cfg["kv_policy"].partition(",int8=")
    cfg["kv_policy"] = base + ",int8=9"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(EngineConfigError, match=r"layer\(s\) \[9\]"):
        LLMEngine.from_engine_dir(d, device="cpu")


def test_prepare_block_tables_follow_every_table_change():
    """ModelRunner.prepare stacks block tables from rows cached on the sequences: after pages
    are appended, freed (a new, shorter list), re-allocated and forked, every row still equals
    the sequence's table, zero-padded, in the graph (pad_to) and the eager form."""
    from sawtrt.engine.model_runner import ModelRunner
    from sawtrt.engine.scheduler import ScheduledBatch
    from sawtrt.engine.sequence import Sequence
    runner = ModelRunner.__new__(ModelRunner)
    runner.page_size, runner.device, runner.max_pages = 4, torch.device("cpu"), 6
    runner._zero_table_row = np.zeros(6, dtype=np.int32)    # what __init__ sets for max_pages
    a = Sequence("a", list(range(9)), SamplingParams(), 0)
    b = Sequence("b", list(range(3)), SamplingParams(), 1)

    def check():
        batch = ScheduledBatch([a, b], [1, 1])
        for s in (a, b):
            s.num_computed = len(s) - 1
        for pad, width in ((4, 6), (None, max(len(a.block_table), len(b.block_table)))):
            ids, meta = runner.prepare(batch, pad_to=pad, on_device=False)
            bt = meta.block_tables
            assert bt.is_contiguous() and bt.dtype == torch.int32 and bt.shape[1] == width
            for i, s in enumerate((a, b)):
                assert bt[i].tolist() == s.block_table + [0] * (width - len(s.block_table))
                want_slot = s.block_table[(len(s) - 1) // 4] * 4 + (len(s) - 1) % 4
                assert meta.slot_mapping[i].item() == want_slot
            assert bt[2:].eq(0).all()
    a.block_table, b.block_table = [3, 5, 8], [2]
    check()
    a.block_table.append(11)                     # grown in place (allocate_for)
    a.token_ids += [1, 2, 3, 4]
    check()
    a.block_table = []                           # freed (preempted) ...
    a.block_table.extend([7, 1, 4])              # ... and allocated again: old pages gone
    a.token_ids = a.token_ids[:9]
    check()
    b.block_table = a.block_table[:1]            # a fork: a new list sharing a prefix
    b.token_ids = list(range(4))
    check()


def test_kv_transform_one_matmul_form_equals_two():
    """KVTransform.params hands the compiled prologue the whitening of q and k as one batched
    matmul over Hq + Hkv heads: the same q', k' as the two-matmul form, on a random
    calibration with a non-trivial mean and whitening."""
    from sawtrt.models import kv_transform as kvt
    from sawtrt.spec import KVPolicy
    g = torch.Generator().manual_seed(5)
    L, hq, hkv, d, t = 2, 8, 2, 16, 7
    m = torch.randn(L, hkv, d, d, generator=g)
    mom = m @ m.transpose(-1, -2) / d + 0.1 * torch.eye(d)
    m2 = torch.randn(L, hkv, d, d, generator=g)
    qmom = m2 @ m2.transpose(-1, -2) / d + 0.1 * torch.eye(d)
    cal = kvt.KVCalibration(torch.randn(L, hkv, d, generator=g), torch.ones(L, hkv, d),
                            torch.ones(L, hkv, d), {}, mom, qmom)
    tr = kvt.KVTransform(KVPolicy.parse("int4-bdr:kv,center,whiten"), cal, hq)
    q, k = torch.randn(t, hq, d, generator=g), torch.randn(t, hkv, d, generator=g)
    for layer in range(L):
        got_q, got_k = tr(layer, q, k)
        want_q, want_k = kvt.apply(q, k, tr.k_mean[layer], None, None, tr.k_mat[layer],
                                   tr.q_mat[layer])
        assert torch.allclose(got_q, want_q, atol=1e-5) and torch.allclose(got_k, want_k,
                                                                           atol=1e-5)
        assert (got_k - k).abs().max() > 0.1          # the transform does something


def test_compile_mode(monkeypatch):
    """CausalLM compiles its layer work on CUDA only unless SAWTRT_COMPILE says otherwise."""
    from sawtrt.models.model import compile_mode
    monkeypatch.delenv("SAWTRT_COMPILE", raising=False)
    assert not compile_mode(torch.device("cpu")) and compile_mode(torch.device("cuda"))
    for v, want in (("0", False), ("off", False), ("1", True), ("on", True)):
        monkeypatch.setenv("SAWTRT_COMPILE", v)
        assert compile_mode(torch.device("cpu")) is want
        assert compile_mode(torch.device("cuda")) is want
