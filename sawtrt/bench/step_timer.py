"""Times every model step of an engine without changing what the engine does or when it waits.

`ForwardTimer(engine)` turns on the runner's step marks (`ModelRunner.step_marks`) and collects
one `ForwardRecord` per step: whether the batch was a pure decode batch (the CUDA-graph path),
its size, its token count, the host time of its metadata build (`prepare_ms`), and two marks:
when the step's device work was enqueued and when its sampling was. On GPU the marks are CUDA
events, read lazily (only when a record's time is asked for, normally after the timed run), so
the timer adds no synchronisation and the async engine keeps running ahead of the GPU.

  device_ms       first device work of the step to its sampled tokens: the GPU's share
  forward_ms      prepare_ms + device_ms (the synchronous engine's forward)
  idle_before_ms  the device's idle time between the previous step's end and this step's start:
                  the host time that is not hidden behind the GPU (all of it for the
                  synchronous engine; what async scheduling fails to overlap otherwise)
"""
from __future__ import annotations

from ..engine.model_runner import StepMarks

ForwardRecord = StepMarks


class ForwardTimer:
    def __init__(self, engine):
        self.runner = engine.runner
        self.records: list[ForwardRecord] = []
        self._saved = None

    def __enter__(self) -> "ForwardTimer":
        self._saved = self.runner.step_marks
        self.records = []
        self.runner.step_marks = self.records
        self.runner._last_end = None
        return self

    def __exit__(self, *exc) -> None:
        self.runner.step_marks = self._saved
