"""Continuous batching with chunked prefill and preemption by recompute.

Each step mixes decode tokens and prefill chunks under a token budget. Sequences are served
first-come first-served: running sequences take their share first (a decode needs 1 token, a
prefill the rest of its prompt up to the remaining budget), then waiting ones are admitted while
budget, batch slots and pages allow. When a running sequence cannot get the pages for its share,
the latest-arrived running sequences are preempted: their pages are freed, they go back to the
front of the waiting queue and their K/V are recomputed (prompt + tokens generated so far) when
they are admitted again. Generated tokens are kept, so preemption does not change outputs
where prompt tokens read the cache (CausalLM prefill_kv "cache"); under "fresh" the recompute
prefills the generated tokens with the prompt, as prompt tokens attending to their own chunk's
unquantized K/V, so later tokens may differ as they would under another chunking.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from .block_manager import BlockManager
from .sequence import Sequence, Status


@dataclass
class ScheduledBatch:
    """One step's work: seqs[i] runs its next num_tokens[i] uncomputed tokens."""

    seqs: list[Sequence] = field(default_factory=list)
    num_tokens: list[int] = field(default_factory=list)
    num_preempted: int = 0

    @property
    def is_decode(self) -> bool:
        """Every sequence contributes one token whose logits are sampled (CUDA-graph path)."""
        return bool(self.seqs) and all(n == 1 and s.num_uncomputed == 1
                                       for s, n in zip(self.seqs, self.num_tokens))

    @property
    def total_tokens(self) -> int:
        return sum(self.num_tokens)

    def __len__(self) -> int:
        return len(self.seqs)


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int,
                 max_num_batched_tokens: int, max_seq_len: int):
        if max_num_batched_tokens < max_num_seqs:
            raise ValueError("max_num_batched_tokens must be >= max_num_seqs (one decode token "
                             "per running sequence)")
        if block_manager.num_pages * block_manager.page_size < max_seq_len:
            raise ValueError(f"the KV pool ({block_manager.num_pages} pages of "
                             f"{block_manager.page_size} tokens) cannot hold one sequence of "
                             f"max_seq_len={max_seq_len} tokens")
        self.bm = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_seq_len = max_seq_len
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []       # kept in arrival order
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        seq.status = Status.WAITING
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def _preempt(self, seq: Sequence) -> None:
        self.bm.free(seq)
        seq.num_computed = 0
        seq.status = Status.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.running.remove(seq)
        self.waiting.appendleft(seq)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.max_num_batched_tokens
        # 1. running sequences, oldest first; preempt from the youngest end when pages run out
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_uncomputed, budget)
            while not self.bm.can_allocate(seq, seq.num_computed + n):
                victim = self.running[-1]
                self._preempt(victim)
                batch.num_preempted += 1
                if victim is seq:
                    break
            if seq.status != Status.RUNNING:
                break                          # seq itself was the youngest: nothing after it
            self.bm.allocate_for(seq, seq.num_computed + n)
            batch.seqs.append(seq)
            batch.num_tokens.append(n)
            budget -= n
            i += 1
        # 2. admit waiting sequences (not in a step that had to preempt)
        while (self.waiting and budget > 0 and not batch.num_preempted
               and len(self.running) < self.max_num_seqs):
            seq = self.waiting[0]
            n = min(seq.num_uncomputed, budget)
            if not self.bm.can_allocate(seq, seq.num_computed + n):
                break
            self.waiting.popleft()
            self.bm.allocate_for(seq, seq.num_computed + n)
            seq.status = Status.RUNNING
            self._insert_running(seq)
            batch.seqs.append(seq)
            batch.num_tokens.append(n)
            budget -= n
        return batch

    def _insert_running(self, seq: Sequence) -> None:
        # keep arrival order so "youngest" is always running[-1]
        pos = len(self.running)
        while pos > 0 and self.running[pos - 1].arrival > seq.arrival:
            pos -= 1
        self.running.insert(pos, seq)

    def retire(self, seq: Sequence) -> None:
        """A running sequence whose token in flight is certainly its last (async scheduling:
        max_tokens or max_seq_len reached): free its pages and its batch slot now, as the
        synchronous engine would have before this schedule; `finish` follows when the token
        arrives. The step in flight may still write the freed pages: it runs before any step
        that hands them to another sequence (one stream)."""
        self.running.remove(seq)
        self.bm.free(seq)
        seq.status = Status.RETIRING

    def finish(self, seq: Sequence, reason: str) -> None:
        """Mark finished and release its pages (from running or waiting; a retiring sequence
        has none)."""
        if seq.status == Status.RUNNING:
            self.running.remove(seq)
        elif seq.status == Status.WAITING:
            self.waiting.remove(seq)
        self.bm.free(seq)
        seq.status = Status.FINISHED
        seq.finish_reason = reason
