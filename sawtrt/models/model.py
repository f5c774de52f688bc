"""The torch model (Llama / Qwen3 family) whose attention runs over the paged SAW-INT4 cache.

One forward call serves one scheduler step: a flat batch of tokens from several sequences —
prefill chunks and decode tokens mixed — described by one `AttentionMetadata` built once per
step. Every layer writes the step's K/V into its pool (`ops.write_kv`) and then attends over the
cache only (`ops.paged_attention`): write-then-attend, as in sawtrt.reference.

Weights use Hugging Face names (see `sawtrt.models.weights`); q/k/v and gate/up are fused into
one matmul each at load time.

Shapes: T = tokens in the step, B = sequences, Hq/Hkv query/KV heads, D = head_dim.
"""
from __future__ import annotations

import dataclasses
import os
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..kernels import dense_prefill, ops
from ..kernels.linear import linear, linear_glu, rms_norm
from ..spec import PageLayout
from . import kv_transform
from .specs import ModelSpec


@dataclass
class AttentionMetadata:
    """Everything attention needs for one step; built once per step, read by every layer.

    positions      [T] int64   position of each token in its sequence
    slot_mapping   [T] int64   cache slot (page * page_size + offset) per token; -1 = padding
    block_tables   [B, P] int32 page ids per sequence (padded with 0)
    seq_lens       [B] int32   tokens in the cache after this step's writes
    q_lens         [B] int32   new tokens per sequence this step (1 for decode)
    logits_indices [S] int64   rows of the flat batch whose next-token logits are wanted
    cu_q_lens      [B+1] int32 prefix sums of q_lens (the fused kernel's form)
    is_decode      all q_lens are 1 (the CUDA-graph path)
    max_q_len      host-side max of q_lens; max_seq_len host-side bound of seq_lens (the GPU
                   path must not read device data to size its launch)
    prefill        kernels.dense_prefill.PrefillPlan of a step with prompt tokens (built from
                   the host tensors by `to`), None for decode steps
    """

    positions: torch.Tensor
    slot_mapping: torch.Tensor
    block_tables: torch.Tensor
    seq_lens: torch.Tensor
    q_lens: torch.Tensor
    logits_indices: torch.Tensor
    cu_q_lens: torch.Tensor | None = None
    is_decode: bool = False
    max_q_len: int = 0
    max_seq_len: int = 0
    prefill: dense_prefill.PrefillPlan | None = None   # the fresh-K/V step plan

    def to(self, device) -> "AttentionMetadata":
        moved = {f: getattr(self, f).to(device, non_blocking=True) for f in self._TENSORS
                 if getattr(self, f) is not None}
        if self.prefill is None and not self.is_decode and self.q_lens.device.type == "cpu":
            moved["prefill"] = dense_prefill.PrefillPlan.build(
                self.q_lens.tolist(), self.seq_lens.tolist(), self.slot_mapping, device)
        elif self.prefill is not None:
            moved["prefill"] = self.prefill.to(device)
        return dataclasses.replace(self, **moved)

    _TENSORS = ("positions", "slot_mapping", "block_tables", "seq_lens", "q_lens",
                "logits_indices", "cu_q_lens")


class Rope:
    """Rotary embedding, "rotate half" (NeoX) convention; cos/sin tables in fp32."""

    def __init__(self, head_dim: int, theta: float, max_positions: int, device=None):
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=device)
                                    .float() / head_dim))
        pos = torch.arange(max_positions, device=device).float()
        freqs = pos[:, None] * inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        self.cos, self.sin = emb.cos(), emb.sin()            # [max_positions, D]

    def tables(self, positions: torch.Tensor, dtype: torch.dtype):
        """(cos, sin) [T, D] of the step's positions in dtype: looked up once per step, read by
        every layer."""
        return self.cos[positions].to(dtype), self.sin[positions].to(dtype)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, H, D] rotated by cos, sin [T, D] ("rotate half")."""
    half = x.shape[-1] // 2
    rot = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None, :] + rot * sin[:, None, :]


def attn_in(x, in_norm, qkv_w, qkv_b, q_norm, k_norm, cos, sin, transform, eps: float,
            hq: int, hkv: int, d: int, projection_only: bool = False) -> torch.Tensor:
    """A layer's prologue: RMSNorm and the fused q/k/v projection (one kernel at one row:
    kernels.linear), q/k-norm, RoPE, the K transform (kv_transform.apply's constants, or None),
    packed as the fused kernel reads it: [T, (Hq + 2 Hkv) D]. projection_only: stop after the projection (the attention step's write
    kernel runs q/k-norm and RoPE: ops.QKPrologue). Module-level and free of layer indices, so
    one compiled graph serves every layer."""
    qkv = linear(x, qkv_w, qkv_b, norm_weight=in_norm, eps=eps)
    if projection_only:
        return qkv
    t = qkv.shape[0]
    q, k, v = qkv.split((hq * d, hkv * d, hkv * d), dim=-1)
    q = q.reshape(t, hq, d)
    k = k.reshape(t, hkv, d)
    if q_norm is not None:
        q = rms_norm(q, q_norm, eps)
        k = rms_norm(k, k_norm, eps)
    q = rope(q, cos, sin)
    k = rope(k, cos, sin)
    if transform is not None:
        q, k = kv_transform.apply(q, k, *transform)
    return torch.cat((q.reshape(t, -1), k.reshape(t, -1), v), -1)


def attn_out_mlp(x, o, o_w, post_norm, gate_up_w, down_w, eps: float) -> torch.Tensor:
    """A layer's epilogue: o-projection and residual, RMSNorm, SiLU-gated MLP and residual."""
    x = linear(o.reshape(x.shape[0], -1).to(x.dtype), o_w, residual=x)
    gu = linear(x, gate_up_w, norm_weight=post_norm, eps=eps)
    return linear_glu(gu, down_w, residual=x)


def final_logits(x, rows, norm_w, head_w, eps: float) -> torch.Tensor:
    """fp32 logits of the hidden states x[rows]: final RMSNorm and LM head."""
    return linear(x[rows], head_w, norm_weight=norm_w, eps=eps).float()


def compile_mode(device: torch.device) -> bool:
    """Whether CausalLM compiles its layer prologue / epilogue / head with torch.compile
    (inductor fuses the norms, RoPE, residuals, SiLU and the q/k/v packing around the GEMMs;
    on CUDA only: the CPU gains nothing worth the compile time). SAWTRT_COMPILE=0 turns it
    off, =1 forces it on."""
    env = os.environ.get("SAWTRT_COMPILE", "").strip().lower()
    if env in ("0", "false", "no", "off"):
        return False
    if env in ("1", "true", "yes", "on"):
        return True
    return torch.device(device).type == "cuda"


class _MaybeCompiled:
    """fn under torch.compile, falling back to fn itself (with a warning) when compilation
    fails: a model that cannot compile still serves, only slower."""

    def __init__(self, fn, enabled: bool):
        self.fn = fn
        self.compiled = torch.compile(fn, dynamic=None) if enabled else None
        self.note = "torch.compile (inductor)" if enabled else "eager"

    def __call__(self, *args):
        if self.compiled is None:
            return self.fn(*args)
        try:
            return self.compiled(*args)
        except Exception as e:                                   # noqa: BLE001
            if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
                raise
            self.compiled = None
            self.note = f"eager: torch.compile failed ({type(e).__name__}: {e})"[:300]
            print(f"sawtrt: warning: {self.fn.__name__}: {self.note}", file=sys.stderr)
            return self.fn(*args)


class CausalLM(torch.nn.Module):
    """Llama / Qwen3 decoder over a paged KV cache.

    `forward(input_ids [T], meta, kv_pool [L, pages, Hkv, bytes]) -> logits [S, vocab]` (fp32),
    S = len(meta.logits_indices). kv_pool is what `kv_cache.new_pool` makes for the layout: one
    tensor, or a list of per-layer tensors for a policy with per-layer page formats.
    compile: torch.compile the work around the GEMMs and attention (default: compile_mode).
    """

    def __init__(self, spec: ModelSpec, layout: PageLayout, weights: dict[str, torch.Tensor],
                 dtype: torch.dtype = torch.bfloat16, device=None, max_positions: int | None = None,
                 kv_transform=None, compile: bool | None = None, prefill_kv: str = "cache"):
        super().__init__()
        if spec.arch not in ("llama", "qwen3"):
            raise ValueError(f"the torch model supports llama and qwen3, not {spec.arch!r}")
        if layout.head_dim != spec.head_dim or layout.num_kv_heads != spec.num_kv_heads:
            raise ValueError("page layout does not match the model's KV heads / head_dim")
        self.spec, self.layout, self.dtype = spec, layout, dtype
        d = spec.head_dim
        self.q_size, self.kv_size = spec.num_heads * d, spec.num_kv_heads * d
        self.sm_scale = d ** -0.5

        def w(name):
            if name not in weights:
                raise KeyError(f"checkpoint lacks tensor {name!r}")
            return weights[name].to(device=device, dtype=dtype)

        def opt(name):
            return w(name) if name in weights else None

        self.embed = w("model.embed_tokens.weight")
        self.final_norm = w("model.norm.weight")
        self.lm_head = self.embed if spec.tie_embeddings or "lm_head.weight" not in weights \
            else w("lm_head.weight")
        if not spec.tie_embeddings and "lm_head.weight" not in weights:
            raise KeyError("checkpoint lacks lm_head.weight and the model does not tie embeddings")
        self.layers = []
        for i in range(spec.num_layers):
            p = f"model.layers.{i}."
            a = p + "self_attn."
            bias = [opt(a + f"{n}_proj.bias") for n in "qkv"]
            layer = {
                "in_norm": w(p + "input_layernorm.weight"),
                "post_norm": w(p + "post_attention_layernorm.weight"),
                "qkv": torch.cat([w(a + f"{n}_proj.weight") for n in "qkv"], 0),
                "qkv_bias": torch.cat(bias, 0) if all(b is not None for b in bias) else None,
                "o": w(a + "o_proj.weight"),
                "gate_up": torch.cat([w(p + "mlp.gate_proj.weight"),
                                      w(p + "mlp.up_proj.weight")], 0),
                "down": w(p + "mlp.down_proj.weight"),
            }
            if spec.qk_norm:
                layer["q_norm"] = w(a + "q_norm.weight")
                layer["k_norm"] = w(a + "k_norm.weight")
            self.layers.append(layer)
        self.rope = Rope(d, spec.rope_theta, max_positions or spec.max_position, device)
        self.device = self.embed.device
        # one uniform layout per layer: a policy with per-layer page formats (int8=...) gives its
        # named layers plain int8/bf16 pages, no rotation and no K transform
        self.layer_layouts = layout.layers(spec.num_layers)
        # the fused write+attend kernel where the library serves the layer's device/dtype/layout
        # for prefill and decode (bf16, int8, int4 pages; int8 decode only in libraries with
        # saw_decode_supported); other layers: write_kv + paged_attention, which fall back
        self.layer_fused = [ops.fused_step_config(lay, spec.num_heads, dtype, self.device)
                            is not None for lay in self.layer_layouts]
        self.fused = all(self.layer_fused)
        # decode steps hand q/k-norm and RoPE to the write kernel (ops.QKPrologue) where the
        # library has it; SAWTRT_QK_PROLOGUE=0 keeps them in the compiled layer work (A/B runs)
        self.prologue_in_kernel = ops.prologue_supported(self.device) and \
            os.environ.get("SAWTRT_QK_PROLOGUE", "1") != "0"
        if layout.policy.transforms_k and kv_transform is None:
            raise ValueError(f"KV policy {layout.policy} needs its K transform (kv_transform.py)")
        self.kv_transform = kv_transform      # (layer, q, k) -> (q', k'), or None
        self.plain_layers = frozenset(layout.policy.wide_layers)   # no K transform there
        enabled = compile_mode(self.device) if compile is None else compile
        self._attn_in = _MaybeCompiled(attn_in, enabled)
        self._attn_out_mlp = _MaybeCompiled(attn_out_mlp, enabled)
        self._final_logits = _MaybeCompiled(final_logits, enabled)
        # "fresh": prompt tokens attend to their own unquantized K/V (dense speed); "cache":
        # every position is read from the quantized cache (what teacher-forced perplexity
        # measures; the default here and in `sawtrt eval`); "auto" (the engine's default):
        # fresh where every layer runs the compiled kernels, else cache
        if prefill_kv not in dense_prefill.SEMANTICS + ("auto",):
            raise ValueError(f"prefill_kv must be one of {dense_prefill.SEMANTICS + ('auto',)}, "
                             f"got {prefill_kv!r}")
        self.prefill_kv = prefill_kv if prefill_kv != "auto" else \
            "fresh" if self.fused else "cache"

    def warm_up_prefill(self, max_tokens: int) -> int:
        """Build the dense prefill's cuDNN plans, on the calling thread, for prompt runs of up
        to max_tokens (a step's token budget), so no step on that thread waits on one
        (dense_prefill.warm_up); the number of calls made: 0 on the CPU, with the "cache"
        semantics, a budget below CUDNN_MIN_FRESH or where cuDNN refuses the shape."""
        if self.prefill_kv != "fresh" or self.device.type != "cuda":
            return 0
        spec = self.spec
        return dense_prefill.warm_up(spec.num_heads, spec.num_kv_heads, spec.head_dim,
                                     self.dtype, self.device, max_tokens, self.sm_scale)

    @property
    def compile_note(self) -> str:
        return self._attn_in.note

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, meta: AttentionMetadata, kv_pool) -> torch.Tensor:
        x = F.embedding(input_ids, self.embed)
        rope_cs = self.rope.tables(meta.positions, self.dtype)
        if self.prefill_kv == "fresh" and meta.prefill is None and not meta.is_decode:
            meta = dataclasses.replace(meta, prefill=dense_prefill.PrefillPlan.from_meta(
                meta, self.device))
        for i in range(len(self.layers)):
            x = self.layer(i, x, meta, kv_pool[i], rope_cs)
        return self.logits(x, meta)

    def layer(self, i: int, x: torch.Tensor, meta: AttentionMetadata,
              pool: torch.Tensor, rope_cs=None) -> torch.Tensor:
        """Decoder layer i on the step's hidden states x [T, hidden]; writes the step's K/V into
        `pool` (this layer's [pages, Hkv, bytes]) and attends over it. rope_cs: the step's
        Rope.tables (looked up here when not given)."""
        spec, L, layout = self.spec, self.layers[i], self.layer_layouts[i]
        d, hq, hkv = spec.head_dim, spec.num_heads, spec.num_kv_heads
        eps = spec.rms_norm_eps
        cos, sin = rope_cs if rope_cs is not None else self.rope.tables(meta.positions, x.dtype)
        tr = self.kv_transform if i not in self.plain_layers else None
        # KVTransform's constants go into the compiled prologue; any other callable (the
        # calibration recorder, a subclass with its own __call__) runs after it, eagerly
        params = tr.params(i) if tr is not None and \
            type(tr).__call__ is kv_transform.KVTransform.__call__ else None
        plan = meta.prefill if self.prefill_kv == "fresh" else None
        # decode steps without a K transform: q/k-norm and RoPE run in the write kernel
        prologue = ops.QKPrologue(L.get("q_norm"), L.get("k_norm"), eps, cos, sin) \
            if meta.is_decode and tr is None and plan is None and self.layer_fused[i] \
            and self.prologue_in_kernel else None
        qkv_r = self._attn_in(x, L["in_norm"], L["qkv"], L["qkv_bias"], L.get("q_norm"),
                              L.get("k_norm"), cos, sin, params, eps, hq, hkv, d,
                              prologue is not None)
        t = qkv_r.shape[0]
        q, k, v = qkv_r.split((self.q_size, self.kv_size, self.kv_size), dim=-1)
        q = q.reshape(t, hq, d)
        k = k.reshape(t, hkv, d)
        v = v.reshape(t, hkv, d)
        if tr is not None and params is None:       # a stand-in (calibration's recorder)
            q, k = tr(i, q, k)
            qkv_r = torch.cat((q.reshape(t, -1), k.reshape(t, -1), v.reshape(t, -1)), -1)
        if self.layer_fused[i] or plan is not None:
            o = ops.attention_step(qkv_r, pool, layout, hq, meta.block_tables,
                                   meta.seq_lens, meta.cu_q_lens, meta.max_q_len,
                                   meta.max_seq_len or None, self.sm_scale, plan=plan,
                                   prologue=prologue)
        else:
            ops.write_kv(pool, layout, k, v, meta.slot_mapping)
            bounds = {"max_q_len": meta.max_q_len, "max_seq_len": meta.max_seq_len} \
                if meta.max_seq_len else {}     # host-side bounds: no device reads
            o = ops.paged_attention(q, pool, layout, meta.block_tables, meta.seq_lens,
                                    None if meta.is_decode else meta.q_lens, self.sm_scale,
                                    **bounds)
        return self._attn_out_mlp(x, o, L["o"], L["post_norm"], L["gate_up"], L["down"], eps)

    def logits(self, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """fp32 next-token logits of the rows meta.logits_indices of the last hidden states."""
        return self._final_logits(x, meta.logits_indices, self.final_norm, self.lm_head,
                                  self.spec.rms_norm_eps)
