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

Per-layer page formats (`KVPolicy.layer_pages`, text "int4-bdr:h=64,int8=1+10+19"): a few named
layers keep plain int8 (or bf16) pages while every other layer uses the base policy. Pages are
per layer, so each layer's pool stays uniform and the page ids stay shared: the cache is then one
pool tensor per layer ([num_pages, num_kv_heads, head_block_bytes of that layer], a list), and
`PageLayout.for_layer(i)` is the layout every kernel call of layer i gets. The named layers take
no rotation and no K transform (their pages are wide enough not to need them).
"""
from __future__ import annotations

import dataclasses
import functools
import json
from dataclasses import dataclass

import torch

from .hadamard import RotationError, check_block

CLAMP = 60000.0          # finite inputs are clamped here: keeps m and s inside fp16 range
KINDS = ("bf16", "int8", "int4", "int4-bdr")
WIDE_KINDS = ("int8", "bf16")   # what `layer_pages` may give a layer instead of the base policy
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
    layer_pages:     per-layer exceptions, ((kind, (layer, ...)), ...) with kind in WIDE_KINDS:
                     those layers store plain `kind` pages (no rotation, no K transform), every
                     other layer this policy. Text form "int8=1+10+19" ('+' between layers, so a
                     policy list can still be split at commas). Normalised: kinds and layers sorted.
    """

    kind: str = "int4-bdr"
    rotation_block: int | None = None
    rotate_v: bool = False
    sign_seed: int | None = None
    k_center: bool = False
    k_balance: float | None = None
    k_whiten: bool = False
    layer_pages: tuple = ()

    def __post_init__(self):
        object.__setattr__(self, "layer_pages", _normalise_layer_pages(self.kind,
                                                                       self.layer_pages))
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
        if self.rotation_block is not None:     # h alone (its fit to D: block_for)
            try:
                check_block(self.rotation_block, self.rotation_block)
            except RotationError as e:
                raise PolicyError(str(e)) from None

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

    # -- per-layer page formats -------------------------------------------------------------
    @property
    def mixed(self) -> bool:
        """True when some layers store other pages than the base policy (`layer_pages`)."""
        return bool(self.layer_pages)

    @functools.cached_property
    def base(self) -> "KVPolicy":
        """This policy without its per-layer exceptions: what the unnamed layers store (one
        object per policy, so `for_layer(i) is policy.base` tells the unnamed layers apart)."""
        return dataclasses.replace(self, layer_pages=()) if self.layer_pages else self

    @property
    def wide_layers(self) -> tuple[int, ...]:
        return tuple(sorted(i for _, layers in self.layer_pages for i in layers))

    def for_layer(self, layer: int) -> "KVPolicy":
        """The (uniform) policy of one layer's pages."""
        for kind, layers in self.layer_pages:
            if layer in layers:
                return KVPolicy(kind)
        return self.base

    def check_layers(self, num_layers: int) -> None:
        """Raise PolicyError when `layer_pages` names a layer the model does not have."""
        bad = [i for i in self.wide_layers if i >= num_layers]
        if bad:
            raise PolicyError(f"KV policy {self} names layer(s) {bad}; the model has "
                              f"{num_layers} layers (0..{num_layers - 1})")

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
        """The same policy with the default block made explicit for `head_dim` (per-layer
        exceptions kept)."""
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
        "int4-bdr:h=64,center", "int4-bdr:h=64,center,balance=0.5", "int4:center",
        "int4-bdr:h=64,kv,center,whiten,int8=1+10+19"."""
        name, _, opts = text.strip().partition(":")
        kw: dict = {}
        wide: dict[str, tuple[int, ...]] = {}
        for opt in filter(None, (o.strip() for o in opts.split(","))):
            key, eq, val = opt.partition("=")
            try:
                if key in WIDE_KINDS and eq:
                    if key in wide:
                        raise PolicyError(f"{key}= given twice")
                    wide[key] = tuple(int(x) for x in val.split("+"))
                    continue
                if key in _FLAGS and not eq:
                    field, value = _FLAGS[key]
                elif key in _VALUED and eq:
                    field, convert = _VALUED[key]
                    value = convert(val)
                else:
                    raise PolicyError(f"unknown option {opt!r}")
            except ValueError as e:
                raise PolicyError(f"bad KV policy {text!r}: {e}") from None
            if field in kw:
                raise PolicyError(f"bad KV policy {text!r}: option {key!r} given twice (or "
                                  "contradicted)")
            kw[field] = value
        if wide:
            kw["layer_pages"] = tuple(wide.items())
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
        if self.k_balance is not None:     # shortest text that parses back to the same float
            short = f"{self.k_balance:g}"
            opts.append("balance=" + (short if float(short) == self.k_balance
                                      else repr(self.k_balance)))
        if self.k_whiten:
            opts.append("whiten")
        opts += [f"{kind}=" + "+".join(map(str, layers)) for kind, layers in self.layer_pages]
        return self.kind + (":" + ",".join(opts) if opts else "")

    def to_dict(self) -> dict:
        """The field form engine configs of format version 1 stored (from_dict reads it); the
        text form (str / parse) is the one written now. All fields, except the K-transform and
        per-layer ones at their defaults. layer_pages: {kind: [layers]}."""
        omit = {"k_center": False, "k_balance": None, "k_whiten": False, "layer_pages": ()}
        d = {k: v for k, v in dataclasses.asdict(self).items() if k not in omit or v != omit[k]}
        if self.layer_pages:
            d["layer_pages"] = {kind: list(layers) for kind, layers in self.layer_pages}
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "KVPolicy":
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise PolicyError(f"unknown KV policy fields {sorted(unknown)}")
        d = dict(d)
        if "layer_pages" in d:
            lp = d["layer_pages"]
            if not isinstance(lp, dict):
                raise PolicyError("layer_pages must be a mapping {kind: [layers]}")
            d["layer_pages"] = tuple(lp.items())        # validated by _normalise_layer_pages
        return cls(**d)


def _normalise_layer_pages(base_kind: str, layer_pages) -> tuple:
    """Validate `layer_pages` and give it one canonical form: ((kind, (sorted layers)), ...)
    sorted by kind, no empty entries, no layer twice."""
    if not layer_pages:
        return ()
    try:
        items = [(str(k), tuple(int(i) for i in v)) for k, v in layer_pages]
    except (TypeError, ValueError):
        raise PolicyError(f"layer_pages must be ((kind, (layers...)), ...), got "
                          f"{layer_pages!r}") from None
    seen: set[int] = set()
    out = []
    for kind, layers in sorted(items):
        if kind not in WIDE_KINDS:
            raise PolicyError(f"per-layer pages can be {' or '.join(WIDE_KINDS)}, not {kind!r}")
        if KVPolicy(kind).bits <= KVPolicy(base_kind).bits:
            raise PolicyError(f"{kind} pages for some layers of a {base_kind} cache store nothing "
                              "more precisely: name a wider kind")
        if not layers:
            raise PolicyError(f"{kind}= names no layer")
        if any(i < 0 for i in layers):
            raise PolicyError(f"{kind}=: layer indices must be >= 0, got {list(layers)}")
        dup = seen.intersection(layers) | {i for i in layers if layers.count(i) > 1}
        if dup:
            raise PolicyError(f"layer(s) {sorted(dup)} named twice in the per-layer pages")
        seen.update(layers)
        out.append((kind, tuple(sorted(layers))))
    return tuple(out)


def _rotate(val: str) -> bool:
    if val not in ("k", "kv"):
        raise ValueError(f"rotate={val}: k or kv")
    return val == "kv"


# the policy options KVPolicy.parse reads: flags (key -> field, value) and key=value options
# (key -> field, conversion); split_policy_list uses the same names
_FLAGS = {"kv": ("rotate_v", True), "k": ("rotate_v", False), "center": ("k_center", True),
          "whiten": ("k_whiten", True)}
_VALUED = {"h": ("rotation_block", int), "seed": ("sign_seed", int),
           "rotate": ("rotate_v", _rotate), "balance": ("k_balance", float)}
POLICY_OPTIONS = tuple(_FLAGS) + tuple(_VALUED)
VALUED_OPTIONS = WIDE_KINDS    # options only when followed by "=": "int8" alone is a policy


def split_policy_list(text: str) -> list[str]:
    """"bf16,int4,int4-bdr:h=32,kv,seed=1" -> ["bf16", "int4", "int4-bdr:h=32,kv,seed=1"]: a comma
    (or ';') starts a new policy unless what follows is an option of the previous one (h=, seed=,
    rotate=, kv, k, center, balance=, whiten, int8=, bf16=). Suffixes after '@' (eval's variants) stay with their item."""
    out: list[str] = []
    for part in (p.strip() for p in text.replace(";", ",").split(",")):
        if not part:
            continue
        head = part.split("@")[0]
        key = head.split("=")[0]
        if out and (key in POLICY_OPTIONS or (key in VALUED_OPTIONS and "=" in head)):
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
        if self.page_size not in PAGE_SIZES:
            raise PolicyError(f"page size {self.page_size} must be one of "
                              f"{', '.join(map(str, PAGE_SIZES))}")
        if self.num_kv_heads < 1:
            raise PolicyError("num_kv_heads must be >= 1")
        object.__setattr__(self, "policy", self.policy.resolve(self.head_dim))

    # -- per-layer page formats (KVPolicy.layer_pages) --------------------------------------
    @property
    def mixed(self) -> bool:
        return self.policy.mixed

    def for_layer(self, layer: int) -> "PageLayout":
        """The uniform layout of one layer's pool: what the kernels of that layer get."""
        if not self.policy.mixed:
            return self
        return PageLayout(self.policy.for_layer(layer), self.head_dim, self.num_kv_heads,
                          self.page_size)

    def layers(self, num_layers: int) -> list["PageLayout"]:
        """Every layer's layout; validates that the policy's named layers exist."""
        self.policy.check_layers(num_layers)
        return [self.for_layer(i) for i in range(num_layers)]

    def bytes_per_token(self, num_layers: int) -> int:
        """Cache bytes of one token over all layers and KV heads, K and V."""
        return sum(lay.token_bytes for lay in self.layers(num_layers)) * self.num_kv_heads

    def pool_page_bytes(self, num_layers: int) -> int:
        """Bytes one page id costs over all layers' pools."""
        return sum(lay.page_bytes for lay in self.layers(num_layers))

    # -- one layer's bytes (a mixed layout has none: ask for_layer(i)) -----------------------
    def _uniform_policy(self) -> KVPolicy:
        if self.policy.mixed:
            raise PolicyError(f"{self.policy} has per-layer page formats: its byte layout is "
                              "per layer (PageLayout.for_layer(i))")
        return self.policy

    @property
    def code_bytes(self) -> int:
        """Bytes of K (or V) codes per token per KV head."""
        return self.head_dim * self._uniform_policy().bits // 8

    @property
    def param_bytes(self) -> int:
        return PARAM_BYTES if self._uniform_policy().quantized else 0

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

    def _head_block_bytes_by_kind(self) -> dict:
        """{kind: head_block_bytes} of the base policy and each per-layer kind."""
        kinds = [self.policy.base] + [KVPolicy(k) for k, _ in self.policy.layer_pages]
        return {p.kind: PageLayout(p, self.head_dim, self.num_kv_heads,
                                   self.page_size).head_block_bytes for p in kinds}

    def to_dict(self) -> dict:
        """The policy as its text (KVPolicy.parse reads it back); head_block_bytes is the base
        policy's; a mixed layout adds the per-layer kinds' (layer_head_block_bytes) so a reader
        can check both against its own layout."""
        by_kind = self._head_block_bytes_by_kind()
        d = {"policy": str(self.policy), "head_dim": self.head_dim,
             "num_kv_heads": self.num_kv_heads, "page_size": self.page_size,
             "head_block_bytes": by_kind.pop(self.policy.kind)}
        if by_kind:
            d["layer_head_block_bytes"] = by_kind
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "PageLayout":
        """Inverse of to_dict; "policy" may also be the field dict older configs hold."""
        pol = d["policy"]
        pol = KVPolicy.parse(pol) if isinstance(pol, str) else KVPolicy.from_dict(pol)
        layout = cls(pol, int(d["head_dim"]), int(d["num_kv_heads"]), int(d["page_size"]))
        layout.check_bytes(d)
        return layout

    def check_bytes(self, d: dict) -> None:
        """Raise PolicyError when a record's head_block_bytes disagree with this layout."""
        want = self.to_dict()
        for key in ("head_block_bytes", "layer_head_block_bytes"):
            if key in d and d[key] != want.get(key):
                raise PolicyError(f"config's {key} disagrees with this sawtrt's layout")

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)
