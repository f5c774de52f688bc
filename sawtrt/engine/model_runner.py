"""Runs one scheduled batch through the model: builds the step's AttentionMetadata, runs the
forward (eagerly, or replaying a CUDA graph for decode batches on GPU) and samples.

CUDA graphs: decode steps (one token per sequence) of batch size B replay the graph captured for
the smallest bucket >= B. Buckets are 1, 2, 4, 8, then multiples of 16 up to max_num_seqs;
they are captured largest first into one memory pool. Static buffers are sized for the largest
bucket; padded rows get slot -1 and a one-token sequence on page 0, the pool's scratch page
that the block manager never hands out (the fused kernel derives slots from the tables).
"""
from __future__ import annotations

import sys

import numpy as np
import torch

from ..kernels import ops
from ..models.model import AttentionMetadata, CausalLM
from . import sampler
from .scheduler import ScheduledBatch


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
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.graph_note = "eager (CPU)" if self.device.type != "cuda" else "eager"
        if cuda_graphs not in (True, False, "auto"):
            raise ValueError("cuda_graphs must be True, False or 'auto'")
        if self.device.type == "cuda" and cuda_graphs:
            if not ops.available() and cuda_graphs == "auto":
                self.graph_note = "eager: compiled kernels not available (reference ops sync)"
            else:
                self._capture()

    # -- metadata ---------------------------------------------------------------------------
    def prepare(self, batch: ScheduledBatch, pad_to: int | None = None, on_device: bool = True):
        """(input_ids [T], AttentionMetadata), on the model's device unless on_device=False.

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
                ids.append(seq.token_ids[start])
                pos.append(start)
                slots.append(table[start // ps] * ps + start % ps)
            else:
                ids.extend(seq.token_ids[start:start + n])
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
            tables += [self._zero_row()] * extra
            width = self.max_pages
        bt = np.stack(tables)
        if width < self.max_pages:
            bt = np.ascontiguousarray(bt[:, :max(width, 1)])
        ql = torch.tensor(q_lens, dtype=torch.int32)
        cu = torch.zeros(len(q_lens) + 1, dtype=torch.int32)
        cu[1:] = torch.cumsum(ql, 0)
        meta = AttentionMetadata(
            positions=torch.tensor(pos, dtype=torch.int64),
            slot_mapping=torch.tensor(slots, dtype=torch.int64),
            block_tables=torch.from_numpy(bt), seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
            q_lens=ql, logits_indices=torch.tensor(logits_idx, dtype=torch.int64), cu_q_lens=cu,
            is_decode=batch.is_decode or pad_to is not None, max_q_len=max(q_lens),
            max_seq_len=width * ps)
        input_ids = torch.tensor(ids, dtype=torch.int64)
        if on_device and self.device.type != "cpu":
            return input_ids.to(self.device, non_blocking=True), meta.to(self.device)
        return input_ids, meta

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

    def _zero_row(self) -> np.ndarray:
        z = getattr(self, "_zeros", None)
        if z is None or z.shape[0] != self.max_pages:
            z = self._zeros = np.zeros(self.max_pages, dtype=np.int32)
        return z

    # -- forward ----------------------------------------------------------------------------
    def forward(self, batch: ScheduledBatch) -> torch.Tensor:
        """fp32 logits [S, V] for the sequences whose chunk reaches their end, in batch order."""
        b = len(batch)
        if self.graphs and batch.is_decode and b <= self.max_num_seqs:
            bucket = next(s for s in sorted(self.graphs) if s >= b)
            # host tensors straight into the graph's static inputs: one copy each, ordered on
            # the stream after the previous replay
            input_ids, meta = self.prepare(batch, pad_to=bucket, on_device=False)
            st = self._static
            st["input_ids"][:bucket].copy_(input_ids, non_blocking=True)
            for name in ("positions", "slot_mapping", "block_tables", "seq_lens",
                         "logits_indices"):
                getattr(st["meta"][bucket], name).copy_(getattr(meta, name), non_blocking=True)
            self.graphs[bucket].replay()
            return st["logits"][bucket][:b]
        input_ids, meta = self.prepare(batch)
        return self.model(input_ids, meta, self.kv_pool)

    def run(self, batch: ScheduledBatch) -> list[int | None]:
        """Sampled token per sequence of the batch (None where the chunk was a partial prefill)."""
        logits = self.forward(batch)
        want = [(s, n) for s, n in zip(batch.seqs, batch.num_tokens)
                if s.num_computed + n == len(s)]
        toks = sampler.sample(logits, [s.params for s, _ in want],
                              [s.generator for s, _ in want]) if want else []
        it = iter(toks)
        return [next(it) if s.num_computed + n == len(s) else None
                for s, n in zip(batch.seqs, batch.num_tokens)]

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
