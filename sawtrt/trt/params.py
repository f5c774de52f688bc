"""SawAttention plugin parameters: the plugin's fields, their validation and their serialized
form, defined once and free of TensorRT (the plugin class in `plugin.py` only converts these to
and from `PluginFieldCollection`; the GPU test drives `core.enqueue` with them directly).

Every field is serialized into the engine. The table `FIELDS` is what trt_plugin/README.md
documents (type, name, version in which it appeared, meaning).
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass

from ..spec import PAGE_SIZES, KVPolicy, PageLayout, PolicyError

PLUGIN_NAME = "SawAttention"
PLUGIN_NAMESPACE = "sawtrt"
PLUGIN_VERSION = "1"

NUM_INPUTS = 5        # qkv, pool, block_tables, seq_lens, cu_q_lens
NUM_OUTPUTS = 1       # out
HEAD_DIMS = (64, 128, 256)          # instantiated by the kernels (c_api.h, SawConfig.head_dim)
MAX_GROUP = 16                      # Hq / Hkv the kernels serve from one K/V load
DTYPES = ("auto", "fp16", "bf16")   # "auto": format negotiation picks fp16 or bf16
INT32_MAX = 2**31 - 1


class PluginParamError(ValueError):
    """A SawAttention field value the plugin cannot honour (the message names the field)."""


@dataclass(frozen=True)
class Field:
    name: str
    kind: str         # "int32" | "float32" | "char"
    default: object   # None: required
    version: str
    meaning: str


FIELDS: tuple[Field, ...] = (
    Field("num_q_heads", "int32", None, "1", "Hq, query heads of the layer"),
    Field("num_kv_heads", "int32", None, "1", "Hkv, KV heads; Hq % Hkv == 0, Hq/Hkv <= 16"),
    Field("head_dim", "int32", None, "1", "D in {64, 128, 256}"),
    Field("page_size", "int32", 64, "1", "tokens per KV page, one of 16, 32, 64, 128"),
    Field("kv_kind", "char", "int4-bdr", "1",
          "cache format: bf16 | int8 | int4 | int4-bdr (spec.KVPolicy.kind)"),
    Field("rotation_block", "int32", 0, "1",
          "BDR block h (power of two, 16..256, h | D); 0 = min(128, D); int4-bdr only"),
    Field("rotate_v", "int32", 0, "1", "0: rotate K only; 1: rotate K and V (int4-bdr only)"),
    Field("sign_seed", "int32", -1, "1",
          "-1: plain Hadamard; >= 0: seed of the fixed +-1 signs (spec.KVPolicy.signs)"),
    Field("layer_index", "int32", 0, "1", "decoder layer this instance serves (names, logs)"),
    Field("max_seq_len", "int32", 4096, "1",
          "upper bound of seq_lens; sizes the split-KV workspace and the grid"),
    Field("max_batch", "int32", 256, "1", "upper bound of sequences per call"),
    Field("dtype", "char", "auto", "1",
          "activation dtype of qkv/out: auto (fp16 or bf16, negotiated) | fp16 | bf16"),
    Field("sm_scale", "float32", 0.0, "1", "softmax scale; 0 = 1/sqrt(D)"),
)
FIELD_NAMES = tuple(f.name for f in FIELDS)
_BY_NAME = {f.name: f for f in FIELDS}
_NP = {"int32": "int32", "float32": "float32", "char": "int8"}    # numpy dtypes of the data


@dataclass(frozen=True)
class AttentionParams:
    """The plugin's fields. Construction validates; `from_fields` parses serialized fields."""

    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    page_size: int = 64
    kv_kind: str = "int4-bdr"
    rotation_block: int = 0
    rotate_v: int = 0
    sign_seed: int = -1
    layer_index: int = 0
    max_seq_len: int = 4096
    max_batch: int = 256
    dtype: str = "auto"
    sm_scale: float = 0.0

    def __post_init__(self):
        for f in FIELDS:
            v = getattr(self, f.name)
            if f.kind == "int32":
                if isinstance(v, bool) or not isinstance(v, numbers.Integral):
                    raise PluginParamError(f"SawAttention field {f.name} must be an integer, "
                                           f"got {v!r}")
                object.__setattr__(self, f.name, int(v))
            elif f.kind == "float32":
                try:
                    object.__setattr__(self, f.name, float(v))
                except (TypeError, ValueError):
                    raise PluginParamError(f"SawAttention field {f.name} must be a number, "
                                           f"got {v!r}") from None
        hq, hkv, d = self.num_q_heads, self.num_kv_heads, self.head_dim
        if hq < 1 or hkv < 1:
            raise PluginParamError(f"SawAttention: num_q_heads={hq} and num_kv_heads={hkv} "
                                   "must be >= 1")
        if hq % hkv:
            raise PluginParamError(f"SawAttention: num_q_heads={hq} is not a multiple of "
                                   f"num_kv_heads={hkv}")
        if hq // hkv > MAX_GROUP:
            raise PluginParamError(f"SawAttention: GQA group {hq // hkv} > {MAX_GROUP} "
                                   "(num_q_heads / num_kv_heads) has no kernel instantiation")
        if d not in HEAD_DIMS:
            raise PluginParamError(f"SawAttention: head_dim={d} not in {HEAD_DIMS}")
        if self.page_size not in PAGE_SIZES:
            raise PluginParamError(f"SawAttention: page_size={self.page_size} not in "
                                   f"{PAGE_SIZES}")
        if self.rotate_v not in (0, 1):
            raise PluginParamError(f"SawAttention: rotate_v={self.rotate_v} must be 0 or 1")
        if not -1 <= self.sign_seed <= INT32_MAX:
            raise PluginParamError(f"SawAttention: sign_seed={self.sign_seed} must be -1 "
                                   f"(none) or in [0, {INT32_MAX}]")
        if self.rotation_block < 0:
            raise PluginParamError(f"SawAttention: rotation_block={self.rotation_block} < 0")
        for name in ("layer_index",):
            if getattr(self, name) < 0:
                raise PluginParamError(f"SawAttention: {name}={getattr(self, name)} < 0")
        for name in ("max_seq_len", "max_batch"):
            if getattr(self, name) < 1:
                raise PluginParamError(f"SawAttention: {name}={getattr(self, name)} must be "
                                       ">= 1")
        if self.dtype not in DTYPES:
            raise PluginParamError(f"SawAttention: dtype={self.dtype!r} not in {DTYPES}")
        if not (math.isfinite(self.sm_scale) and self.sm_scale >= 0):
            raise PluginParamError(f"SawAttention: sm_scale={self.sm_scale} must be finite "
                                   "and >= 0 (0 = 1/sqrt(D))")
        try:
            self.layout  # validates kind, rotation options and h | D through spec.py
        except PolicyError as e:
            raise PluginParamError(f"SawAttention: bad KV policy fields: {e}") from None

    # -- derived --------------------------------------------------------------------------------
    @property
    def policy(self) -> KVPolicy:
        return KVPolicy(kind=self.kv_kind, rotation_block=self.rotation_block or None,
                        rotate_v=bool(self.rotate_v),
                        sign_seed=None if self.sign_seed < 0 else self.sign_seed)

    @property
    def layout(self) -> PageLayout:
        return PageLayout(self.policy, self.head_dim, self.num_kv_heads, self.page_size)

    @property
    def qkv_width(self) -> int:
        """Columns of the fused QKV input: (Hq + 2 Hkv) * D."""
        return (self.num_q_heads + 2 * self.num_kv_heads) * self.head_dim

    @property
    def out_width(self) -> int:
        return self.num_q_heads * self.head_dim

    @property
    def scale(self) -> float:
        return self.sm_scale or 1.0 / math.sqrt(self.head_dim)

    @property
    def needs_signs(self) -> bool:
        return self.policy.rotated and self.sign_seed >= 0

    # -- construction helpers -------------------------------------------------------------------
    @classmethod
    def from_layout(cls, num_q_heads: int, layout: PageLayout, **kw) -> "AttentionParams":
        p = layout.policy
        return cls(num_q_heads=num_q_heads, num_kv_heads=layout.num_kv_heads,
                   head_dim=layout.head_dim, page_size=layout.page_size, kv_kind=p.kind,
                   rotation_block=p.rotation_block or 0, rotate_v=int(p.rotate_v),
                   sign_seed=-1 if p.sign_seed is None else p.sign_seed, **kw)

    def replace(self, **kw) -> "AttentionParams":
        return dataclasses.replace(self, **kw)

    # -- serialized form ------------------------------------------------------------------------
    def to_fields(self) -> list[tuple[str, np.ndarray, str]]:
        """[(name, data, kind)] for every field, in FIELDS order (data: numpy arrays)."""
        import numpy as np          # only serialization needs numpy (the GPU box may lack it)
        out = []
        for f in FIELDS:
            v = getattr(self, f.name)
            if f.kind == "char":
                data = np.frombuffer(v.encode("ascii"), dtype=np.int8).copy()
            else:
                data = np.array([v], dtype=_NP[f.kind])
            out.append((f.name, data, f.kind))
        return out

    @classmethod
    def from_fields(cls, fields) -> "AttentionParams":
        """Parse [(name, data)] pairs (data: array-like as TensorRT hands PluginField.data).

        Unknown names, wrong sizes and missing required fields raise PluginParamError."""
        kw = {}
        for name, data in fields:
            f = _BY_NAME.get(name)
            if f is None:
                raise PluginParamError(f"SawAttention: unknown field {name!r}; known fields: "
                                       f"{', '.join(FIELD_NAMES)}")
            if name in kw:
                raise PluginParamError(f"SawAttention: field {name!r} given twice")
            kw[name] = _parse(f, data)
        missing = [f.name for f in FIELDS if f.default is None and f.name not in kw]
        if missing:
            raise PluginParamError(f"SawAttention: missing required field(s) {missing}")
        return cls(**kw)

    def summary(self) -> str:
        return (f"SawAttention(layer={self.layer_index}, Hq={self.num_q_heads}, "
                f"Hkv={self.num_kv_heads}, D={self.head_dim}, page={self.page_size}, "
                f"kv={self.policy}, dtype={self.dtype})")


def _parse(f: Field, data):
    import numpy as np
    arr = np.asarray(data)
    if f.kind == "char":
        if arr.dtype.kind == "S":
            raw = arr.tobytes()
        elif arr.dtype.kind == "U":
            raw = str(arr.reshape(-1)[0] if arr.size else "").encode("ascii", "replace")
        else:
            raw = arr.astype(np.int8).tobytes()
        try:
            return raw.split(b"\0", 1)[0].decode("ascii").strip()
        except UnicodeDecodeError:
            raise PluginParamError(f"SawAttention: field {f.name} is not ASCII text") from None
    flat = arr.reshape(-1)
    if flat.size != 1:
        raise PluginParamError(f"SawAttention: field {f.name} needs exactly 1 value, got "
                               f"{flat.size}")
    v = flat[0]
    if f.kind == "int32":
        if not float(v).is_integer():
            raise PluginParamError(f"SawAttention: field {f.name}={v} is not an integer")
        return int(v)
    return float(v)
