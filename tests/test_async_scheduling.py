"""Async scheduling (LLMEngine(async_scheduling=True)) against the synchronous engine, its oracle.

Forced on for the CPU: the CPU gains nothing from the overlap, but the bookkeeping is the same
(token holes filled from the previous step's sampled tensor, outputs a step later, EOS and stop
strings seen a step late, length finishes retired before the next schedule, pages freed while a
step is in flight). Hundreds of requests mixing greedy and seeded sampling, EOS, stop strings,
max_tokens and mid-flight aborts must produce the synchronous engine's tokens, text deltas and
finish reasons, with a large pool and with a pool so small that preemption happens constantly.
"""
from __future__ import annotations

import random
from collections import Counter

import pytest

from runtime_helpers import build_tiny, drive, stream_summary, tiny_spec
from sawtrt.bench.step_timer import ForwardTimer
from sawtrt.engine.llm_engine import LLMEngine
from sawtrt.engine.options import EngineOptions
from sawtrt.engine.sampling import SamplingParams
from sawtrt.engine.scheduler import ScheduledBatch
from sawtrt.engine.sequence import Sequence

pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py

MAX_SEQ_LEN = 48


@pytest.fixture(scope="module")
def eng_dir(tmp_path_factory):
    spec = tiny_spec("llama", num_layers=1)      # one layer: the reference attention is the cost
    return build_tiny(tmp_path_factory.mktemp("async"), spec, kv_cache="int4-bdr", page_size=16,
                      max_batch=32, max_seq_len=MAX_SEQ_LEN)


def _engine(eng_dir, async_scheduling, eos=None, **kw):
    e = LLMEngine.from_engine_dir(eng_dir, device="cpu", max_num_batched_tokens=128,
                                  async_scheduling=async_scheduling, **kw)
    if eos is not None:
        e.eos_token_ids = set(eos)
    return e


def _requests(n, seed=0, mixed=True):
    """Prompts of 1..30 tokens; max_tokens up to past max_seq_len; with `mixed`, two thirds
    stop at EOS, a third have stop strings (ASCII characters: the byte tokenizer decodes
    random ids to them often), half sample with a seed."""
    rng = random.Random(seed)
    reqs = []
    for i in range(n):
        prompt = [rng.randrange(256) for _ in range(rng.randint(1, 30))]
        kw = dict(max_tokens=rng.randint(1, 24), ignore_eos=True)
        if mixed:
            kw["ignore_eos"] = i % 3 == 0
            if i % 3 == 1:
                kw["stop"] = tuple(rng.sample("etaoinshrdlucmfwyp0123456789", 14)) + ("ab",)
            if i % 2:
                kw.update(temperature=0.8, top_k=50, top_p=0.9, seed=rng.randrange(1 << 30))
        reqs.append((f"q{i}", prompt, SamplingParams(**kw)))
    return reqs


def _common_tokens(eng_dir, reqs):
    """The two most frequent greedy output tokens: as EOS they end many requests early."""
    ref = drive(_engine(eng_dir, False), [(r, p, SamplingParams(max_tokens=8, ignore_eos=True))
                                         for r, p, _ in reqs[:40]])
    return [t for t, _ in Counter(t for os_ in ref.values()
                                  for t in stream_summary(os_)[0]).most_common(2)]


@pytest.mark.parametrize("num_pages", [None, 10])
def test_async_matches_sync(eng_dir, num_pages):
    reqs = _requests(300)
    eos = _common_tokens(eng_dir, reqs)
    sync = _engine(eng_dir, False, eos, num_pages=num_pages)
    asyn = _engine(eng_dir, True, eos, num_pages=num_pages)
    a, b = drive(sync, reqs), drive(asyn, reqs)
    diff = [rid for rid in a if stream_summary(a[rid]) != stream_summary(b[rid])]
    assert not diff, f"{len(diff)} requests differ, e.g. {diff[0]}: " \
                     f"{stream_summary(a[diff[0]])} vs {stream_summary(b[diff[0]])}"
    # the streams themselves: the same deltas in the same order, one step() call later
    assert all([(o.new_token_ids, o.new_text) for o in a[r]] ==
               [(o.new_token_ids, o.new_text) for o in b[r]] for r in a)
    reasons = Counter(stream_summary(os_)[2] for os_ in a.values())
    eos_stops = sum(1 for os_ in a.values()
                    if stream_summary(os_)[0][-1:] in ([eos[0]], [eos[1]]))
    text_stops = reasons["stop"] - eos_stops
    assert eos_stops >= 15 and text_stops >= 15 and reasons["length"] >= 50, (reasons, eos_stops)
    if num_pages is not None:
        assert sync.scheduler.num_preemptions > 10 and asyn.scheduler.num_preemptions > 10


def test_async_aborts_mid_flight(eng_dir):
    """Aborts before step() calls, while steps are in flight: an aborted request reports
    "abort" once and its tokens are a prefix of its unaborted output; every other request is
    unchanged; no page leaks (also under preemption)."""
    reqs = _requests(150, seed=1)
    eos = _common_tokens(eng_dir, reqs)
    ref = drive(_engine(eng_dir, False, eos), reqs)
    rng = random.Random(2)
    aborts: dict[int, list[str]] = {}
    for rid, _, _ in rng.sample(reqs, 50):
        aborts.setdefault(rng.randrange(1, 30), []).append(rid)
    aborted = {r for rs in aborts.values() for r in rs}
    for num_pages in (None, 10):
        for mode in (False, True):
            outs = drive(_engine(eng_dir, mode, eos, num_pages=num_pages), reqs, aborts=aborts)
            n_abort = 0
            for rid, os_ in outs.items():
                toks, text, why = stream_summary(os_)
                rtoks, rtext, rwhy = stream_summary(ref[rid])
                if why == "abort":
                    assert rid in aborted
                    n_abort += 1
                    assert toks == rtoks[:len(toks)] and rtext.startswith(text)
                else:
                    assert (toks, text, why) == (rtoks, rtext, rwhy), rid
            assert n_abort >= 20, (mode, num_pages, n_abort)


def test_length_finishes_keep_the_synchronous_batches(eng_dir):
    """Without EOS or stop strings every finish is foreseeable: the async engine retires the
    sequence before scheduling the next step, so it runs exactly the synchronous engine's
    batches (what makes its GPU outputs bit-identical, kernel numerics being batch-dependent)."""
    reqs = _requests(120, seed=3, mixed=False)
    batches = {}
    for mode in (False, True):
        e = _engine(eng_dir, mode, num_pages=12)
        log = batches[mode] = []
        orig = e.scheduler.schedule

        def schedule(orig=orig, log=log):
            b = orig()
            if b.seqs:
                log.append([(s.request_id, n) for s, n in zip(b.seqs, b.num_tokens)])
            return b
        e.scheduler.schedule = schedule
        drive(e, reqs)
        assert e.scheduler.num_preemptions > 0
    assert batches[False] == batches[True]


def test_holes_need_launch(eng_dir):
    e = _engine(eng_dir, True)
    s = Sequence("h", [1, 2, 3], SamplingParams(), 0)
    e.block_manager.allocate_for(s, 4)
    s.num_computed, s.num_pending = 3, 1
    with pytest.raises(RuntimeError, match="not sampled yet"):
        e.runner.prepare(ScheduledBatch([s], [1]))
    holes = []
    ids, _ = e.runner.prepare(ScheduledBatch([s], [1]), holes=holes)
    assert holes == [(0, s)] and ids.tolist() == [0]
    e.block_manager.free(s)


def test_abort_of_a_retiring_sequence(eng_dir):
    """A request whose last token is in flight (retired, pages already free) can still be
    aborted: it reports "abort" once, and the in-flight token is dropped."""
    e = _engine(eng_dir, True)
    e.add_request("one", [5, 6, 7], SamplingParams(max_tokens=1, ignore_eos=True))
    e.add_request("two", [5, 6, 7], SamplingParams(max_tokens=3, ignore_eos=True))
    assert e.step() == []                       # prefill launched, nothing resolved yet
    out = e.step()                              # "one" retired before this schedule
    assert [(o.request_id, o.finished) for o in out] == [("one", True), ("two", False)]
    assert e.abort_request("two")               # its second token is in flight
    out = e.step()
    assert [(o.request_id, o.finish_reason, o.new_token_ids) for o in out] == \
        [("two", "abort", [])]
    while e.has_unfinished():
        assert e.step() == []
    assert e.kv_cache_usage()["used_pages"] == 0
    e.block_manager.check([])


def test_options_and_defaults(eng_dir):
    assert EngineOptions(async_scheduling=False).engine_kwargs() == {"async_scheduling": False}
    o = EngineOptions(async_scheduling=True, max_num_seqs=4)
    assert EngineOptions.from_params(o.to_params()) == o
    assert EngineOptions.from_params({"async_scheduling": "off"}).async_scheduling is False
    with pytest.raises(ValueError, match="async_scheduling"):
        EngineOptions.from_params({"async_scheduling": "maybe"})
    assert not LLMEngine.from_engine_dir(eng_dir, device="cpu").async_scheduling   # CPU: off
    with pytest.raises(ValueError, match="async_scheduling"):
        _engine(eng_dir, "yes")


def test_step_timer_reads_lazily(eng_dir):
    """ForwardTimer over the async engine: one record per model step, device and idle times
    read after the fact (CPU: perf_counter marks)."""
    e = _engine(eng_dir, True)
    reqs = _requests(20, seed=4, mixed=False)
    for r in reqs:
        e.add_request(*r)
    with ForwardTimer(e) as timer:
        n = 0
        while e.has_unfinished():
            e.step()
            n += 1
    assert 0 < len(timer.records) <= n
    assert all(r.device_ms >= 0 and r.forward_ms >= r.device_ms for r in timer.records)
    assert timer.records[0].idle_before_ms is None
    assert all(r.idle_before_ms >= 0 for r in timer.records[1:])
    assert any(r.is_decode for r in timer.records)


def test_recovers_from_a_failed_step(eng_dir):
    """A step that raises (here: the launch, with the previous step's tokens unread) loses
    those tokens, not the requests: the sequences recompute their last token and greedy
    outputs match the synchronous engine's."""
    reqs = _requests(40, seed=5, mixed=False)
    reqs = [(r, p, SamplingParams(max_tokens=sp.max_tokens, ignore_eos=True)) for r, p, sp in reqs]
    ref = drive(_engine(eng_dir, False), reqs)
    e = _engine(eng_dir, True)
    orig, calls = e.runner.launch, [0]

    def launch(batch, prev=None):
        calls[0] += 1
        if calls[0] in (4, 9):
            raise RuntimeError("injected")
        return orig(batch, prev)
    e.runner.launch = launch
    for r in reqs:
        e.add_request(*r)
    outs, failures = {r: [] for r, _, _ in reqs}, 0
    while e.has_unfinished():
        try:
            for o in e.step():
                outs[o.request_id].append(o)
        except RuntimeError as err:
            assert "injected" in str(err)
            failures += 1
    assert failures == 2
    assert {r: stream_summary(o) for r, o in outs.items()} == \
        {r: stream_summary(o) for r, o in ref.items()}
    assert e.kv_cache_usage()["used_pages"] == 0
    e.block_manager.check([])


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_failed_step_keeps_queued_outputs(eng_dir, async_scheduling):
    """Outputs queued before a step (an abort's final output) survive a step that raises: the
    next step() delivers them, and no request goes without its finishing output."""
    e = _engine(eng_dir, async_scheduling)
    for rid, prompt, _ in _requests(6, seed=9, mixed=False):
        e.add_request(rid, prompt, SamplingParams(max_tokens=20, ignore_eos=True))
    e.step()
    e.step()
    e.abort_request("q0")
    run = "launch" if async_scheduling else "run"
    orig = getattr(e.runner, run)

    def fail(*args, **kwargs):
        raise RuntimeError("injected")
    setattr(e.runner, run, fail)
    with pytest.raises(RuntimeError, match="injected"):
        e.step()
    setattr(e.runner, run, orig)
    outs = {}
    while e.has_unfinished():
        for o in e.step():
            outs.setdefault(o.request_id, []).append(o)
    assert outs["q0"][-1].finished and outs["q0"][-1].finish_reason == "abort"
    assert len(outs) == 6 and all(o[-1].finished for o in outs.values())
    assert e.kv_cache_usage()["used_pages"] == 0


@pytest.mark.parametrize("async_scheduling", [False, True])
@pytest.mark.parametrize("finish", ["length", "stop"])
def test_failure_reporting_a_last_token_does_not_run_past_it(eng_dir, async_scheduling, finish):
    """The detokenizer raises on a request's last token (its max_tokens-th, or its EOS): the
    step raises, the token is taken back and sampled again, and the request still ends there,
    with the outputs of a run without the failure."""
    params = SamplingParams(max_tokens=3 if finish == "length" else 8, ignore_eos=True)
    # a prompt whose first three greedy tokens differ, so that the third can be made the EOS
    greedy = drive(_engine(eng_dir, False), [(f"p{i}", [i, i + 1, i + 2], params)
                                             for i in range(0, 60, 3)])
    i = next(int(r[1:]) for r, o in greedy.items() if len(set(stream_summary(o)[0][:3])) == 3)
    prompt, ref, eos = [i, i + 1, i + 2], greedy[f"p{i}"], None
    if finish == "stop":
        eos = [stream_summary(ref)[0][2]]
        params = SamplingParams(max_tokens=8)
        ref = drive(_engine(eng_dir, False, eos=eos), [("r", prompt, params)])["r"]
    want = stream_summary(ref)
    assert len(want[0]) == 3 and want[2] == finish
    e = _engine(eng_dir, async_scheduling, eos=eos)
    e.add_request("r", prompt, params)
    orig, calls = e.detokenizer.text, [0]

    def text(seq, final=False):
        calls[0] += 1
        if calls[0] == 3:
            raise RuntimeError("injected")
        return orig(seq, final)
    e.detokenizer.text = text
    outs, failures = [], 0
    while e.has_unfinished():
        try:
            outs += e.step()
        except RuntimeError:
            failures += 1
    assert failures == 1 and stream_summary(outs) == want
    assert e.kv_cache_usage()["used_pages"] == 0


def test_llm_api_generate_and_stream(eng_dir):
    """LLM.generate / LLM.stream over the async engine: the synchronous engine's texts, tokens
    and reasons, call after call (a step still in flight after one call is absorbed by the
    next)."""
    from sawtrt.engine.llm import LLM
    reqs = _requests(12, seed=6)
    prompts, params = [p for _, p, _ in reqs], [sp for _, _, sp in reqs]
    eos = _common_tokens(eng_dir, reqs)
    llms = {m: LLM(eng_dir, device="cpu", async_scheduling=m) for m in (False, True)}
    for llm in llms.values():
        llm.engine.eos_token_ids = set(eos)
    for _ in range(2):
        a, b = (llms[m].generate(prompts, params) for m in (False, True))
        assert [(o.text, o.token_ids, o.finish_reason) for o in a] == \
            [(o.text, o.token_ids, o.finish_reason) for o in b]
    s = [list(llms[m].stream(prompts[0], SamplingParams(max_tokens=9, ignore_eos=True)))
         for m in (False, True)]
    assert s[0] == s[1]


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_llm_api_interleaved_streams(eng_dir, async_scheduling):
    """Two open streams and a generate() while they are open: each gets all of its own outputs
    (what one call's step yields for another request waits for that request's call), and an
    abandoned stream is aborted without disturbing the others."""
    from sawtrt.engine.llm import LLM
    llm = LLM(eng_dir, device="cpu", async_scheduling=async_scheduling)
    sp = SamplingParams(max_tokens=6, ignore_eos=True)
    prompts = [[1, 2, 3], [4, 5, 6], [7, 8, 9], [10, 11]]
    ref = [o.token_ids for o in llm.generate(prompts, sp)]
    a, b = (llm.stream_outputs(p, sp) for p in prompts[:2])
    ta = list(next(a).new_token_ids)
    tb = list(next(b).new_token_ids)
    gen = llm.generate(prompts[2:], sp)
    ta += [t for o in a for t in o.new_token_ids]
    tb += [t for o in b for t in o.new_token_ids]
    assert [ta, tb] + [o.token_ids for o in gen] == ref
    c = llm.stream_outputs(prompts[0], sp)
    next(c)
    c.close()                                   # abandoned: aborted, its pages freed
    assert [o.token_ids for o in llm.generate(prompts[1:2], sp)] == ref[1:2]
    while llm.engine.has_unfinished():
        llm.engine.step()
    assert llm.engine.kv_cache_usage()["used_pages"] == 0


def test_decode_step_bench_both_modes(eng_dir):
    """bench.decode_step over both engines: every timed step a decode step of the whole batch,
    the engine idle afterwards, times positive."""
    from sawtrt.bench.decode_step import bench
    for mode in (False, True):
        e = _engine(eng_dir, mode)
        row = bench(e, 4, 20, 5, warmup=2)
        assert row["async_scheduling"] is mode and row["gpu_idle_ms"] >= 0
        assert row["step_ms"] > 0 and row["device_ms"] > 0 and row["step_vs_device"] > 0
        assert not e.has_unfinished() and e.kv_cache_usage()["used_pages"] == 0
