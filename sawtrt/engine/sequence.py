"""A `Sequence` is the one object that flows between scheduler, block manager and runner."""
from __future__ import annotations

import enum

import torch

from .sampling import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"        # no pages (new, or preempted: its KV will be recomputed)
    RUNNING = "running"        # holds pages; prefilling (in chunks) or decoding
    RETIRING = "retiring"      # async scheduling: its last token is in flight; no pages, not
                               # scheduled again, finished when that token arrives
    FINISHED = "finished"


class Sequence:
    """One request: prompt + generated tokens, its page table and its progress.

    num_computed   tokens whose K/V are in the cache (or will be once the launched steps run)
    block_table    page ids owned (reference-counted by the block manager)
    num_pending    async scheduling: tokens sampled by launched steps whose values have not
                   reached the host yet; they count in len(seq) (the scheduler and the runner
                   plan with them) but not in token_ids (what was generated and can be emitted)
    """

    def __init__(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                 arrival: int, generator: torch.Generator | None = None):
        self.request_id = request_id
        self.token_ids: list[int] = list(prompt_ids)
        self.num_prompt_tokens = len(prompt_ids)
        self.params = params
        self.arrival = arrival
        self.generator = generator
        self.status = Status.WAITING
        self.num_computed = 0
        self.num_pending = 0
        self.block_table: list[int] = []
        # ModelRunner.table_row's cache: (the block_table list it was built from, its length,
        # the int32 row of max_pages)
        self.table_row = None
        self.finish_reason: str | None = None
        self.num_preemptions = 0
        # detokenization state
        self.text = ""              # decoded text of the output (stop strings cut)
        self.num_emitted_chars = 0  # chars of `text` already handed out as deltas
        self.num_emitted_tokens = 0
        # incremental detokenization (IncrementalDetokenizer.text): output ids [detok_prefix,
        # detok_read) are already in `detok_text` and are re-decoded as context for new ids
        self.detok_text = ""
        self.detok_prefix = 0
        self.detok_read = 0

    def __len__(self) -> int:
        return len(self.token_ids) + self.num_pending

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def num_uncomputed(self) -> int:
        """Tokens still to be run through the model (prompt chunks or the last sampled one)."""
        return len(self) - self.num_computed

    @property
    def num_pages(self) -> int:
        return len(self.block_table)

    @property
    def is_finished(self) -> bool:
        return self.status == Status.FINISHED

    def __repr__(self) -> str:
        return (f"Sequence({self.request_id!r}, {self.status.value}, len={len(self)}, "
                f"computed={self.num_computed}, pending={self.num_pending}, "
                f"pages={len(self.block_table)})")
