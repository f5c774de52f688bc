"""TensorRT network for Llama / Qwen3-style decoders whose attention is the SawAttention plugin.

The network computes exactly what `sawtrt.models.model.CausalLM.forward` computes for one
scheduler step (a flat batch of prefill chunks and decode tokens), with the same weights (HF
names), the same page pools and the same per-step metadata:

    inputs   input_ids [T] int32, positions [T] int32, block_tables [B, P] int32,
             seq_lens [B] int32, cu_q_lens [B+1] int32, logits_indices [S] int32,
             kv_pool_{i} [N, Hkv, head_block_bytes] uint8 for each layer i (the runtime's pools)
    output   logits [S, vocab] float32

T, B, P, S and N are dynamic (one optimization profile, `Limits`). The network is strongly
typed: activations and GEMM weights in the build dtype (bf16 or fp16), RMSNorm statistics in
fp32 as in the torch model. Per layer: RMSNorm -> fused QKV GEMM (+ bias) -> per-head q/k RMSNorm
(Qwen3) -> RoPE (rotate-half) on q and k -> SawAttention (writes K/V into kv_pool_i, attends) ->
o_proj + residual -> RMSNorm -> gate/up GEMMs, SiLU(gate) * up -> down + residual. Then the rows
in logits_indices -> final RMSNorm -> LM head -> fp32.

Column splits (q | k | v) and rotate-half are gathers with constant indices, which keep every
shape expression independent of the dynamic token count.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from ..models.specs import ModelSpec
from ..spec import PageLayout, PolicyError
from .params import AttentionParams

INPUT_NAMES = ("input_ids", "positions", "block_tables", "seq_lens", "cu_q_lens",
               "logits_indices")
OUTPUT_NAME = "logits"


def pool_name(i: int) -> str:
    return f"kv_pool_{i}"


class NetworkBuildError(ValueError):
    pass


@dataclass(frozen=True)
class Limits:
    """The optimization profile's maxima (minima are 1; opt is `opt_tokens` / max_batch)."""
    max_batch: int
    max_seq_len: int
    max_tokens: int          # tokens per step (decode tokens + prefill chunks)
    max_pool_pages: int      # pages in one layer's pool
    opt_tokens: int = 0      # 0: max_batch (decode-heavy steps)

    def __post_init__(self):
        for k, v in asdict(self).items():
            if k != "opt_tokens" and v < 1:
                raise NetworkBuildError(f"limit {k}={v} must be >= 1")
        if self.max_tokens < self.max_batch:
            raise NetworkBuildError(f"max_tokens={self.max_tokens} < max_batch="
                                    f"{self.max_batch}: a decode step needs one token per "
                                    "sequence")

    def max_pages_per_seq(self, page_size: int) -> int:
        return -(-self.max_seq_len // page_size)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def for_engine(cls, max_batch: int, max_seq_len: int, page_size: int,
                   max_tokens: int | None = None, max_pool_pages: int | None = None) -> "Limits":
        tokens = max_tokens or max(max_batch, min(max_seq_len, 8192))
        # every sequence at full length, plus the runtime's scratch page 0 (LLMEngine keeps it for
        # padded rows)
        pages = max_pool_pages or max_batch * -(-max_seq_len // page_size) + 1
        return cls(max_batch, max_seq_len, max(tokens, max_batch), pages)


def trt_dtype(trt, dtype: torch.dtype):
    try:
        return {torch.bfloat16: trt.DataType.BF16, torch.float16: trt.DataType.HALF,
                torch.float32: trt.DataType.FLOAT}[dtype]
    except KeyError:
        raise NetworkBuildError(f"unsupported build dtype {dtype}") from None


def plugin_dtype(dtype: torch.dtype) -> str:
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


class DecoderNetwork:
    """Fills an INetworkDefinition with the decoder. `attention(self, qkv, pool, layer)` makes
    the attention layer (default: the SawAttention plugin); tests that run on a TensorRT without
    plugin layers pass a stand-in to check the rest of the graph.

    Host weights are referenced, not copied, by the network's constants: keep this object alive
    until the engine is built."""

    def __init__(self, trt, network, spec: ModelSpec, layout: PageLayout,
                 weights: dict[str, torch.Tensor], dtype: torch.dtype, limits: Limits,
                 attention=None, kv_transform=None):
        if spec.arch not in ("llama", "qwen3"):
            raise NetworkBuildError(f"the TensorRT network supports llama and qwen3, not "
                                    f"{spec.arch!r}")
        if layout.head_dim != spec.head_dim or layout.num_kv_heads != spec.num_kv_heads:
            raise NetworkBuildError("page layout does not match the model's KV heads / head_dim")
        if dtype not in (torch.bfloat16, torch.float16):
            raise NetworkBuildError(f"build dtype must be bf16 or fp16, not {dtype}")
        self.trt, self.net, self.spec, self.layout = trt, network, spec, layout
        try:    # one uniform layout per layer (per-layer page formats: KVPolicy.layer_pages)
            self.layer_layouts = layout.layers(spec.num_layers)
        except PolicyError as e:
            raise NetworkBuildError(str(e)) from None
        self.weights, self.dtype, self.limits = weights, dtype, limits
        self.tdt = trt_dtype(trt, dtype)
        self._keep: list = []          # host buffers behind the constants
        self._consts: dict = {}        # (weight name, shape, dtype) -> tensor: tied weights once
        self._names: dict = {}
        self.plugins: list = []        # plugin instances behind the plugin layers
        self._attention = attention or DecoderNetwork.plugin_attention
        if layout.policy.transforms_k and kv_transform is None:
            raise NetworkBuildError(f"KV policy {layout.policy} needs its K transform "
                                    "(sawtrt.models.kv_transform.KVTransform)")
        self.kv_transform = kv_transform

    # -- small layer helpers ------------------------------------------------------------------
    def _name(self, layer, name):
        n = self._names.get(name, 0)          # layer names must be unique in a network
        self._names[name] = n + 1
        layer.name = name if n == 0 else f"{name}#{n}"
        return layer.get_output(0)

    def const(self, t: torch.Tensor, shape=None, name: str = "const"):
        """A constant holding `t` (kept alive by this object) in its own dtype."""
        t = t.detach().to("cpu").contiguous()
        shape = tuple(t.shape) if shape is None else tuple(shape)
        if t.dtype == torch.bfloat16:
            w = self.trt.Weights(self.trt.DataType.BF16, t.data_ptr(), t.numel())
            self._keep.append(t)
        else:
            arr = t.numpy()
            self._keep.append(arr)
            w = self.trt.Weights(arr)
        return self._name(self.net.add_constant(shape, w), name)

    def w(self, name: str, shape=None, dtype=None):
        if name not in self.weights:
            raise NetworkBuildError(f"checkpoint lacks tensor {name!r}")
        key = (name, None if shape is None else tuple(shape), dtype or self.dtype)
        if key not in self._consts:
            self._consts[key] = self.const(self.weights[name].to(dtype or self.dtype), shape,
                                           name)
        return self._consts[key]

    def ew(self, a, b, op, name):
        return self._name(self.net.add_elementwise(a, b, op), name)

    def cast(self, x, dt, name):
        return self._name(self.net.add_cast(x, dt), name)

    def gather(self, x, indices, axis: int, name: str):
        idx = self.const(torch.tensor(indices, dtype=torch.int32), name=name + ".idx")
        return self._name(self.net.add_gather(x, idx, axis), name)

    def reshape(self, x, dims, name):
        layer = self.net.add_shuffle(x)
        layer.reshape_dims = tuple(dims)     # 0 copies the input's dimension (dynamic T)
        return self._name(layer, name)

    def linear(self, x, weight: str, bias: str | None = None, name: str = "linear"):
        """x [T, in] @ W[out, in]^T (+ b)."""
        W = self.w(weight)
        y = self._name(self.net.add_matrix_multiply(x, self.trt.MatrixOperation.NONE, W,
                                                    self.trt.MatrixOperation.TRANSPOSE), name)
        if bias is not None and bias in self.weights:
            b = self.w(bias, (1, self.weights[bias].shape[0]))
            y = self.ew(y, b, self.trt.ElementWiseOperation.SUM, name + ".bias")
        return y

    def rms_norm(self, x, weight: str, rank: int, name: str):
        """weight * (x / sqrt(mean(x^2, -1) + eps)) with the statistics in fp32, as CausalLM."""
        trt, E = self.trt, self.trt.ElementWiseOperation
        xf = self.cast(x, trt.DataType.FLOAT, name + ".f32")
        sq = self.ew(xf, xf, E.PROD, name + ".sq")
        ms = self._name(self.net.add_reduce(sq, trt.ReduceOperation.AVG, 1 << (rank - 1), True),
                        name + ".mean")
        eps = self.const(torch.full((1,) * rank, self.spec.rms_norm_eps, dtype=torch.float32),
                         name=name + ".eps")
        rms = self._name(self.net.add_unary(self.ew(ms, eps, E.SUM, name + ".add_eps"),
                                            trt.UnaryOperation.SQRT), name + ".rms")
        y = self.cast(self.ew(xf, rms, E.DIV, name + ".div"), self.tdt, name + ".cast")
        n = self.weights[weight].shape[0]
        return self.ew(y, self.w(weight, (1,) * (rank - 1) + (n,)), E.PROD, name)

    def rope(self, x, cos, sin, name):
        """x [T, H, D] * cos + rotate_half(x) * sin; cos/sin [T, 1, D] in the build dtype."""
        E = self.trt.ElementWiseOperation
        d = self.spec.head_dim
        half = d // 2
        rot = self.gather(x, list(range(half, d)) + list(range(half)), 2, name + ".swap")
        sign = torch.cat([-torch.ones(half), torch.ones(half)]).to(self.dtype).reshape(1, 1, d)
        rot = self.ew(rot, self.const(sign, name=name + ".sign"), E.PROD, name + ".rot")
        return self.ew(self.ew(x, cos, E.PROD, name + ".cos"),
                       self.ew(rot, sin, E.PROD, name + ".sin"), E.SUM, name)

    def transform_qk(self, q, k, layer: int):
        """The policy's center / balance / whiten, as CausalLM applies it
        (sawtrt.models.kv_transform): k' = (k - mu) * (1 / s), q' = q * s with per-(head,
        channel) constants [1, H, D]; k' = A k, q' = A^-T q with [H, D, D] matrices."""
        E, t = self.trt.ElementWiseOperation, self.kv_transform
        name = f"layers.{layer}"
        if t.k_mean is not None:
            k = self.ew(k, self.const(t.k_mean[layer].to(self.dtype)[None],
                                      name=name + ".k_mean"), E.SUB, name + ".k_center")
        if t.k_scale is not None:
            k = self.ew(k, self.const(t.k_scale[layer].to(self.dtype)[None],
                                      name=name + ".k_scale"), E.PROD, name + ".k_balance")
            q = self.ew(q, self.const(t.q_scale[layer].to(self.dtype)[None],
                                      name=name + ".q_scale"), E.PROD, name + ".q_balance")
        if t.k_mat is not None:
            group = self.spec.num_heads // self.spec.num_kv_heads
            k = self.per_head_matmul(k, t.k_mat[layer], name + ".k_whiten")
            q = self.per_head_matmul(q, t.q_mat[layer].repeat_interleave(group, 0),
                                     name + ".q_whiten")
        return q, k

    def per_head_matmul(self, x, m: torch.Tensor, name: str):
        """y[t, h] = m[h] @ x[t, h] for x [T, H, D], m [H, D, D]: a batched GEMM over heads."""
        mm = self.trt.MatrixOperation
        first = self.net.add_shuffle(x)
        first.first_transpose = (1, 0, 2)                                      # [H, T, D]
        xt = self._name(first, name + ".to_heads")
        y = self._name(self.net.add_matrix_multiply(
            xt, mm.NONE, self.const(m.to(self.dtype), name=name + ".matrix"), mm.TRANSPOSE), name)
        back = self.net.add_shuffle(y)
        back.first_transpose = (1, 0, 2)
        return self._name(back, name + ".to_tokens")

    # -- attention ----------------------------------------------------------------------------
    def attention_params(self, layer: int) -> AttentionParams:
        return AttentionParams.from_layout(
            self.spec.num_heads, self.layer_layouts[layer], layer_index=layer,
            max_seq_len=self.limits.max_seq_len, max_batch=self.limits.max_batch,
            dtype=plugin_dtype(self.dtype), sm_scale=self.spec.head_dim ** -0.5)

    @staticmethod
    def plugin_attention(self, qkv, pool, layer: int):
        from . import plugin_library
        if not hasattr(self.net, "add_plugin_v3"):
            raise NetworkBuildError(f"{self.trt.__name__} networks accept no plugin layers")
        # the compiled plugin when registered (build_serialized decides), else the Python one
        p = plugin_library.create(self.trt, self.attention_params(layer),
                                  self.trt.TensorRTPhase.BUILD)
        self.plugins.append(p)
        inputs = [qkv, pool, self.inputs["block_tables"], self.inputs["seq_lens"],
                  self.inputs["cu_q_lens"]]
        return self._name(self.net.add_plugin_v3(inputs, [], p), f"layers.{layer}.attn")

    # -- the network --------------------------------------------------------------------------
    def add_inputs(self):
        trt = self.trt
        i32 = trt.DataType.INT32
        self.inputs = {
            "input_ids": self.net.add_input("input_ids", i32, (-1,)),
            "positions": self.net.add_input("positions", i32, (-1,)),
            "block_tables": self.net.add_input("block_tables", i32, (-1, -1)),
            "seq_lens": self.net.add_input("seq_lens", i32, (-1,)),
            "cu_q_lens": self.net.add_input("cu_q_lens", i32, (-1,)),
            "logits_indices": self.net.add_input("logits_indices", i32, (-1,)),
        }
        self.pools = [self.net.add_input(pool_name(i), trt.DataType.UINT8,
                                         (-1, lay.num_kv_heads, lay.head_block_bytes))
                      for i, lay in enumerate(self.layer_layouts)]

    def profile_shapes(self) -> dict[str, tuple[tuple, tuple, tuple]]:
        """name -> (min, opt, max) for the one optimization profile."""
        lim, lay = self.limits, self.layout
        B, T, P = lim.max_batch, lim.max_tokens, lim.max_pages_per_seq(lay.page_size)
        opt_t = min(T, lim.opt_tokens or B)
        shapes = {
            "input_ids": ((1,), (opt_t,), (T,)),
            "positions": ((1,), (opt_t,), (T,)),
            "block_tables": ((1, 1), (B, P), (B, P)),
            "seq_lens": ((1,), (B,), (B,)),
            "cu_q_lens": ((2,), (B + 1,), (B + 1,)),
            "logits_indices": ((1,), (B,), (B,)),
        }
        for i, ll in enumerate(self.layer_layouts):
            row = (ll.num_kv_heads, ll.head_block_bytes)
            shapes[pool_name(i)] = ((1, *row), (lim.max_pool_pages, *row),
                                    (lim.max_pool_pages, *row))
        return shapes

    def build(self):
        """Add every layer; returns the logits tensor (marked as the network output)."""
        trt, s = self.trt, self.spec
        E = trt.ElementWiseOperation
        d, hq, hkv = s.head_dim, s.num_heads, s.num_kv_heads
        self.add_inputs()
        x = self._name(self.net.add_gather(self.w("model.embed_tokens.weight"),
                                           self.inputs["input_ids"], 0), "embed")
        # RoPE tables in fp32 like the torch model, gathered per token, cast to the build dtype
        inv = 1.0 / (s.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
        freqs = torch.arange(self.limits.max_seq_len).float()[:, None] * inv[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        tabs = []
        for nm, tab in (("cos", emb.cos()), ("sin", emb.sin())):
            g = self._name(self.net.add_gather(self.const(tab, name=f"rope.{nm}_table"),
                                               self.inputs["positions"], 0), f"rope.{nm}")
            tabs.append(self.reshape(self.cast(g, self.tdt, f"rope.{nm}.cast"), (0, 1, d),
                                     f"rope.{nm}.3d"))
        cos, sin = tabs
        for i in range(s.num_layers):
            p, a = f"model.layers.{i}.", f"model.layers.{i}.self_attn."
            h = self.rms_norm(x, p + "input_layernorm.weight", 2, f"layers.{i}.in_norm")
            qkv = self._qkv_linear(h, a, f"layers.{i}.qkv")
            heads = self.reshape(qkv, (0, hq + 2 * hkv, d), f"layers.{i}.qkv.3d")
            q = self.gather(heads, list(range(hq)), 1, f"layers.{i}.q")
            k = self.gather(heads, list(range(hq, hq + hkv)), 1, f"layers.{i}.k")
            v = self.gather(heads, list(range(hq + hkv, hq + 2 * hkv)), 1, f"layers.{i}.v")
            if s.qk_norm:
                q = self.rms_norm(q, a + "q_norm.weight", 3, f"layers.{i}.q_norm")
                k = self.rms_norm(k, a + "k_norm.weight", 3, f"layers.{i}.k_norm")
            q = self.rope(q, cos, sin, f"layers.{i}.q_rope")
            k = self.rope(k, cos, sin, f"layers.{i}.k_rope")
            if self.kv_transform is not None and i not in self.layout.policy.wide_layers:
                q, k = self.transform_qk(q, k, i)
            cat = self.net.add_concatenation([q, k, v])
            cat.axis = 1
            qkv = self.reshape(self._name(cat, f"layers.{i}.qkv_rope"),
                               (0, (hq + 2 * hkv) * d), f"layers.{i}.qkv_rope.2d")
            o = self._attention(self, qkv, self.pools[i], i)
            x = self.ew(x, self.linear(o, a + "o_proj.weight", name=f"layers.{i}.o_proj"),
                        E.SUM, f"layers.{i}.attn_residual")
            h = self.rms_norm(x, p + "post_attention_layernorm.weight", 2, f"layers.{i}.post_norm")
            gate = self.linear(h, p + "mlp.gate_proj.weight", name=f"layers.{i}.gate")
            up = self.linear(h, p + "mlp.up_proj.weight", name=f"layers.{i}.up")
            sig = self._name(self.net.add_activation(gate, trt.ActivationType.SIGMOID),
                             f"layers.{i}.sigmoid")
            act = self.ew(self.ew(gate, sig, E.PROD, f"layers.{i}.silu"), up, E.PROD,
                          f"layers.{i}.swiglu")
            x = self.ew(x, self.linear(act, p + "mlp.down_proj.weight", name=f"layers.{i}.down"),
                        E.SUM, f"layers.{i}.mlp_residual")
        last = self._name(self.net.add_gather(x, self.inputs["logits_indices"], 0), "last_rows")
        h = self.rms_norm(last, "model.norm.weight", 2, "final_norm")
        head = "model.embed_tokens.weight" if s.tie_embeddings or "lm_head.weight" not in \
            self.weights else "lm_head.weight"
        if not s.tie_embeddings and head != "lm_head.weight":
            raise NetworkBuildError("checkpoint lacks lm_head.weight and the model does not tie "
                                    "embeddings")
        logits = self.cast(self.linear(h, head, name="lm_head"), trt.DataType.FLOAT, "logits.f32")
        logits.name = OUTPUT_NAME
        self.net.mark_output(logits)
        return logits

    def _qkv_linear(self, h, a, name):
        """The fused q|k|v projection: one GEMM over the concatenated weights (and biases)."""
        ws = [self.weights.get(a + f"{n}_proj.weight") for n in "qkv"]
        if any(w is None for w in ws):
            missing = [a + f"{n}_proj.weight" for n, w in zip("qkv", ws) if w is None]
            raise NetworkBuildError(f"checkpoint lacks tensor(s) {missing}")
        fused = torch.cat([w.to(self.dtype) for w in ws], 0)
        W = self.const(fused, name=name + ".weight")
        y = self._name(self.net.add_matrix_multiply(h, self.trt.MatrixOperation.NONE, W,
                                                    self.trt.MatrixOperation.TRANSPOSE), name)
        bs = [self.weights.get(a + f"{n}_proj.bias") for n in "qkv"]
        if all(b is not None for b in bs):
            b = torch.cat([b.to(self.dtype) for b in bs], 0)
            y = self.ew(y, self.const(b, (1, b.shape[0]), name + ".bias_c"),
                        self.trt.ElementWiseOperation.SUM, name + ".bias")
        return y


def create_network(trt, builder):
    """A strongly typed network (types follow the constants and casts above)."""
    flag = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    return builder.create_network(flag)


def build_serialized(trt, spec: ModelSpec, layout: PageLayout, weights: dict[str, torch.Tensor],
                     dtype: torch.dtype, limits: Limits, logger=None,
                     workspace_limit: int | None = None, kv_transform=None,
                     engine_dir=None) -> bytes:
    """Build the engine and return the serialized plan (needs full TensorRT, a GPU and the
    compiled kernel library: get_workspace_size asks the C ABI). The attention layers use the
    compiled plugin library when one is found (plugin_library.find(engine_dir)), else the
    Python plugin."""
    from . import plugin_library
    plugin_library.register(trt, engine_dir)
    logger = logger or trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    net = create_network(trt, builder)
    dn = DecoderNetwork(trt, net, spec, layout, weights, dtype, limits,
                        kv_transform=kv_transform)
    dn.build()
    config = builder.create_builder_config()
    if workspace_limit:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_limit)
    profile = builder.create_optimization_profile()
    for name, (mn, opt, mx) in dn.profile_shapes().items():
        profile.set_shape(name, mn, opt, mx)
    config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(net, config)
    if plan is None:
        raise RuntimeError("TensorRT failed to build the engine (see the log above)")
    return bytes(memoryview(plan))

