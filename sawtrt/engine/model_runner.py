"""Runs one scheduled batch through the model: builds the step's AttentionMetadata, runs the
forward (eagerly, or replaying a CUDA graph for decode batches on GPU) and samples.

CUDA graphs: decode steps (one token per sequence) of batch size B replay the graph captured for
the smallest bucket >= B. Buckets are 1, 2, 4, 8, then multiples of 16 up to max_num_seqs;
they are captured largest first into one memory pool. Static buffers are sized for the largest
bucket; padded rows get slot -1 and a one-token sequence on page 0, the pool's scratch page
that the block manager never hands out (the fused kernel derives slots from the tables).

Two ways to run a step: `run(batch)` returns the sampled tokens on the host (the synchronous
engine); `launch(batch, prev)` enqueues the step and returns a `LaunchedStep` whose tokens stay on
the device until asked for, so the host can schedule and prepare the next step while the GPU
runs this one (async scheduling). A sequence decoding the token that `prev` samples has no id for
it yet (seq.num_pending): its input is a hole in the host ids, filled on the device from `prev`'s
sampled tokens.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from ..kernels import ops
from ..models.model import AttentionMetadata, CausalLM
from . import sampler
from .scheduler import ScheduledBatch


@dataclass
class StepMarks:
    """Timing of one step (recorded when ModelRunner.step_marks is a list): `start` is marked
    when the step's device work is enqueued (after `prepare`), `end` after its sampling; CUDA
    events on GPU (read lazily: reading them never stalls the pipeline), perf_counter seconds on
    CPU. `prev_end` is the previous recorded step's end: the device idles between the two
    marks, waiting for the host."""

    is_decode: bool
    batch_size: int
    num_tokens: int
    prepare_ms: float
    start: object = None
    end: object = None
    prev_end: object = None

    @staticmethod
    def _ms(a, b) -> float:
        if isinstance(a, float):
            return (b - a) * 1e3
        b.synchronize()
        return a.elapsed_time(b)

    @property
    def device_ms(self) -> float:
        """From the step's first device work to its sampled tokens (the GPU's share)."""
        return self._ms(self.start, self.end)

    @property
    def forward_ms(self) -> float:
        return self.prepare_ms + self.device_ms

    @property
    def idle_before_ms(self) -> float | None:
        """Device idle time between the previous step and this one: host time not hidden."""
        return None if self.prev_end is None else max(0.0, self._ms(self.prev_end, self.start))


@dataclass
class LaunchedStep:
    """A step enqueued by ModelRunner.launch: `sampled` are the sequences it samples a token
    for, in the order of `tokens` (int64 on the device); `host` receives them (pinned on GPU)
    once `ready` (a CUDA event) has passed."""

    sampled: list = field(default_factory=list)
    tokens: torch.Tensor | None = None
    host: torch.Tensor | None = None
    ready: object = None

    def rows(self) -> dict:
        """Sequence -> its row of `tokens`."""
        return {id(s): i for i, s in enumerate(self.sampled)}

    def results(self) -> list[int]:
        """The sampled tokens on the host (waits for this step only)."""
        if self.ready is not None:
            self.ready.synchronize()
        return self.host.tolist()


def graph_buckets(max_num_seqs: int) -> list[int]:
    b = [s for s in (1, 2, 4, 8) if s < max_num_seqs]
    b += list(range(16, max_num_seqs, 16))
    return sorted(set(b + [max_num_seqs]))


class ModelRunner:
    def __init__(self, model: CausalLM, kv_pool: torch.Tensor, max_num_seqs: int,
                 max_seq_len: int, cuda_graphs: bool | str = "auto"):
        self.model = model
        self.kv_pool = kv_pool
        self.device = model.device
        self.page_size = model.layout.page_size
        self.max_num_seqs = max_num_seqs
        self.max_pages = -(-max_seq_len // self.page_size)
        self._zero_table_row = np.zeros(self.max_pages, dtype=np.int32)   # padding rows
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.step_marks: list[StepMarks] | None = None   # a list: record every step's timing
        self._last_end = None
        self._fill_from: LaunchedStep | None = None      # forward's source for token holes
        self.graph_note = "eager (CPU)" if self.device.type != "cuda" else "eager"
        if cuda_graphs not in (True, False, "auto"):
            raise ValueError("cuda_graphs must be True, False or 'auto'")
        if self.device.type == "cuda" and cuda_graphs:
            if not ops.available() and cuda_graphs == "auto":
                self.graph_note = "eager: compiled kernels not available (reference ops sync)"
            else:
                self._capture()

    # -- metadata ---------------------------------------------------------------------------
    def prepare(self, batch: ScheduledBatch, pad_to: int | None = None, on_device: bool = True,
                holes: list | None = None, pin: bool = False):
        """(input_ids [T], AttentionMetadata), on the model's device unless on_device=False.

        A token a launched step is still sampling (seq.num_pending) gets id 0 and its
        (flat index, sequence) is appended to `holes`; without a `holes` list it is an error.
        pin: host tensors in pinned memory (copies to the device that never wait for it).

        Host cost matters: at 256 decoding sequences this runs once per step while the GPU
        waits. Decode rows (one token) take a scalar path, and the block tables are stacked
        from rows cached on each sequence (`table_row`: only pages added since the last step
        are converted; a list -> numpy row per sequence and step was ~40 % of a 256-sequence
        step's host time).
        """
        ids, pos, slots, q_lens, seq_lens, logits_idx, tables = [], [], [], [], [], [], []
        ps = self.page_size
        for seq, n in zip(batch.seqs, batch.num_tokens):
            start = seq.num_computed
            table = seq.block_table
            if n == 1:
                if seq.num_pending and start >= len(seq.token_ids):
                    self._hole(holes, len(ids), seq)
                    ids.append(0)
                else:
                    ids.append(seq.token_ids[start])
                pos.append(start)
                slots.append(table[start // ps] * ps + start % ps)
            else:
                chunk = seq.token_ids[start:start + n]
                if len(chunk) < n:                  # only the launched step's token is missing
                    if len(chunk) != n - 1:
                        raise RuntimeError(f"{seq!r}: {n - len(chunk)} tokens not sampled yet")
                    self._hole(holes, len(ids) + n - 1, seq)
                ids.extend(chunk + [0] * (n - len(chunk)))
                span = range(start, start + n)
                pos.extend(span)
                slots.extend(table[i // ps] * ps + i % ps for i in span)
            q_lens.append(n)
            seq_lens.append(start + n)
            if start + n == len(seq):                 # chunk reaches the end: sample
                logits_idx.append(len(ids) - 1)
            tables.append(self.table_row(seq))
        rows = len(tables)
        width = max(seq.num_pages for seq in batch.seqs) if batch.seqs else 1
        if pad_to is not None:
            extra = pad_to - rows
            ids += [0] * extra
            pos += [0] * extra
            slots += [-1] * extra
            q_lens += [1] * extra
            seq_lens += [1] * extra
            logits_idx += list(range(rows, pad_to))
            tables += [self._zero_table_row] * extra
            width = self.max_pages
        # one copy at the width the step needs (rows are cached at max_pages)
        cols = max(width, 1)
        bt = np.stack(tables if cols >= self.max_pages else [r[:cols] for r in tables])
        pin = pin and self.device.type == "cuda"

        def t(xs, dtype):
            return torch.tensor(xs, dtype=dtype, pin_memory=pin)
        ql = t(q_lens, torch.int32)
        cu = torch.zeros(len(q_lens) + 1, dtype=torch.int32, pin_memory=pin)
        cu[1:] = torch.cumsum(ql, 0)
        bt = torch.from_numpy(bt)
        meta = AttentionMetadata(
            positions=t(pos, torch.int64), slot_mapping=t(slots, torch.int64),
            block_tables=bt.pin_memory() if pin else bt, seq_lens=t(seq_lens, torch.int32),
            q_lens=ql, logits_indices=t(logits_idx, torch.int64), cu_q_lens=cu,
            is_decode=batch.is_decode or pad_to is not None, max_q_len=max(q_lens),
            max_seq_len=width * ps)
        input_ids = t(ids, torch.int64)
        if on_device and self.device.type != "cpu":
            return input_ids.to(self.device, non_blocking=True), meta.to(self.device)
        return input_ids, meta

    @staticmethod
    def _hole(holes: list | None, index: int, seq) -> None:
        if holes is None:
            raise RuntimeError(f"{seq!r}: a token of this step is not sampled yet (async "
                               "scheduling needs ModelRunner.launch)")
        holes.append((index, seq))

    def table_row(self, seq) -> np.ndarray:
        """seq's block table as an int32 row of max_pages (0-padded), cached on the sequence.
        The block manager only appends to a table or replaces the list (free, fork), so the
        list's identity and length say what is new since the row was last built."""
        table, cached = seq.block_table, seq.table_row
        if cached is not None and cached[0] is table and cached[1] <= len(table) \
                and cached[2].shape[0] == self.max_pages:
            _, n, row = cached
        else:
            n, row = 0, np.zeros(self.max_pages, dtype=np.int32)
        if len(table) > n:
            row[n:len(table)] = table[n:]
        seq.table_row = (table, len(table), row)
        return row

    # -- forward ---------------------------------------------------------------------------
    def forward(self, batch: ScheduledBatch) -> torch.Tensor:
        """fp32 logits [S, V] for the sequences whose chunk reaches their end, in batch order.
        Token holes (see prepare) are filled from the tokens of `self._fill_from` (set by
        launch for the duration of the call, so that wrappers of forward(batch) keep working)."""
        b = len(batch)
        holes = [] if self._fill_from is not None else None
        t0 = time.perf_counter()
        if self.graphs and batch.is_decode and b <= self.max_num_seqs:
            bucket = next(s for s in sorted(self.graphs) if s >= b)
            # host tensors straight into the graph's static inputs: one copy each, ordered on
            # the stream after the previous replay
            input_ids, meta = self.prepare(batch, pad_to=bucket, on_device=False, holes=holes,
                                           pin=holes is not None)
            self._mark_start(batch, t0)
            st = self._static
            st["input_ids"][:bucket].copy_(input_ids, non_blocking=True)
            for name in ("positions", "slot_mapping", "block_tables", "seq_lens",
                         "logits_indices"):
                getattr(st["meta"][bucket], name).copy_(getattr(meta, name), non_blocking=True)
            self._fill_holes(st["input_ids"], holes)
            self.graphs[bucket].replay()
            return st["logits"][bucket][:b]
        if holes is not None and self.device.type == "cuda":
            input_ids, meta = self.prepare(batch, on_device=False, holes=holes, pin=True)
            self._mark_start(batch, t0)
            input_ids, meta = input_ids.to(self.device, non_blocking=True), meta.to(self.device)
        else:
            input_ids, meta = self.prepare(batch, holes=holes)
            self._mark_start(batch, t0)
        self._fill_holes(input_ids, holes)
        return self.model(input_ids, meta, self.kv_pool)

    def _fill_holes(self, input_ids: torch.Tensor, holes: list | None) -> None:
        """input_ids[i] = the token `_fill_from` samples for seq, for each hole (i, seq)."""
        if not holes:
            return
        prev = self._fill_from
        rows = prev.rows()
        try:
            idx = [[i for i, _ in holes], [rows[id(s)] for _, s in holes]]
        except KeyError:
            raise RuntimeError("a token hole whose sequence the step in flight does not "
                               "sample") from None
        idx = torch.tensor(idx, dtype=torch.int64,
                           pin_memory=self.device.type == "cuda").to(self.device, non_blocking=True)
        input_ids.index_copy_(0, idx[0], prev.tokens.index_select(0, idx[1]))

    @staticmethod
    def _sampled(batch: ScheduledBatch) -> list:
        return [s for s, n in zip(batch.seqs, batch.num_tokens) if s.num_computed + n == len(s)]

    def run(self, batch: ScheduledBatch) -> list[int | None]:
        """Sampled token per sequence of the batch (None where the chunk was a partial prefill):
        launch, then wait for this step's tokens."""
        it = iter(self.launch(batch).results())
        return [next(it) if s.num_computed + n == len(s) else None
                for s, n in zip(batch.seqs, batch.num_tokens)]

    def launch(self, batch: ScheduledBatch, prev: LaunchedStep | None = None) -> LaunchedStep:
        """Enqueue the step and return at once (on GPU): the sampled tokens stay on the device.
        prev: the step launched before this one and not yet resolved, whose sampled tokens are
        the inputs of this step's holes. The caller advances num_computed / num_pending."""
        step = LaunchedStep(self._sampled(batch))
        self._fill_from = prev
        try:
            logits = self.forward(batch)
        finally:
            self._fill_from = None
        if step.sampled:
            step.tokens = sampler.sample_tensor(logits, [s.params for s in step.sampled],
                                                [s.generator for s in step.sampled])
        else:
            step.tokens = torch.zeros(0, dtype=torch.int64, device=self.device)
        if self.device.type == "cuda":
            step.host = torch.empty(step.tokens.shape, dtype=torch.int64, pin_memory=True)
            step.host.copy_(step.tokens, non_blocking=True)
            step.ready = torch.cuda.Event()
            step.ready.record()
        else:
            step.host = step.tokens
        self._mark_end()
        return step

    # -- timing (bench.step_timer) ----------------------------------------------------------
    def _now(self):
        if self.device.type == "cuda":
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def _mark_start(self, batch: ScheduledBatch, t0: float) -> None:
        if self.step_marks is None:
            return
        self.step_marks.append(StepMarks(batch.is_decode, len(batch), batch.total_tokens,
                                         (time.perf_counter() - t0) * 1e3, self._now(),
                                         prev_end=self._last_end))

    def _mark_end(self) -> None:
        if self.step_marks is None or not self.step_marks or self.step_marks[-1].end is not None:
            return
        self._last_end = self.step_marks[-1].end = self._now()

    # -- CUDA graphs ------------------------------------------------------------------------
    def _capture(self) -> None:
        buckets = graph_buckets(self.max_num_seqs)
        mx = buckets[-1]
        dev = self.device
        st = {"input_ids": torch.zeros(mx, dtype=torch.int64, device=dev), "meta": {},
              "logits": {}}
        # one static metadata view per bucket, all slices of the max-size buffers
        full = AttentionMetadata(
            positions=torch.zeros(mx, dtype=torch.int64, device=dev),
            slot_mapping=torch.full((mx,), -1, dtype=torch.int64, device=dev),
            block_tables=torch.zeros(mx, self.max_pages, dtype=torch.int32, device=dev),
            seq_lens=torch.ones(mx, dtype=torch.int32, device=dev),
            q_lens=torch.ones(mx, dtype=torch.int32, device=dev),
            logits_indices=torch.arange(mx, dtype=torch.int64, device=dev),
            cu_q_lens=torch.arange(mx + 1, dtype=torch.int32, device=dev), is_decode=True,
            max_q_len=1, max_seq_len=self.max_pages * self.page_size)
        pool = None
        try:
            for bs in reversed(buckets):
                meta = AttentionMetadata(full.positions[:bs], full.slot_mapping[:bs],
                                         full.block_tables[:bs], full.seq_lens[:bs],
                                         full.q_lens[:bs], full.logits_indices[:bs],
                                         full.cu_q_lens[:bs + 1], True, 1, full.max_seq_len)
                ids = st["input_ids"][:bs]
                self.model(ids, meta, self.kv_pool)            # warm up (lazy inits)
                torch.cuda.synchronize()
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g, pool=pool):
                    st["logits"][bs] = self.model(ids, meta, self.kv_pool)
                pool = g.pool() if pool is None else pool
                self.graphs[bs] = g
                st["meta"][bs] = meta
            torch.cuda.synchronize()
        except Exception as e:                                   # noqa: BLE001
            self.graphs.clear()
            self.graph_note = f"eager: CUDA graph capture failed ({type(e).__name__}: {e})"
            print(f"sawtrt: warning: {self.graph_note}", file=sys.stderr)
            return
        self._static = st
        self.graph_note = f"CUDA graphs for decode batch sizes {buckets}"
