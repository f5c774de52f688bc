"""Times the forward of every engine step without changing what the engine does.

`ForwardTimer(engine)` wraps `engine.runner.forward` (CUDA events on GPU, perf_counter on CPU)
and `engine.runner.prepare` (perf_counter), and records one `ForwardRecord` per forward call:
whether the batch was a pure decode batch (the CUDA-graph path), its size, its token count, the
forward's time from its first to its last GPU event, and the host time of the metadata build
(`prepare`) inside it, during which the GPU has nothing to do. `device_ms` = forward - prepare
is the GPU's share; the rest of a step's wall time is host work. The extra synchronisation
costs nothing measurable: the sampler reads the logits back right after.
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
    prepare_ms: float = 0.0

    @property
    def device_ms(self) -> float:
        return self.forward_ms - self.prepare_ms


class ForwardTimer:
    def __init__(self, engine):
        self.runner = engine.runner
        self.cuda = engine.device.type == "cuda"
        self.records: list[ForwardRecord] = []
        self._orig = None
        self._orig_prepare = None
        self._prepare_ms = 0.0

    def _timed_prepare(self, *args, **kwargs):
        t0 = time.perf_counter()
        out = self._orig_prepare(*args, **kwargs)
        self._prepare_ms += (time.perf_counter() - t0) * 1e3
        return out

    def _timed(self, batch):
        rec = ForwardRecord(batch.is_decode, len(batch), batch.total_tokens, 0.0)
        self._prepare_ms = 0.0
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
        rec.prepare_ms = self._prepare_ms
        self.records.append(rec)
        return out

    def __enter__(self) -> "ForwardTimer":
        self._orig, self._orig_prepare = self.runner.forward, self.runner.prepare
        self.runner.forward, self.runner.prepare = self._timed, self._timed_prepare
        return self

    def __exit__(self, *exc) -> None:
        self.runner.forward, self.runner.prepare = self._orig, self._orig_prepare
