"""Scheduler + page manager invariants: continuous batching, chunked prefill, preemption.

The engine test runs 1 000 random requests through a tiny random model twice — with a pool
large enough for everything, and with a pool so small that preemption (recompute) happens
constantly — and requires identical outputs (greedy and seeded sampling), every request
finished, and every page returned.
"""
from __future__ import annotations

import random

import pytest

from runtime_helpers import build_tiny, drive, stream_summary, tiny_spec
from sawtrt.engine.block_manager import BlockManager
from sawtrt.engine.llm_engine import LLMEngine
from sawtrt.engine.sampling import SamplingParams
from sawtrt.engine.scheduler import Scheduler
from sawtrt.engine.sequence import Sequence, Status

pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py


# -- scheduler alone (no model) -----------------------------------------------------------------
@pytest.mark.parametrize("num_pages,page_size,budget,max_seqs", [
    (64, 16, 64, 8), (9, 16, 40, 16), (5, 32, 7, 4), (200, 16, 512, 64)])
def test_scheduler_invariants(num_pages, page_size, budget, max_seqs):
    rng = random.Random(num_pages * 31 + budget)
    max_seq_len = min(num_pages * page_size, 150)
    bm = BlockManager(num_pages, page_size)
    sched = Scheduler(bm, max_seqs, budget, max_seq_len)
    seqs = []
    for i in range(300):
        n = rng.randint(1, max_seq_len - 1)
        s = Sequence(f"r{i}", [1] * n, SamplingParams(max_tokens=rng.randint(1, 30)), i)
        seqs.append(s)
    pending = list(seqs)
    finished = 0
    steps = 0
    while pending or sched.has_unfinished():
        for _ in range(rng.randint(0, 4)):         # arrivals over time
            if pending:
                sched.add(pending.pop(0))
        batch = sched.schedule()
        steps += 1
        assert steps < 100_000
        live = sched.running
        bm.check(live)
        assert not any(s.block_table for s in sched.waiting)
        assert batch.total_tokens <= budget and len(sched.running) <= max_seqs
        assert len({id(s) for s in batch.seqs}) == len(batch.seqs)
        if not batch.seqs:
            assert not sched.has_unfinished() or pending
            continue
        for s, n in zip(batch.seqs, batch.num_tokens):
            assert s.status == Status.RUNNING and 1 <= n <= s.num_uncomputed
            assert len(s.block_table) * page_size >= s.num_computed + n
            s.num_computed += n
            if s.num_computed == len(s):
                s.token_ids.append(7)
                if s.num_output_tokens >= s.params.max_tokens or len(s) >= max_seq_len:
                    sched.finish(s, "length")
                    finished += 1
    assert finished == len(seqs)
    bm.check([])
    assert bm.num_free == num_pages
    print(f"pages={num_pages} budget={budget}: {steps} steps, {sched.num_preemptions} "
          "preemptions")


def test_block_manager_refcounts():
    bm = BlockManager(8, 4)
    a = Sequence("a", list(range(10)), SamplingParams(), 0)
    bm.allocate_for(a, 10)
    a.num_computed = 10
    assert len(a.block_table) == 3 and bm.num_used == 3
    b = Sequence("b", list(range(10)), SamplingParams(), 1)
    bm.fork(a, b)                               # shares the 2 full pages
    assert b.block_table == a.block_table[:2] and b.num_computed == 8
    bm.allocate_for(b, 10)
    assert bm.num_used == 4
    bm.check([a, b])
    bm.free(a)
    assert bm.num_used == 3                     # shared pages survive their first owner
    bm.check([b])
    bm.free(b)
    bm.check([])
    assert bm.num_free == 8
    with pytest.raises(Exception):
        bm.allocate_for(Sequence("c", [1] * 40, SamplingParams(), 2), 40)
    assert bm.num_free == 8                     # all-or-nothing


# -- the engine over 1 000 requests --------------------------------------------------------------
def _requests(n, vocab, max_seq_len, seed=0):
    rng = random.Random(seed)
    reqs = []
    for i in range(n):
        plen = rng.randint(1, 24)
        prompt = [rng.randrange(vocab) for _ in range(plen)]
        if i % 2:
            p = SamplingParams(max_tokens=rng.randint(1, 10), temperature=0.8, top_k=50,
                               top_p=0.9, seed=rng.randrange(1 << 30), ignore_eos=True)
        else:
            p = SamplingParams(max_tokens=rng.randint(1, 10), ignore_eos=True)
        reqs.append((f"q{i}", prompt, p))
    return reqs


@pytest.mark.slow
def test_thousand_requests_with_and_without_preemption(tmp_path):
    spec = tiny_spec("llama", num_layers=1)      # one layer: the reference attention is the cost
    eng_dir = build_tiny(tmp_path, spec, kv_cache="int4-bdr", page_size=16, max_batch=64,
                         max_seq_len=40)
    reqs = _requests(1000, spec.vocab_size, 40)
    big = LLMEngine.from_engine_dir(eng_dir, device="cpu", max_num_batched_tokens=256)
    small = LLMEngine.from_engine_dir(eng_dir, device="cpu", max_num_batched_tokens=256,
                                      num_pages=12)
    assert big.kv_cache_usage()["total_pages"] >= 64 * 3
    # drive() checks the stream contract and that every page came back
    a = {rid: stream_summary(o) for rid, o in drive(big, reqs, arrivals=16).items()}
    b = {rid: stream_summary(o) for rid, o in drive(small, reqs, arrivals=16).items()}
    preempted = small.scheduler.num_preemptions
    print(f"1000 requests: pool {big.kv_cache_usage()['total_pages']} pages, "
          f"{big.scheduler.num_preemptions} preemptions vs pool 12 pages, {preempted}")
    assert big.scheduler.num_preemptions == 0
    assert preempted > 20
    for rid, prompt, p in reqs:
        assert a[rid][2] == b[rid][2] == "length"
        assert len(a[rid][0]) == p.max_tokens
    diff = [rid for rid, _, _ in reqs if a[rid][0] != b[rid][0]]
    assert not diff, f"{len(diff)} requests differ under preemption, e.g. {diff[:5]}"
