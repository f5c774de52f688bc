"""The SAW-INT4 numeric contract and page layout, defined once.

Everything that reads or writes the KV cache (the PyTorch reference, the CUDA kernels in cpp/,
the TensorRT plugin, kv-plan) takes its numbers from here. cpp/include/saw/layout.cuh mirrors
`PageLayout` and the library exports `saw_page_layout` so tests can check the two agree.

Quantization (per token, per KV head, over the whole — rotated — head vector x in R^D):
    1. sanitize: NaN and +-Inf elements become 0; finite values are clamped to +-CLAMP.
       (A token with a bad element stays finite; its neighbours never see it.)
    2. m = fp16_round_down(min x)                     (stored offset, fp16)
       s = fp16_round_up((max x - m) / L)            (stored scale, fp16), L = 2^bits - 1
       Directed rounding keeps (x - m) / s inside [0, L], so |x - x_hat| <= s / 2.
    3. code = clamp(rint((x - m) * (1 / s)), 0, L)    in fp32, rint = round half to even;
       s == 0 (a constant vector whose value fp16 represents) gives code 0 everywhere; a
       constant fp16 cannot represent gets m just below it and s spanning the rounding gap.
    4. x_hat = code * s + m                           (fp32)

INT4 packing: byte j of a token's code row holds element 2j in its low nibble and element
2j + 1 in its high nibble. (A 32-bit word then holds elements 0..7 at bits 0,4,...,28, and the
mask 0x000F000F picks elements (0, 4): the kernels load the query in that order instead of
shuffling codes.)

Page layout: the cache of one layer is a pool of pages; a page holds page_size tokens for every
KV head; inside a page each KV head owns one contiguous *head block*:

    head block = [ K codes | K params | V codes | V params ]
      K codes   page_size * code_bytes          token-major, code_bytes = D/2 (int4), D (int8), 2D (bf16)
      K params  page_size * 4 bytes             (scale, offset) as two fp16 per token; absent for bf16
      V codes / V params  the same for V

so one page id addresses codes and scales together (the allocator stays uniform) and a kernel
streams one contiguous, 16-byte aligned region per (page, KV head). A pool tensor has shape
[num_layers, num_pages, num_kv_heads, head_block_bytes] (uint8). A slot is
page_id * page_size + offset_in_page; slot -1 means "skip this token" (padding).
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

import torch

from .hadamard import RotationError, check_block

CLAMP = 60000.0          # finite inputs are clamped here: keeps m and s inside fp16 range
KINDS = ("bf16", "int8", "int4", "int4-bdr")
PAGE_SIZES = (16, 32, 64, 128)
DEFAULT_PAGE_SIZE = 64
DEFAULT_BLOCK = 128      # h = min(128, D) unless asked otherwise
PARAM_BYTES = 4          # (scale, offset), fp16 each


class PolicyError(ValueError):
    """A KV policy string or config that cannot be honoured."""


@dataclass(frozen=True)
class KVPolicy:
    """How K and V are stored in the cache.

    kind:            "bf16" | "int8" | "int4" | "int4-bdr"
    rotation_block:  h for int4-bdr; None means min(DEFAULT_BLOCK, D), fixed by `resolve(D)`
    rotate_v:        False rotates K only (default); True rotates K and V
    sign_seed:       None for plain Hadamard, else seed of the fixed +-1 signs (see `signs`)
    k_center:        the model subtracts a calibrated per-layer, per-KV-head vector mu from K
                     (after RoPE) before the write, so the cache holds k - mu. Softmax is
                     invariant to it (q.(k - mu) = q.k - q.mu, one shift per query), so the read
                     side does not change; the per-token range of K shrinks.
    k_balance:       None, or alpha of the Q/K channel balance: the model replaces k by k / s and
                     q by q * s (s per layer, KV head and channel, calibrated; q.k unchanged).
    k_whiten:        the full-matrix form of balance=0.5: k -> A k, q -> A^-T q with one
                     calibrated D x D matrix A per layer and KV head (q.k unchanged).
    All three are applied model-side (sawtrt.models.kv_transform) to the K and q that the kernels
    receive; kernels, page layout and bytes per token are the same as without them. The
    constants live in the engine directory (kv_calibration.safetensors).
    """

    kind: str = "int4-bdr"
    rotation_block: int | None = None
    rotate_v: bool = False
    sign_seed: int | None = None
    k_center: bool = False
    k_balance: float | None = None
    k_whiten: bool = False

    def __post_init__(self):
        if self.kind not in KINDS:
            raise PolicyError(f"unknown KV policy {self.kind!r}; choose one of {', '.join(KINDS)}")
        if self.kind != "int4-bdr" and (self.rotation_block is not None or self.rotate_v
                                        or self.sign_seed is not None):
            raise PolicyError(f"policy {self.kind} takes no rotation options")
        if self.kind == "bf16" and self.transforms_k:
            raise PolicyError("center/balance/whiten change nothing a bf16 cache stores (K is "
                              "kept exactly): use them with int8, int4 or int4-bdr")
        if self.k_whiten and self.k_balance is not None:
            raise PolicyError("whiten is the full-matrix form of balance: give one of them")
        if self.k_balance is not None and not 0.0 < self.k_balance <= 1.0:
            raise PolicyError(f"balance={self.k_balance} must be in (0, 1]")
        if self.rotation_block is not None:
            b = self.rotation_block
            if b < 16 or b > 256 or b & (b - 1):
                raise PolicyError(f"rotation block h={b} must be a power of two in [16, 256]")

    # -- properties the kernels dispatch on -------------------------------------------------
    @property
    def bits(self) -> int:
        return {"bf16": 16, "int8": 8, "int4": 4, "int4-bdr": 4}[self.kind]

    @property
    def quantized(self) -> bool:
        return self.bits < 16

    @property
    def transforms_k(self) -> bool:
        """True when the model transforms q/K before the cache (needs the engine's calibration)."""
        return self.k_center or self.k_balance is not None or self.k_whiten

    @property
    def rotated(self) -> bool:
        return self.kind == "int4-bdr"

    def block_for(self, head_dim: int) -> int | None:
        """The rotation block for this head_dim (None when not rotated); validates h | D."""
        if not self.rotated:
            return None
        block = self.rotation_block or min(DEFAULT_BLOCK, head_dim)
        try:
            check_block(head_dim, block)
        except RotationError as e:
            raise PolicyError(str(e)) from None
        return block

    def resolve(self, head_dim: int) -> "KVPolicy":
        """The same policy with the default block made explicit for `head_dim`."""
        return dataclasses.replace(self, rotation_block=self.block_for(head_dim)) \
            if self.rotated else self

    def signs(self, head_dim: int) -> torch.Tensor | None:
        """Fixed +-1 signs (float32 [D]) or None. Deterministic across platforms: bit 0 of
        splitmix64(seed * 2^32 + i) picks the sign of channel i (no framework RNG involved)."""
        if self.sign_seed is None:
            return None
        return torch.tensor([-1.0 if _splitmix64((self.sign_seed << 32) + i) & 1 else 1.0
                             for i in range(head_dim)], dtype=torch.float32)

    # -- text and config forms --------------------------------------------------------------
    @classmethod
    def parse(cls, text: str) -> "KVPolicy":
        """Parse "bf16", "int8", "int4", "int4-bdr", "int4-bdr:h=64", "int4-bdr:h=32,kv,seed=3",
        "int4-bdr:h=64,center", "int4-bdr:h=64,center,balance=0.5", "int4:center"."""
        name, _, opts = text.strip().partition(":")
        kw: dict = {}
        for opt in filter(None, (o.strip() for o in opts.split(","))):
            key, eq, val = opt.partition("=")
            try:
                if key == "h":
                    kw["rotation_block"] = int(val)
                elif key == "seed":
                    kw["sign_seed"] = int(val)
                elif key in ("kv", "k") and not eq:
                    kw["rotate_v"] = key == "kv"
                elif key == "rotate" and val in ("k", "kv"):
                    kw["rotate_v"] = val == "kv"
                elif key == "center" and not eq:
                    kw["k_center"] = True
                elif key == "balance" and eq:
                    kw["k_balance"] = float(val)
                elif key == "whiten" and not eq:
                    kw["k_whiten"] = True
                else:
                    raise PolicyError(f"unknown option {opt!r}")
            except ValueError as e:
                raise PolicyError(f"bad KV policy {text!r}: {e}") from None
        return cls(kind=name.strip().lower(), **kw)

    def __str__(self) -> str:
        opts = []
        if self.rotation_block:
            opts.append(f"h={self.rotation_block}")
        if self.rotate_v:
            opts.append("kv")
        if self.sign_seed is not None:
            opts.append(f"seed={self.sign_seed}")
        if self.k_center:
            opts.append("center")
        if self.k_balance is not None:
            opts.append(f"balance={self.k_balance:g}")
        if self.k_whiten:
            opts.append("whiten")
        return self.kind + (":" + ",".join(opts) if opts else "")

    def to_dict(self) -> dict:
        """All fields, except the K-transform ones at their defaults (configs written before
        they existed stay byte-identical)."""
        omit = {"k_center": False, "k_balance": None, "k_whiten": False}
        return {k: v for k, v in dataclasses.asdict(self).items()
                if k not in omit or v != omit[k]}

    @classmethod
    def from_dict(cls, d: dict) -> "KVPolicy":
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise PolicyError(f"unknown KV policy fields {sorted(unknown)}")
        return cls(**d)


POLICY_OPTIONS = ("h", "seed", "kv", "k", "rotate", "center", "balance", "whiten")


def split_policy_list(text: str) -> list[str]:
    """"bf16,int4,int4-bdr:h=32,kv,seed=1" -> ["bf16", "int4", "int4-bdr:h=32,kv,seed=1"]: a comma
    (or ';') starts a new policy unless what follows is an option of the previous one (h=, seed=,
    rotate=, kv, k, center, balance=, whiten). Suffixes after '@' (eval's variants) stay with their item."""
    out: list[str] = []
    for part in (p.strip() for p in text.replace(";", ",").split(",")):
        if not part:
            continue
        key = part.split("@")[0].split("=")[0]
        if out and key in POLICY_OPTIONS:
            out[-1] += "," + part
        else:
            out.append(part)
    return out


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return x ^ (x >> 31)


@dataclass(frozen=True)
class PageLayout:
    """Byte layout of one page pool (see module docstring). All offsets are inside a head block."""

    policy: KVPolicy
    head_dim: int
    num_kv_heads: int
    page_size: int = DEFAULT_PAGE_SIZE

    def __post_init__(self):
        if self.head_dim % 16 or not 16 <= self.head_dim <= 512:
            raise PolicyError(f"head_dim D={self.head_dim} must be a multiple of 16 in [16, 512]")
        if self.page_size < 1 or self.page_size & (self.page_size - 1):
            raise PolicyError(f"page_size={self.page_size} must be a power of two")
        if self.num_kv_heads < 1:
            raise PolicyError("num_kv_heads must be >= 1")
        object.__setattr__(self, "policy", self.policy.resolve(self.head_dim))

    @property
    def code_bytes(self) -> int:
        """Bytes of K (or V) codes per token per KV head."""
        return self.head_dim * self.policy.bits // 8

    @property
    def param_bytes(self) -> int:
        return PARAM_BYTES if self.policy.quantized else 0

    @property
    def token_bytes(self) -> int:
        """Bytes per token per KV head, K and V together (136 for int4 at D = 128)."""
        return 2 * (self.code_bytes + self.param_bytes)

    @property
    def k_codes(self) -> int:
        return 0

    @property
    def k_params(self) -> int:
        return self.page_size * self.code_bytes

    @property
    def v_codes(self) -> int:
        return self.page_size * (self.code_bytes + self.param_bytes)

    @property
    def v_params(self) -> int:
        return self.v_codes + self.page_size * self.code_bytes

    @property
    def head_block_bytes(self) -> int:
        return self.page_size * self.token_bytes

    @property
    def page_bytes(self) -> int:
        return self.num_kv_heads * self.head_block_bytes

    def to_dict(self) -> dict:
        return {"policy": self.policy.to_dict(), "head_dim": self.head_dim,
                "num_kv_heads": self.num_kv_heads, "page_size": self.page_size,
                "head_block_bytes": self.head_block_bytes}

    @classmethod
    def from_dict(cls, d: dict) -> "PageLayout":
        layout = cls(KVPolicy.from_dict(d["policy"]), int(d["head_dim"]),
                     int(d["num_kv_heads"]), int(d["page_size"]))
        if "head_block_bytes" in d and d["head_block_bytes"] != layout.head_block_bytes:
            raise PolicyError("config's head_block_bytes disagrees with this sawtrt's layout")
        return layout

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)
