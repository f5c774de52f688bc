"""Times the forward of every engine step without changing what the engine does.

`ForwardTimer(engine)` wraps `engine.runner.forward` (CUDA events on GPU, perf_counter on CPU)
and records one `ForwardRecord` per call: whether the batch was a pure decode batch (the
CUDA-graph path), its size, its token count and the forward's device time. The extra
synchronisation costs nothing measurable: the sampler reads the logits back right after.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch


@dataclass
class ForwardRecord:
    is_decode: bool
    batch_size: int
    num_tokens: int
    forward_ms: float


class ForwardTimer:
    def __init__(self, engine):
        self.runner = engine.runner
        self.cuda = engine.device.type == "cuda"
        self.records: list[ForwardRecord] = []
        self._orig = None

    def _timed(self, batch):
        rec = ForwardRecord(batch.is_decode, len(batch), batch.total_tokens, 0.0)
        if self.cuda:
            e0 = torch.cuda.Event(enable_timing=True)
            e1 = torch.cuda.Event(enable_timing=True)
            e0.record()
            out = self._orig(batch)
            e1.record()
            e1.synchronize()
            rec.forward_ms = e0.elapsed_time(e1)
        else:
            t0 = time.perf_counter()
            out = self._orig(batch)
            rec.forward_ms = (time.perf_counter() - t0) * 1e3
        self.records.append(rec)
        return out

    def __enter__(self) -> "ForwardTimer":
        self._orig = self.runner.forward
        self.runner.forward = self._timed
        return self

    def __exit__(self, *exc) -> None:
        self.runner.forward = self._orig
