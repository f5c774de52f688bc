"""The user-facing API: `LLM(engine_dir).generate(prompts, params)` and `.stream(prompt, params)`.
"""
from __future__ import annotations

import contextlib
import itertools
from collections import deque
from dataclasses import dataclass
from typing import Iterator

from .llm_engine import LLMEngine, StepOutput
from .sampling import SamplingParams


@dataclass
class GenerationOutput:
    text: str
    token_ids: list[int]
    finish_reason: str | None


class LLM:
    def __init__(self, engine_dir, device=None, **engine_kwargs):
        self.engine = LLMEngine.from_engine_dir(engine_dir, device=device, **engine_kwargs)
        self._ids = itertools.count()
        # request id -> its outputs not yet consumed: every call steps the one engine, so each
        # routes what a step yields to the calls waiting on it (streams may interleave)
        self._inbox: dict[str, deque[StepOutput]] = {}

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def generate(self, prompts: list[str] | list[list[int]],
                 params: SamplingParams | list[SamplingParams] | None = None
                 ) -> list[GenerationOutput]:
        """Run all prompts to completion (continuously batched); outputs in prompt order."""
        if isinstance(prompts, str):
            prompts = [prompts]
        plist = params if isinstance(params, list) else [params or SamplingParams()] * len(prompts)
        if len(plist) != len(prompts):
            raise ValueError("one SamplingParams per prompt, or a single one for all")
        rids = [f"gen-{next(self._ids)}" for _ in prompts]
        results = []
        with self._requests(rids, prompts, plist) as finished:
            for rid in rids:        # the others' outputs wait in their inboxes meanwhile
                outs = list(self._outputs(rid, finished))
                results.append(GenerationOutput("".join(o.new_text for o in outs),
                                                [t for o in outs for t in o.new_token_ids],
                                                outs[-1].finish_reason))
        return results

    def stream(self, prompt: str | list[int], params: SamplingParams | None = None
               ) -> Iterator[str]:
        """Yield text deltas as they are generated."""
        for out in self.stream_outputs(prompt, params):
            if out.new_text:
                yield out.new_text

    def stream_outputs(self, prompt: str | list[int], params: SamplingParams | None = None
                       ) -> Iterator[StepOutput]:
        """Yield the request's StepOutputs as they come (token ids, text delta, finish reason);
        the request is aborted if the caller stops early."""
        rid = f"stream-{next(self._ids)}"
        with self._requests([rid], [prompt], [params or SamplingParams()]) as finished:
            yield from self._outputs(rid, finished)

    @contextlib.contextmanager
    def _requests(self, rids, prompts, plist):
        """Add the requests with an inbox each; on exit abort those not finished (the caller
        stopped early or raised) and drop their inboxes. Yields the set of finished ids."""
        finished: set[str] = set()
        for rid in rids:
            self._inbox[rid] = deque()
        try:
            for rid, prompt, p in zip(rids, prompts, plist):
                self.engine.add_request(rid, prompt, p)
            yield finished
        finally:
            for rid in rids:
                if rid not in finished:
                    self.engine.abort_request(rid)
                self._inbox.pop(rid, None)

    def _outputs(self, rid: str, finished: set[str]) -> Iterator[StepOutput]:
        """rid's outputs up to its finishing one, stepping the engine while its inbox is empty."""
        box = self._inbox[rid]
        while True:
            while not box:
                outs = self.engine.step()
                for out in outs:
                    other = self._inbox.get(out.request_id)
                    if other is not None:
                        other.append(out)
                if not outs and not self.engine.has_unfinished():
                    raise RuntimeError(f"request {rid} ended without a finishing output")
            out = box.popleft()
            if out.finished:
                finished.add(rid)
            yield out
            if out.finished:
                return
