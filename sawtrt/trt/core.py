"""The SawAttention plugin's shape checks, workspace sizing and enqueue as plain functions.

TensorRT calls the plugin's methods with tensor descriptions (objects with `.dims` and `.type`)
and raw device addresses; the functions here take exactly those arguments and need no TensorRT,
so the GPU test can drive the enqueue path with torch tensors' `data_ptr()` on a machine where
the TensorRT bindings are not installed. The plugin class in `plugin.py` is a thin shell over
them. The only thing enqueue launches is `sawtrt.kernels.capi.attention_step_ptr`, the same C ABI
the torch ops call.

Inputs (positions in `supports_format_combination`):
    0 qkv           [T, (Hq + 2 Hkv) D]  fp16 | bf16   fused projection output after RoPE
    1 pool          [P, Hkv, head_block_bytes] (or [P, page_bytes])  uint8 | int8
                    this layer's page pool; the runtime owns it and the plugin writes the
                    step's K/V into it
    2 block_tables  [B, max_pages]  int32
    3 seq_lens      [B]             int32   tokens in the cache after this step (new included)
    4 cu_q_lens     [B + 1]         int32   prefix sums of new tokens per sequence
Output:
    5 out           [T, Hq D]       same dtype as qkv
Contract on the values (not checkable on the host without a sync): cu_q_lens[0] = 0,
cu_q_lens[B] = T, every sequence has at least one new token (so max_q_len <= T - B + 1, which
is what picks the decode path when T == B), 1 <= seq_lens[b] <= min(max_seq_len,
max_pages * page_size).
"""
from __future__ import annotations

import enum
from dataclasses import dataclass

from .params import NUM_INPUTS, NUM_OUTPUTS, AttentionParams, PluginParamError

QKV, POOL, BLOCK_TABLES, SEQ_LENS, CU_Q_LENS, OUT = range(6)
INPUT_NAMES = ("qkv", "pool", "block_tables", "seq_lens", "cu_q_lens")


class DT(enum.Enum):
    """TensorRT DataType names this plugin cares about (trt.DataType members compare by name)."""
    FLOAT = "FLOAT"
    HALF = "HALF"
    BF16 = "BF16"
    INT8 = "INT8"
    UINT8 = "UINT8"
    INT32 = "INT32"
    INT64 = "INT64"


ACT_TYPES = {"HALF": "fp16", "BF16": "bf16"}
POOL_TYPES = ("UINT8", "INT8")


def type_name(t) -> str:
    """'HALF', 'BF16', ... for a trt.DataType, a DT member or a plain string."""
    return t if isinstance(t, str) else getattr(t, "name", str(t)).split(".")[-1]


def format_name(f) -> str:
    return f if isinstance(f, str) else getattr(f, "name", str(f)).split(".")[-1]


class ShapeError(ValueError):
    """Inputs whose shapes or types disagree with the plugin's fields."""


# -- format negotiation ----------------------------------------------------------------------------
def supports_format(params: AttentionParams, pos: int, types, formats, num_inputs: int) -> bool:
    """supports_format_combination over per-position type and format names (positions <= pos
    are decided; TensorRT asks one position at a time, left to right)."""
    if num_inputs != NUM_INPUTS or not 0 <= pos < NUM_INPUTS + NUM_OUTPUTS:
        return False
    if format_name(formats[pos]) != "LINEAR":
        return False
    t = type_name(types[pos])
    if pos == QKV:
        if params.dtype == "auto":
            return t in ACT_TYPES
        return ACT_TYPES.get(t) == params.dtype
    if pos == POOL:
        return t in POOL_TYPES
    if pos in (BLOCK_TABLES, SEQ_LENS, CU_Q_LENS):
        return t == "INT32"
    return t == type_name(types[QKV]) and t in ACT_TYPES       # OUT


# -- shapes ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StepShape:
    """What one call is about, from the input dims (-1 where still unknown at build time)."""
    num_tokens: int
    num_seqs: int
    max_pages: int
    num_pages: int

    def max_seq_len(self, params: AttentionParams) -> int:
        if self.max_pages < 0:
            return params.max_seq_len
        return max(1, min(params.max_seq_len, self.max_pages * params.page_size))

    def max_q_len(self, params: AttentionParams) -> int:
        """Upper bound of new tokens per sequence: T - B + 1 (each sequence has >= 1), and no
        more than max_seq_len (a sequence's new tokens are among its cached ones; the C ABI
        rejects a larger bound)."""
        return max(1, min(self.num_tokens - self.num_seqs + 1, self.max_seq_len(params)))


def _dims(d) -> tuple[int, ...]:
    return tuple(int(x) for x in d)


def check_shapes(params: AttentionParams, in_dims, out_dims=None) -> StepShape:
    """Validate input (and output) dims against the fields; -1 (dynamic) entries are skipped.
    Raises ShapeError naming the input and the expected shape."""
    if len(in_dims) != NUM_INPUTS:
        raise ShapeError(f"SawAttention takes {NUM_INPUTS} inputs ({', '.join(INPUT_NAMES)}), "
                         f"got {len(in_dims)}")
    qkv, pool, bt, sl, cu = (_dims(d) for d in in_dims)
    lay = params.layout

    def need(cond, what):
        if not cond:
            raise ShapeError(f"SawAttention layer {params.layer_index}: {what}")

    def eq(a, b):
        return a < 0 or b < 0 or a == b

    need(len(qkv) == 2 and eq(qkv[1], params.qkv_width),
         f"qkv must be [tokens, (Hq+2Hkv)*D = {params.qkv_width}], got {list(qkv)}")
    if len(pool) == 3:
        need(eq(pool[1], params.num_kv_heads) and eq(pool[2], lay.head_block_bytes),
             f"pool must be [pages, Hkv={params.num_kv_heads}, head_block_bytes="
             f"{lay.head_block_bytes}] for {lay.policy} page_size={params.page_size}, "
             f"got {list(pool)}")
    else:
        need(len(pool) == 2 and eq(pool[1], lay.page_bytes),
             f"pool must be [pages, Hkv, {lay.head_block_bytes}] or [pages, {lay.page_bytes}], "
             f"got {list(pool)}")
    need(len(bt) == 2, f"block_tables must be [batch, max_pages], got {list(bt)}")
    need(len(sl) == 1 and eq(sl[0], bt[0]),
         f"seq_lens must be [batch = {bt[0]}], got {list(sl)}")
    need(len(cu) == 1 and (bt[0] < 0 or eq(cu[0], bt[0] + 1)),
         f"cu_q_lens must be [batch + 1 = {bt[0] + 1 if bt[0] >= 0 else 'batch+1'}], "
         f"got {list(cu)}")
    batch = bt[0] if bt[0] >= 0 else (sl[0] if sl[0] >= 0 else (cu[0] - 1 if cu[0] > 0 else -1))
    need(batch < 0 or batch <= params.max_batch,
         f"batch {batch} > max_batch={params.max_batch}")
    if out_dims is not None:
        need(len(out_dims) == NUM_OUTPUTS, f"one output expected, got {len(out_dims)}")
        out = _dims(out_dims[0])
        need(len(out) == 2 and eq(out[0], qkv[0]) and eq(out[1], params.out_width),
             f"out must be [tokens = {qkv[0]}, Hq*D = {params.out_width}], got {list(out)}")
    return StepShape(num_tokens=qkv[0], num_seqs=batch, max_pages=bt[1], num_pages=pool[0])


def output_width(params: AttentionParams, qkv_width: int | None) -> int:
    """Output columns for get_output_shapes; checks a known qkv width."""
    if qkv_width is not None and qkv_width != params.qkv_width:
        raise ShapeError(f"SawAttention layer {params.layer_index}: qkv has {qkv_width} columns, "
                         f"the fields say (Hq+2Hkv)*D = {params.qkv_width}")
    return params.out_width


# -- the C ABI -----------------------------------------------------------------------------------------
def _capi():
    from ..kernels import capi      # imported late: the plugin's build-time methods need no library
    return capi


def make_config(params: AttentionParams, act_dtype: str, signs_ptr: int = 0):
    """SawConfig for these fields (act_dtype 'fp16' | 'bf16'; signs_ptr a device address, or 0
    when the policy has no signs)."""
    from ..kernels import library
    return library.make_config(params.layout, params.num_q_heads, act_dtype,
                               sm_scale=params.scale, signs_ptr=signs_ptr)


def workspace_size(params: AttentionParams, num_seqs: int, num_tokens: int, max_seq_len: int,
                   act_dtype: str = "fp16") -> int:
    """Bytes of split-KV workspace for a call of this size (the C ABI's saw_workspace_bytes).
    The signs change no size, so sizing needs no device buffer."""
    if num_seqs <= 0 or num_tokens <= 0:
        return 0
    cfg = make_config(params.replace(sign_seed=-1) if params.needs_signs else params, act_dtype)
    return int(_capi().workspace_bytes(cfg, num_seqs, num_tokens, max_seq_len))


def workspace_for_profile(params: AttentionParams, max_in_dims, act_dtype: str = "fp16") -> int:
    """get_workspace_size: the requirement at the profile's maxima (dims of DynamicPluginTensorDesc
    .max); the C ABI's requirement grows with every argument, so smaller calls fit."""
    tokens, batch = int(max_in_dims[QKV][0]), int(max_in_dims[SEQ_LENS][0])
    if tokens < 0 or batch < 0:
        raise ShapeError("SawAttention: workspace asked for without profile maxima "
                         f"(qkv max {list(max_in_dims[QKV])}, seq_lens max "
                         f"{list(max_in_dims[SEQ_LENS])})")
    shape = StepShape(tokens, min(batch, params.max_batch), int(max_in_dims[BLOCK_TABLES][1]), -1)
    return workspace_size(params, shape.num_seqs, tokens, shape.max_seq_len(params), act_dtype)


class SignsBuffer:
    """The fixed +-1 signs (float32 [D]) on the device, made once per plugin instance on first
    use from spec.KVPolicy.signs; ptr is 0 when the policy has no signs."""

    def __init__(self, params: AttentionParams):
        self._params = params
        self._tensor = None

    @property
    def ptr(self) -> int:
        if not self._params.needs_signs:
            return 0
        if self._tensor is None:
            import torch
            signs = self._params.policy.signs(self._params.head_dim)
            self._tensor = signs.to(device=torch.device("cuda", torch.cuda.current_device()))
        return int(self._tensor.data_ptr())

    @property
    def allocated(self) -> bool:
        return self._tensor is not None

    def release(self) -> None:
        self._tensor = None


def enqueue(params: AttentionParams, input_desc, output_desc, inputs, outputs, workspace: int,
            stream: int, signs_ptr: int = 0) -> None:
    """The plugin's enqueue: one attention layer for a mixed batch (writes the new tokens' K/V
    into the pool, then attends), launched on `stream` through the C ABI. Raises on error."""
    shape = check_shapes(params, [d.dims for d in input_desc], [d.dims for d in output_desc])
    types = [type_name(d.type) for d in input_desc] + [type_name(d.type) for d in output_desc]
    formats = ["LINEAR"] * len(types)
    for pos in range(len(types)):
        if not supports_format(params, pos, types, formats, len(input_desc)):
            raise ShapeError(f"SawAttention layer {params.layer_index}: unsupported type "
                             f"{types[pos]} at position {pos} "
                             f"({(INPUT_NAMES + ('out',))[pos]})")
    if shape.num_tokens == 0 or shape.num_seqs == 0:
        return
    if shape.num_tokens < shape.num_seqs:
        raise ShapeError(f"SawAttention layer {params.layer_index}: {shape.num_tokens} tokens "
                         f"for {shape.num_seqs} sequences (each sequence needs >= 1 new token)")
    if params.needs_signs and not signs_ptr:
        raise PluginParamError(f"SawAttention layer {params.layer_index}: sign_seed="
                               f"{params.sign_seed} needs the signs device buffer")
    act = ACT_TYPES[types[QKV]]
    max_seq_len = shape.max_seq_len(params)
    cfg = make_config(params, act, signs_ptr)
    capi = _capi()
    ws = int(capi.workspace_bytes(cfg, shape.num_seqs, shape.num_tokens, max_seq_len))
    capi.attention_step_ptr(
        cfg, int(inputs[QKV]), params.qkv_width, int(inputs[POOL]), int(inputs[BLOCK_TABLES]),
        shape.max_pages, int(inputs[SEQ_LENS]), int(inputs[CU_Q_LENS]), shape.num_seqs,
        shape.num_tokens, shape.max_q_len(params), max_seq_len, int(outputs[0]), int(workspace),
        ws,
        int(stream))
