"""Host-side cost of one decode step's bookkeeping, without a GPU and without the weights.

    python -m sawtrt.bench.host_overhead --engine engines/smollm2-135m-int4-bdr

Times, per batch size B (sequences of `--context` tokens with `--output` random tokens
generated so far, all decoding), the two per-step host stages that grow with B:
  prepare      ModelRunner.prepare for a CUDA-graph decode batch (ids, positions, slots,
               block tables of max_seq_len / page_size pages, padded to the bucket)
  detokenize   the engine's detokenizer, one new token per sequence, with the engine's own
               tokenizer
  step         a whole LLMEngine.step() (schedule, prepare, forward, sample, detokenize,
               outputs) around a forward that costs nothing (a stub returning logits over the
               first 256 ids), after `--output` decode steps: all host time of a decode step
  async step   the same with async scheduling (the token holes, the launched step's
               bookkeeping): the host time that, on a GPU, runs while the previous step computes
Medians of `--reps` repetitions; this is the CPU work that the GPU waits for in serving.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from ..engine.config import EngineConfig
from ..engine.detokenizer import IncrementalDetokenizer
from ..engine.model_runner import ModelRunner
from ..engine.sampling import SamplingParams
from ..engine.scheduler import ScheduledBatch
from ..engine.sequence import Sequence
from ..models import tokenizer as tokenizers


def _median_ms(fn, reps: int) -> float:
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e3


def _decoding_seqs(batch: int, context: int, output: int, page_size: int, vocab: int,
                   detok: IncrementalDetokenizer):
    """Sequences mid-decode, with the detokenizer state that `output` steps left behind."""
    gen = torch.Generator().manual_seed(batch)
    params = SamplingParams(max_tokens=1 << 30, ignore_eos=True)
    seqs = []
    for i in range(batch):
        s = Sequence(f"h{i}", [1] * context, params, i)
        for t in torch.randint(0, vocab, (output,), generator=gen).tolist():
            s.token_ids.append(t)
            detok.text(s)
        s.num_computed = len(s) - 1
        pages = -(-len(s) // page_size)
        s.block_table = list(range(1 + i * pages, 1 + (i + 1) * pages))
        seqs.append(s)
    return seqs


def measure(tokenizer, page_size: int, max_seq_len: int, batches, context: int, output: int,
            reps: int = 20) -> list[dict]:
    runner = ModelRunner.__new__(ModelRunner)           # prepare() needs only these fields
    runner.page_size, runner.device = page_size, torch.device("cpu")
    runner.max_pages = -(-max(max_seq_len, context + output + 1) // page_size)
    detok = IncrementalDetokenizer(tokenizer)
    vocab = getattr(tokenizer, "vocab_size", 256)
    rows = []
    for b in batches:
        seqs = _decoding_seqs(b, context, output, page_size, vocab, detok)
        batch = ScheduledBatch(seqs, [1] * b)
        prep = _median_ms(lambda: runner.prepare(batch, pad_to=b, on_device=False), reps)
        saved = [(s.detok_text, s.detok_prefix, s.detok_read) for s in seqs]

        def step():                       # one more token each (state restored after)
            for s, st in zip(seqs, saved):
                s.token_ids.append(s.token_ids[-1])
                detok.text(s)
                s.token_ids.pop()
                s.detok_text, s.detok_prefix, s.detok_read = st
        rows.append({"batch": b, "prepare_ms": prep, "detokenize_ms": _median_ms(step, reps)})
    return rows


class _FreeForward:
    """Stands in for CausalLM: same interface, no work; logits over ids 0..255."""

    def __init__(self, layout, device):
        self.layout, self.device, self.dtype, self.fused = layout, device, torch.float32, False
        self.gen = torch.Generator().manual_seed(0)

    def __call__(self, input_ids, meta, kv_pool):
        return torch.rand(len(meta.logits_indices), 256, generator=self.gen)


def engine_step_ms(engine_dir, batch: int, context: int, output: int, reps: int = 20,
                   async_scheduling: bool = False) -> float:
    """Median host time of LLMEngine.step() with `batch` sequences decoding after `output`
    steps, the model replaced by _FreeForward (one layer of one tiny KV head: a small pool)."""
    import dataclasses

    from ..engine.llm_engine import LLMEngine
    from ..spec import KVPolicy, PageLayout
    cfg = EngineConfig.load(engine_dir)
    tok = tokenizers.load(engine_dir)
    page = cfg.layout.page_size
    cfg.layout = PageLayout(KVPolicy.parse("int4"), 16, 1, page)   # only page_size matters
    cfg.model = dataclasses.replace(cfg.model, num_layers=1, num_kv_heads=1, num_heads=1,
                                    head_dim=16)
    cfg.max_seq_len = max(cfg.max_seq_len, context + output + 3 * batch + reps + 3)
    pages = batch * -(-cfg.max_seq_len // page)
    engine = LLMEngine(cfg, _FreeForward(cfg.layout, torch.device("cpu")), tok, "cpu",
                       num_pages=pages, max_num_batched_tokens=max(8192, batch),
                       max_num_seqs=batch, cuda_graphs=False, async_scheduling=async_scheduling)
    # the first sequences decode while later ones prefill: room for all to stay running
    params = SamplingParams(max_tokens=output + 3 * batch + reps + 2, ignore_eos=True)
    for i in range(batch):
        engine.add_request(f"s{i}", [1 + i % 200] * context, params)
    while min(s.num_output_tokens for s in engine._seqs.values()) < output:
        engine.step()
    ms = _median_ms(engine.step, reps)
    if len(engine.scheduler.running) != batch:
        raise RuntimeError("not every sequence was decoding in the timed steps")
    return ms


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--engine", required=True)
    ap.add_argument("--batch", default="1,64,256")
    ap.add_argument("--context", type=int, default=8192)
    ap.add_argument("--output", type=int, default=1000)
    ap.add_argument("--reps", type=int, default=20)
    a = ap.parse_args(argv)
    cfg = EngineConfig.load(a.engine)
    tok = tokenizers.load(a.engine)
    print(f"{'B':>4} {'prepare ms':>11} {'detokenize ms':>14} {'step ms':>8} "
          f"{'async step ms':>13}   "
          f"({type(tok).__name__}, context {a.context}, {a.output} output tokens)")
    for r in measure(tok, cfg.layout.page_size, cfg.max_seq_len,
                     [int(x) for x in a.batch.split(",")], a.context, a.output, a.reps):
        step = engine_step_ms(a.engine, r["batch"], a.context, a.output, a.reps)
        step_async = engine_step_ms(a.engine, r["batch"], a.context, a.output, a.reps, True)
        print(f"{r['batch']:>4} {r['prepare_ms']:>11.3f} {r['detokenize_ms']:>14.3f} {step:>8.3f} "
              f"{step_async:>13.3f}")


if __name__ == "__main__":
    main()
