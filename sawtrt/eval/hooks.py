"""Run a transformers model with its K/V stored the sawtrt way: a registered attention function.

Two paths, chosen per `KVHook`:

    "paged"   the runtime's attention path: every call writes the step's new K/V (after RoPE,
              after any QK-norm) into a `sawtrt.kv_cache.PagedKVCache` with
              `sawtrt.kernels.ops.write_kv` and attends with `sawtrt.kernels.ops.paged_attention`
              (write-then-attend: every query reads only the quantized cache, its own token
              included). Served policies only.
    "fake"    fake quantization: K/V are quantized and de-quantized in place by
              `sawtrt.eval.kvquant.fake_quant` (the same spec), then ordinary causal attention
              in fp32. The cross-check of the paged path, and the only path of the eval-only
              options (@konly, @vonly, @v8), which no served policy expresses.

Both work for teacher-forced windows (use_cache=False: the call sees the whole window) and for
incremental decoding with a transformers DynamicCache (the call sees all K/V so far; the last
q_len of them are new). Batch size 1, no padding; a model's sliding window must not be shorter
than the sequences run (Gemma 3's is 512).

Use:
    hook = KVHook(scheme, mode="paged")
    with hook.attach(model):
        model(input_ids)          # or a decode loop
    hook.reset()                  # before the next, independent sequence
"""
from __future__ import annotations

import contextlib
import contextvars
import math

import torch

from .. import kv_cache
from ..kernels import ops
from ..spec import PageLayout
from .kvquant import KVScheme, fake_quant

ATTN_NAME = "sawtrt_kv"
_ACTIVE: contextvars.ContextVar["KVHook | None"] = contextvars.ContextVar("sawtrt_kv_hook",
                                                                          default=None)
_registered = False


def _register() -> None:
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    AttentionInterface.register(ATTN_NAME, _attention)
    AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)
    _registered = True


def _attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    hook = _ACTIVE.get()
    if hook is None:
        raise RuntimeError("sawtrt_kv attention called outside KVHook.attach()")
    return hook(module, query, key, value, scaling, kwargs.get("sliding_window"))


class KVHook:
    def __init__(self, scheme: KVScheme | str, mode: str = "fake", page_size: int = 64,
                 max_tokens: int = 4096, record=None, kv_calibration=None):
        self.scheme = KVScheme.parse(scheme) if isinstance(scheme, str) else scheme
        if mode not in ("fake", "paged", "probe"):
            raise ValueError(f"mode must be fake, paged or probe, not {mode!r}")
        if mode == "paged" and not self.scheme.is_plain:
            raise ValueError(f"{self.scheme}: prototype variants run only in fake mode")
        self.mode = mode
        self.page_size = page_size
        self.max_tokens = max_tokens
        self.record = record              # callable(layer, key) for statistics, or None
        self.kv_calibration = kv_calibration  # KVCalibration: the policy's K transform
        self._served: dict[tuple, object] = {}  # (policy, Hq) -> KVTransform
        self._caches: dict[int, tuple] = {}
        self.errors: dict[int, list] = {}     # probe mode: layer -> [sum err^2, sum exact^2]

    def reset(self) -> None:
        """Forget all cached tokens (the next call starts a new sequence)."""
        self._caches.clear()

    @contextlib.contextmanager
    def attach(self, model):
        _register()
        prev_impl = model.config._attn_implementation
        model.set_attn_implementation(ATTN_NAME) if hasattr(model, "set_attn_implementation") \
            else setattr(model.config, "_attn_implementation", ATTN_NAME)
        token = _ACTIVE.set(self)
        try:
            yield self
        finally:
            _ACTIVE.reset(token)
            if hasattr(model, "set_attn_implementation"):
                model.set_attn_implementation(prev_impl)
            else:
                model.config._attn_implementation = prev_impl

    # -- one attention call: query [1, Hq, n, D], key/value [1, Hkv, L, D] -----------------
    def __call__(self, module, query, key, value, scaling, sliding_window):
        if query.shape[0] != 1:
            raise ValueError("KVHook runs batch size 1")
        n, length, d = query.shape[2], key.shape[2], query.shape[-1]
        if sliding_window is not None and length > sliding_window:
            raise ValueError(f"sequence of {length} > sliding window {sliding_window}")
        scaling = 1.0 / math.sqrt(d) if scaling is None else scaling
        layer = module.layer_idx
        if self.record is not None:
            self.record(layer, key[0, :, length - n:])
        if self.mode == "paged":
            out = self._paged(layer, query[0], key[0], value[0], scaling)
        elif self.mode == "probe":
            out = self._probe(layer, query[0], key[0], value[0], scaling)
        else:
            out = self._fake(layer, query[0], key[0], value[0], scaling)
        return out[None].to(query.dtype), None            # [1, n, Hq, D]

    def _paged(self, layer, q, k, v, scaling):
        hkv, length, d = k.shape
        n = q.shape[1]
        policy = self.scheme.policy_for_layer(layer)
        if policy.transforms_k:              # as CausalLM does: q', k' into the same kernels
            qt, knew = self._served_transform(policy, q.shape[0])(
                layer, q.transpose(0, 1).float(), k[:, length - n:].transpose(0, 1).float())
            q = qt.transpose(0, 1)
        else:
            knew = k[:, length - n:].transpose(0, 1)              # [n, Hkv, D]
        state = self._caches.get(layer)
        if state is None:
            layout = PageLayout(policy, d, hkv, self.page_size)
            pages = -(-self.max_tokens // self.page_size)
            cache = kv_cache.PagedKVCache(layout, 1, pages)
            table = torch.tensor(cache.allocator.allocate(pages), dtype=torch.int32)
            state = self._caches[layer] = (cache, table)
        cache, table = state
        if length > self.max_tokens:
            raise ValueError(f"{length} tokens > max_tokens {self.max_tokens}")
        pos = torch.arange(length - n, length)
        slots = table[pos // self.page_size].long() * self.page_size + pos % self.page_size
        vnew = v[:, length - n:].transpose(0, 1)
        ops.write_kv(cache.layer(0), cache.layout, knew, vnew, slots)
        out = ops.paged_attention(q.transpose(0, 1).float(), cache.layer(0), cache.layout,
                                  table[None], torch.tensor([length], dtype=torch.int32),
                                  torch.tensor([n], dtype=torch.int32), sm_scale=scaling)
        return out                                            # [n, Hq, D]

    def _probe(self, layer, q, k, v, scaling):
        """Attention output error of the scheme at this layer, from the exact inputs; returns
        the exact output so errors do not cascade (a smooth, low-noise screening metric)."""
        exact = self._attend(q, k.float(), v.float(), scaling)
        approx = self._fake(layer, q, k, v, scaling)
        acc = self.errors.setdefault(layer, [0.0, 0.0])
        acc[0] += float((approx - exact).pow(2).sum())
        acc[1] += float(exact.pow(2).sum())
        return exact

    def _served_transform(self, policy, num_heads):
        from ..models.kv_transform import KVTransform
        if self.kv_calibration is None:
            raise ValueError(f"{policy}: center / balance / whiten need KVHook(kv_calibration=...)")
        key = (str(policy), num_heads)
        if key not in self._served:
            self._served[key] = KVTransform(policy, self.kv_calibration, num_heads)
        return self._served[key]

    @staticmethod
    def _attend(q, kq, vq, scaling):
        hkv, length, _ = kq.shape
        n = q.shape[1]
        group = q.shape[0] // hkv
        kq = kq.repeat_interleave(group, 0)
        vq = vq.repeat_interleave(group, 0)
        scores = torch.einsum("hnd,hld->hnl", q.float(), kq) * scaling
        qpos = torch.arange(length - n, length)[:, None]
        scores = scores.masked_fill(torch.arange(length)[None, :] > qpos, float("-inf"))
        return torch.einsum("hnl,hld->hnd", torch.softmax(scores, -1), vq).transpose(0, 1)

    def _fake(self, layer, q, k, v, scaling):
        kpol, vpol = self.scheme.policy_for(layer, "k"), self.scheme.policy_for(layer, "v")
        mean = kmat = None
        if kpol.transforms_k:                # the served center / balance / whiten, in fake form
            t = self._served_transform(kpol, q.shape[0])
            mean = t.k_mean[layer][:, None] if t.k_mean is not None else None
            if t.k_scale is not None:
                kmat = (torch.diag_embed(t.k_scale[layer]), torch.diag_embed(1 / t.k_scale[layer]))
            if t.k_mat is not None:
                kmat = (t.k_mat[layer], t.q_mat[layer].transpose(-1, -2))    # A, A^-1
        kq = fake_quant(k, kpol, "k", mean=mean, kmat=kmat)
        vq = fake_quant(v, vpol, "v")
        return self._attend(q, kq, vq, scaling)               # [n, Hq, D]
