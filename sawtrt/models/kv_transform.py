"""Model-side K transforms of a KV policy: K centring, Q/K balance, whitening (no kernel change).

`KVPolicy.k_center`, `k_balance` and `k_whiten` (text options `center`, `balance=ALPHA`,
`whiten`) ask the model to hand the kernels a transformed query and key, per layer l, KV head g
(and channel c):

    k' = (k - mu[l, g]) / s[l, g]        q' = q * s[l, g]     (q of every query head of group g)
    k' = A[l, g] (k - mu[l, g])          q' = A[l, g]^-T q    (whiten: A a D x D matrix)

after RoPE (and Qwen3's k_norm), before `ops.write_kv` / `ops.attention_step`, which rotate
(BDR), quantize and store k' exactly as they store k without the options. The scores change by
a per-query constant only: q'.k' = q.k - q.mu, which softmax ignores; s cancels exactly. So
the read kernels, the page layout and the bytes per token are those of the plain policy.

    mu   the mean post-RoPE K of calibration text: removes the common offset of every key,
         which the rotation would otherwise spread over the block and which widens every
         token's [min, max] range (docs/accuracy.md: -18 % attention error).
    s    s_c = (rms k_c / rms q_c) ** alpha (rms over the calibration tokens; K with its mean,
         q over the group's query heads), normalised to geometric mean 1 per (layer, head). The
         4-bit error of a score is about |q'|^2 * |k'|^2 up to constants (the step of the
         rotated k' grows with |k'|); alpha = 1/2 minimises that product (Cauchy-Schwarz).
    A    the same objective over all linear maps, E|A^-T q|^2 * E|A k|^2: minimised by the
         symmetric A with A^2 = Sigma_k^-1 # Sigma_q (the matrix geometric mean; Sigma the
         second-moment matrices of k, mean included, and of q). Diagonal Sigmas give s above.
         Costs a [D x D] matmul on q and k per layer instead of an elementwise scale.

The statistics live in the engine directory (`CALIBRATION_FILE`: k_mean, k_rms, q_rms, fp32
[layers, kv_heads, D], and for whiten k_moment, q_moment [layers, kv_heads, D, D]) and are
computed by `sawtrt build` with `calibrate()` (the model itself over calibration text disjoint
from the eval text); mu, s and A are derived at load, so one file serves every alpha.
"""
from __future__ import annotations

import json
import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..spec import KVPolicy
from .specs import ModelSpec

CALIBRATION_FILE = "kv_calibration.safetensors"
STATS = ("k_mean", "k_rms", "q_rms")
MOMENTS = ("k_moment", "q_moment")   # only in files of whiten policies
# bump when calibrate() or the file's meaning changes: engines built before then recalibrate
CALIBRATION_VERSION = 2
CALIBRATION_TOKENS = 1024        # 2 windows of 512 (+BOS): a few s of CPU for SmolLM2 in fp32
CALIBRATION_WINDOW = 512


class KVCalibrationError(ValueError):
    """A missing, malformed or mismatched K calibration."""


@dataclass
class KVCalibration:
    """Per layer, KV head and channel: mean K, RMS of K (mean included) and RMS of q (over the
    head's query group), all post-RoPE, fp32 [L, Hkv, D]; optionally the second-moment
    matrices E[k k^T], E[q q^T] [L, Hkv, D, D] (whiten)."""
    k_mean: torch.Tensor
    k_rms: torch.Tensor
    q_rms: torch.Tensor
    meta: dict = field(default_factory=dict)     # where the statistics came from
    k_moment: torch.Tensor | None = None
    q_moment: torch.Tensor | None = None

    @classmethod
    def identity(cls, spec: ModelSpec, why: str) -> "KVCalibration":
        """mu = 0, s = 1 (A = I from the identity moments): the transform changes nothing (random-weights engines)."""
        shape = (spec.num_layers, spec.num_kv_heads, spec.head_dim)
        eye = torch.eye(spec.head_dim).expand(*shape[:2], -1, -1).contiguous()
        return cls(torch.zeros(shape), torch.ones(shape), torch.ones(shape),
                   {"source": "identity", "note": why}, eye, eye.clone())

    def check(self, spec: ModelSpec) -> "KVCalibration":
        shape = (spec.num_layers, spec.num_kv_heads, spec.head_dim)
        present = [n for n in MOMENTS if getattr(self, n) is not None]
        for name in STATS + tuple(present):
            t = getattr(self, name)
            want = shape + ((spec.head_dim,) if name in MOMENTS else ())
            if not isinstance(t, torch.Tensor) or tuple(t.shape) != want:
                raise KVCalibrationError(
                    f"K calibration {name}: expected a tensor of shape {list(want)} "
                    f"[layers, kv_heads, head_dim{', head_dim' if name in MOMENTS else ''}], got "
                    f"{list(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
            if not torch.isfinite(t).all():
                raise KVCalibrationError(f"K calibration {name} has non-finite values")
        if (self.k_rms <= 0).any() or (self.q_rms <= 0).any():
            raise KVCalibrationError("K calibration k_rms / q_rms must be > 0")
        return self

    def save(self, path: Path, moments: bool = False) -> str:
        """Write the safetensors file (with the moment matrices when asked); returns its
        sha256."""
        from safetensors.torch import save_file
        tmp = path.with_suffix(".part")
        names = STATS + (MOMENTS if moments else ())
        # the metadata as one JSON value: safetensors writes several keys in a random order,
        # and the file's sha256 (recorded in config.json) must depend on the numbers only
        meta = json.dumps({k: str(v) for k, v in self.meta.items()}, sort_keys=True)
        save_file({n: getattr(self, n).float().contiguous() for n in names}, str(tmp),
                  metadata={"sawtrt": meta})
        tmp.replace(path)
        return hashlib.sha256(path.read_bytes()).hexdigest()

    @classmethod
    def load(cls, path: Path, spec: ModelSpec, sha256: str | None = None) -> "KVCalibration":
        path = Path(path)
        if not path.is_file():
            raise KVCalibrationError(f"K calibration {str(path)!r} is missing; rebuild the "
                                     "engine with `sawtrt build`")
        if sha256 is not None and hashlib.sha256(path.read_bytes()).hexdigest() != sha256:
            raise KVCalibrationError(f"K calibration {str(path)!r} does not match the sha256 "
                                     "in config.json; rebuild the engine")
        from safetensors import SafetensorError, safe_open
        try:
            with safe_open(str(path), "pt") as f:
                missing = [n for n in STATS if n not in f.keys()]
                if missing:
                    raise KVCalibrationError(f"K calibration {str(path)!r} lacks {missing}")
                tensors = {n: f.get_tensor(n).float() for n in STATS + MOMENTS
                           if n in f.keys()}
                meta = f.metadata() or {}
                meta = json.loads(meta["sawtrt"]) if "sawtrt" in meta else meta
        except (SafetensorError, OSError) as e:
            raise KVCalibrationError(f"K calibration {str(path)!r} is not a readable "
                                     f"safetensors file: {e}") from None
        return cls(**tensors, meta=meta).check(spec)

    def scales(self, alpha: float) -> torch.Tensor:
        """s [L, Hkv, D] = (k_rms / q_rms) ** alpha, geometric mean 1 per (layer, head)."""
        s = (self.k_rms.double() / self.q_rms.double()).pow(alpha)
        return (s / s.log().mean(-1, keepdim=True).exp()).float()

    def whitening(self) -> torch.Tensor:
        """A [L, Hkv, D, D] (symmetric; det 1 per head) with A^2 = Sigma_k^-1 # Sigma_q."""
        if self.k_moment is None or self.q_moment is None:
            raise KVCalibrationError("whiten needs the K calibration's k_moment / q_moment "
                                     "matrices; rebuild the engine with the whiten policy")
        return whitening(self.k_moment, self.q_moment, self.shrink)

    @property
    def shrink(self) -> float:
        """Shrinkage of the moment matrices toward their scaled identity before the whitening
        (`shrink_moment`); recorded in the file's metadata, 0 in files written without it."""
        return float(self.meta.get("whiten_shrink", 0.0))


def spd_power(m: torch.Tensor, p: float, floor: float = 1e-6) -> torch.Tensor:
    """m^p (fp64) of symmetric positive semi-definite matrices [..., D, D]; eigenvalues are
    floored at floor * their mean, so directions K never uses do not blow up."""
    w, u = torch.linalg.eigh(m.double())
    w = w.clamp_min(floor * w.mean(-1, keepdim=True))
    return (u * w[..., None, :].pow(p)) @ u.transpose(-1, -2)


def shrink_moment(m: torch.Tensor, shrink: float) -> torch.Tensor:
    """(1 - shrink) M + shrink (tr M / D) I per matrix [..., D, D] (fp64): the regularised
    estimate of a second-moment matrix from a finite sample. Directions the calibration text
    barely used get a floor at shrink x the mean variance, so A^2 = Sigma_k^-1 # Sigma_q cannot
    amplify them without bound on text that does use them (the held-out overfit mode)."""
    m = m.double()
    if not shrink:
        return m
    if not 0.0 <= shrink <= 1.0:
        raise KVCalibrationError(f"whiten shrinkage {shrink} must be in [0, 1]")
    d = m.shape[-1]
    eye = torch.eye(d, dtype=m.dtype)
    return (1.0 - shrink) * m + shrink * (m.diagonal(dim1=-2, dim2=-1).mean(-1))[..., None, None] * eye


def whitening(k_moment: torch.Tensor, q_moment: torch.Tensor, shrink: float = 0.0) -> torch.Tensor:
    """The A minimising E|A^-T q|^2 E|A k|^2 (module doc) of the moments shrunk by `shrink`
    (`shrink_moment`), scaled to det 1, fp32."""
    k_moment, q_moment = shrink_moment(k_moment, shrink), shrink_moment(q_moment, shrink)
    kh, kih = spd_power(k_moment, 0.5), spd_power(k_moment, -0.5)
    a = spd_power(kih @ spd_power(kh @ q_moment.double() @ kh, 0.5) @ kih, 0.5)
    logdet = torch.linalg.slogdet(a)[1] / a.shape[-1]
    return (a / logdet.exp()[..., None, None]).float()


class KVTransform:
    """(layer, q [T, Hq, D], k [T, Hkv, D]) -> (q', k') as the policy asks (module doc);
    constants in the model's dtype on its device. Called once per layer by CausalLM.forward."""

    def __init__(self, policy: KVPolicy, calib: KVCalibration, num_heads: int,
                 dtype: torch.dtype = torch.float32, device=None):
        if not policy.transforms_k:
            raise ValueError(f"policy {policy} has no K transform")
        group = num_heads // calib.k_mean.shape[1]
        self.policy = policy
        self.k_mean = calib.k_mean.to(device, dtype) if policy.k_center else None
        self.k_scale = self.q_scale = self.k_mat = self.q_mat = self.head_mat = None
        if policy.k_whiten:
            a = calib.whitening()                                            # [L, Hkv, D, D]
            self.k_mat = a.to(device, dtype)                                 # k' = A k
            self.q_mat = torch.linalg.inv(a.double()).transpose(-1, -2).float().to(device, dtype)
            # both sides as one batched matmul over the Hq + Hkv heads: [L, Hq + Hkv, D, D]
            self.head_mat = torch.cat((self.q_mat.repeat_interleave(group, 1), self.k_mat), 1)
        if policy.k_balance is not None:
            s = calib.scales(policy.k_balance)
            self.k_scale = (1.0 / s).to(device, dtype)                      # [L, Hkv, D]
            self.q_scale = s.repeat_interleave(group, 1).to(device, dtype)  # [L, Hq, D]

    def params(self, layer: int) -> tuple:
        """Layer `layer`'s constants for `apply` (None where the policy leaves a step out): plain
        tensors, so that one compiled function (CausalLM's layer prologue) serves every layer."""
        def at(t):
            return None if t is None else t[layer]
        return (at(self.k_mean), at(self.k_scale), at(self.q_scale), None, None,
                at(self.head_mat))

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor):
        return apply(q, k, *self.params(layer))


def apply(q, k, k_mean=None, k_scale=None, q_scale=None, k_mat=None, q_mat=None,
          head_mat=None):
    """q [T, Hq, D], k [T, Hkv, D] -> (q', k') with one layer's constants (module doc).
    Whitening: k_mat [Hkv, D, D] and q_mat (two matmuls), or head_mat [Hq + Hkv, D, D], q_mat
    per query head then k_mat per KV head, as one batched matmul (one launch per layer)."""
    if k_mean is not None:
        k = k - k_mean
    if k_scale is not None:
        k = k * k_scale
        q = q * q_scale
    if head_mat is not None:
        hq = q.shape[1]
        qk = torch.einsum("thd,hed->the", torch.cat((q, k), 1), head_mat)
        return qk[:, :hq], qk[:, hq:]
    if k_mat is not None:
        t, hq, d = q.shape
        hkv = k.shape[1]
        k = torch.einsum("thd,hed->the", k, k_mat)
        q = torch.einsum("thgd,hed->thge", q.reshape(t, hkv, hq // hkv, d),
                         q_mat).reshape(t, hq, d)
    return q, k


class _Recorder:
    """A KVTransform stand-in that leaves q, k alone and sums their statistics (fp64)."""

    def __init__(self, spec: ModelSpec):
        shape = (spec.num_layers, spec.num_kv_heads, spec.head_dim)
        self.n = 0
        self.k_sum = torch.zeros(shape, dtype=torch.float64)
        self.k_mom = torch.zeros(shape + (spec.head_dim,), dtype=torch.float64)
        self.q_mom = torch.zeros(shape + (spec.head_dim,), dtype=torch.float64)
        self.hkv = spec.num_kv_heads

    def __call__(self, layer, q, k):
        kd = k.double()
        qd = q.double().reshape(q.shape[0], self.hkv, -1, q.shape[-1])   # [T, Hkv, G, D]
        self.k_sum[layer] += kd.sum(0)
        self.k_mom[layer] += torch.einsum("thd,the->hde", kd, kd)
        self.q_mom[layer] += torch.einsum("thgd,thge->hde", qd, qd) / qd.shape[2]
        if layer == 0:
            self.n += k.shape[0]
        return q, k


def calibration_windows(ids: list[int], bos: int | None, tokens: int = CALIBRATION_TOKENS,
                        window: int = CALIBRATION_WINDOW) -> list[list[int]]:
    """The first `tokens` ids in windows of `window`, each with BOS in front (as the eval)."""
    if len(ids) < tokens:
        raise KVCalibrationError(f"calibration text has {len(ids)} tokens, {tokens} needed")
    return [([bos] if bos is not None else []) + ids[s:min(s + window, tokens)]
            for s in range(0, tokens, window)]


def calibration_ids(encode) -> tuple[list[int], dict]:
    """Token ids of the calibration text (sawtrt.data.corpus 'calib': CPython's pydoc_data
    topics, disjoint from the eval text) and its description. encode: str -> ids, no BOS."""
    from ..data.corpus import calib_text       # a leaf module: text sources only
    t = calib_text()
    return encode(t.text), {"source": "calib", "origin": t.origin, "text_sha256": t.sha256}


def calibration_sample(encode, bos: int | None, sources=None, tokens: int = CALIBRATION_TOKENS,
                       window: int = CALIBRATION_WINDOW) -> tuple[list[list[int]], dict]:
    """Windows of `tokens` tokens from each calibration source (default: sawtrt.data.corpus
    CALIB_SOURCES, three genres disjoint from the eval text; names or corpus.Text) and their
    description. encode: str -> ids, no BOS."""
    from ..data import corpus
    out, desc = [], []
    for src in (sources or corpus.CALIB_SOURCES):
        t = corpus.get_text(src)
        out += calibration_windows(encode(t.text), bos, tokens, window)
        desc.append(f"{t.name}:{t.sha256[:16]}")
    return out, {"source": "+".join(d.split(":")[0] for d in desc), "texts": " ".join(desc),
                 "tokens_per_source": tokens}


def calibrate(spec: ModelSpec, weights: dict[str, torch.Tensor], windows: list[list[int]],
              meta: dict | None = None) -> KVCalibration:
    """Run the model (fp32, CPU, bf16 cache: K as exact as served) over the windows, each an
    independent sequence, and return the statistics of its post-RoPE q and K."""
    from .. import kv_cache
    from ..spec import PageLayout
    from .model import AttentionMetadata, CausalLM
    layout = PageLayout(KVPolicy("bf16"), spec.head_dim, spec.num_kv_heads, 64)
    longest = max(len(w) for w in windows)
    model = CausalLM(spec, layout, weights, dtype=torch.float32, device="cpu",
                     max_positions=longest)
    rec = model.kv_transform = _Recorder(spec)
    pages = -(-longest // layout.page_size)
    for ids in windows:
        n = len(ids)
        pool = kv_cache.new_pool(layout, spec.num_layers, pages)
        meta_ = AttentionMetadata(torch.arange(n), torch.arange(n), torch.arange(
            pages, dtype=torch.int32)[None], torch.tensor([n], dtype=torch.int32),
            torch.tensor([n], dtype=torch.int32), torch.tensor([n - 1]))
        model(torch.tensor(ids), meta_, pool)
    n = rec.n
    info = dict(meta or {}, tokens=n, windows=len(windows))
    k_mom, q_mom = rec.k_mom / n, rec.q_mom / n
    rms = lambda m: m.diagonal(dim1=-2, dim2=-1).sqrt().float()      # noqa: E731
    return KVCalibration((rec.k_sum / n).float(), rms(k_mom), rms(q_mom), info, k_mom.float(),
                         q_mom.float()).check(spec)
