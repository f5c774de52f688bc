"""The user-facing API: `LLM(engine_dir).generate(prompts, params)` and `.stream(prompt, params)`.
"""
from __future__ import annotations

import itertools
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
        texts = {r: [] for r in rids}
        toks = {r: [] for r in rids}
        reasons: dict[str, str | None] = {}
        try:
            for rid, prompt, p in zip(rids, prompts, plist):
                self.engine.add_request(rid, prompt, p)
            while len(reasons) < len(rids):
                for out in self.engine.step():
                    if out.request_id not in texts:
                        continue
                    texts[out.request_id].append(out.new_text)
                    toks[out.request_id].extend(out.new_token_ids)
                    if out.finished:
                        reasons[out.request_id] = out.finish_reason
        finally:
            for rid in rids:
                if rid not in reasons:
                    self.engine.abort_request(rid)
        return [GenerationOutput("".join(texts[r]), toks[r], reasons[r]) for r in rids]

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
        self.engine.add_request(rid, prompt, params or SamplingParams())
        done = False
        try:
            while not done:
                for out in self.engine.step():
                    if out.request_id == rid:
                        done = out.finished
                        yield out
        finally:
            if not done:
                self.engine.abort_request(rid)
