"""The served path: sawtrt's own torch model (sawtrt.models.model.CausalLM) over the paged cache.

For Llama-architecture checkpoints the runtime knows (SmolLM2-135M): weights from the GGUF by
`sawtrt.models.weights.load_gguf`, the model's forward writes each step's K/V into the pool with
`ops.write_kv` and attends with `ops.paged_attention` — exactly what `LLM.generate` runs, minus
the scheduler. The model computes in fp32 here so that the KV policy is the only thing that
changes between rows of a table.
"""
from __future__ import annotations

import math

import torch

from .. import kv_cache
from ..spec import KVPolicy, PageLayout
from ..data.corpus import Window

RUNTIME_MODELS = ("smollm2-135m",)


class RuntimeModel:
    """One CausalLM per KV policy, sharing one set of weights."""

    def __init__(self, name: str, page_size: int = 64, dtype=torch.float32, weights=None,
                 tokenizer=None, calib_sources=None, calib_tokens: int | None = None,
                 shrink: float = 0.0, prefill_kv: str = "cache"):
        """weights: HF-named tensors to use instead of loading the GGUF with the runtime's
        loader (tests pass the transformers model's state dict: the same de-quantized numbers).
        tokenizer: the transformers tokenizer, for policies with center / balance / whiten (their K
        calibration is computed here the way `sawtrt build` computes it).
        calib_sources: the calibration text (corpus names or Texts; default the build's
        'calib'), calib_tokens tokens of each; shrink: the whitening's moment shrinkage."""
        if weights is None:
            from ..models.weights import load_gguf
            from .hf_models import gguf_source
            src, fname = gguf_source(name)
            self.spec, self.weights = load_gguf(src / fname, name)
        else:
            from ..models.specs import get_spec
            self.spec, self.weights = get_spec(name), weights
        self.page_size, self.dtype, self.tokenizer = page_size, dtype, tokenizer
        self.prefill_kv = prefill_kv     # CausalLM's switch; "fresh" prefills in chunks
        self._models: dict[str, object] = {}
        self._calibration = None
        self.calib_sources, self.calib_tokens, self.shrink = calib_sources, calib_tokens, shrink

    def calibration(self):
        """The K calibration `sawtrt build` would write for these weights (computed once)."""
        from ..models import kv_transform as kvt
        if self._calibration is None:
            if self.tokenizer is None:
                raise ValueError("center / balance / whiten policies need RuntimeModel(tokenizer=...)")
            tok = self.tokenizer
            encode = lambda t: tok(t, add_special_tokens=False).input_ids      # noqa: E731
            if self.calib_sources is None:
                ids, meta = kvt.calibration_ids(encode)
                ws = kvt.calibration_windows(ids, tok.bos_token_id)
            else:
                ws, meta = kvt.calibration_sample(
                    encode, tok.bos_token_id, self.calib_sources,
                    self.calib_tokens or kvt.CALIBRATION_TOKENS)
            self._calibration = kvt.calibrate(self.spec, self.weights, ws,
                                              dict(meta, whiten_shrink=self.shrink))
        return self._calibration

    def set_shrink(self, shrink: float) -> None:
        """Use another whitening shrinkage on the same calibration statistics."""
        import dataclasses
        self.shrink = shrink
        if self._calibration is not None:
            self._calibration = dataclasses.replace(
                self._calibration, meta=dict(self._calibration.meta, whiten_shrink=shrink))
        self._models = {}

    def model(self, policy: KVPolicy):
        from ..models.kv_transform import KVTransform
        from ..models.model import CausalLM
        key = str(policy)
        if key not in self._models:
            layout = PageLayout(policy, self.spec.head_dim, self.spec.num_kv_heads, self.page_size)
            kvt = KVTransform(policy, self.calibration(), self.spec.num_heads, self.dtype) \
                if policy.transforms_k else None
            self._models = {key: CausalLM(self.spec, layout, self.weights, dtype=self.dtype,
                                          max_positions=8192, kv_transform=kvt,
                                          prefill_kv=self.prefill_kv)}
        return self._models[key]

    def _pool(self, m, tokens: int):
        pages = -(-tokens // self.page_size)
        pool = kv_cache.new_pool(m.layout, self.spec.num_layers, pages)
        return pool, torch.arange(pages, dtype=torch.int32)

    def _meta(self, table, start: int, n: int, logits_rows):
        from ..models.model import AttentionMetadata
        pos = torch.arange(start, start + n)
        slots = table[pos // self.page_size].long() * self.page_size + pos % self.page_size
        return AttentionMetadata(pos, slots, table[None], torch.tensor([start + n], dtype=torch.int32),
                                 torch.tensor([n], dtype=torch.int32), logits_rows,
                                 is_decode=(n == 1))

    def window_nll(self, policy: KVPolicy, window: Window, chunk: int = 128):
        """(sum -log p, count) over the window: one prefill of BOS + W tokens."""
        m = self.model(policy)
        ids = torch.tensor(window.ids)
        pool, table = self._pool(m, len(ids))
        if self.prefill_kv == "cache":    # chunking changes nothing here: one prefill
            logits = m(ids, self._meta(table, 0, len(ids), torch.arange(len(ids) - 1)), pool)
        else:   # fresh K/V within a chunk, earlier chunks from the cache
            parts = []
            for s in range(0, len(ids) - 1, chunk):
                n = min(chunk, len(ids) - 1 - s)
                parts.append(m(ids[s:s + n], self._meta(table, s, n, torch.arange(n)), pool))
            logits = torch.cat(parts)
        target = ids[1:]
        lp = torch.log_softmax(logits, -1)
        return -float(lp.gather(-1, target[:, None]).sum()), int(target.numel())

    def greedy(self, policy: KVPolicy, prompt: list[int], steps: int) -> list[int]:
        """Prefill the prompt, then decode `steps` tokens one at a time (greedy)."""
        m = self.model(policy)
        pool, table = self._pool(m, len(prompt) + steps)
        ids = torch.tensor(prompt)
        logits = m(ids, self._meta(table, 0, len(ids), torch.tensor([len(ids) - 1])), pool)
        out = [int(logits[0].argmax())]
        for i in range(steps - 1):
            pos = len(prompt) + i
            logits = m(torch.tensor([out[-1]]), self._meta(table, pos, 1, torch.tensor([0])), pool)
            out.append(int(logits[0].argmax()))
        return out
