"""Which layers' KV pages cost the most accuracy: a per-layer ranking, and the policy it suggests.

The measurement (docs/accuracy.md, "Wider pages for the most sensitive layers"): for each layer
l, the model with only layer l storing the base policy's pages (its K transform included) and
every other layer storing bf16 pages, scored against the all-bf16 model by the mean KL
divergence KL(p_bf16 || p_l) of the next-token distributions over the text. One layer's damage
from exact inputs: no cascade from other layers' rounding, so the ranking is smooth where
single-layer perplexity changes are noise.

Layers before l are identical in the two models, so one all-bf16 pass per window records the
hidden state entering every layer, and run l starts from it: L + L(L + 1)/2 layer passes per
window instead of L^2 (SmolLM2-135M, 30 layers: 495 instead of 900).

Per layer the result holds `kl` (mean per scored token), `dnll` (mean NLL increase per token;
one rounding draw, can be negative), `share` (of the L layers' summed KL) and `rank` (1 = most
sensitive, by KL). `suggest_policy` turns the top n into `int8=` (or `bf16=`) per-layer pages
(KVPolicy.layer_pages), what `sawtrt rank-layers` prints and `sawtrt build --rank-layers N`
writes.

Runs sawtrt's own CausalLM (the served model, `CausalLM.layer` / `CausalLM.logits`) on the CPU
in fp32, the torch reference of the cache ops.
"""
from __future__ import annotations

import dataclasses
import math

import torch

from .. import kv_cache
from ..models.kv_transform import KVCalibration, KVTransform
from ..models.model import AttentionMetadata, CausalLM
from ..models.specs import ModelSpec
from ..spec import KVPolicy, PageLayout, PolicyError

REFERENCE = KVPolicy("bf16")     # what every other layer stores: K/V as exact as served


def wide_kind(policy: KVPolicy) -> str:
    """The page kind that widens `policy`: int8 for the 4-bit kinds, bf16 for int8."""
    return "int8" if policy.bits < 8 else "bf16"


def layer_passes(num_layers: int, num_windows: int) -> int:
    """Decoder-layer evaluations `rank_layers` makes (the unit of its progress callback)."""
    return num_windows * (num_layers + num_layers * (num_layers + 1) // 2)


def _window_ids(window) -> list[int]:
    """A window is a list of token ids (BOS included) or anything with `.ids` (corpus.Window)."""
    return list(getattr(window, "ids", window))


def _prefill_meta(n: int, page_size: int) -> AttentionMetadata:
    """One sequence of n tokens prefilled at once into pages 0, 1, ... (slot = position); the
    next-token logits of every position but the last (the last has no target)."""
    pages = -(-n // page_size)
    return AttentionMetadata(torch.arange(n), torch.arange(n),
                             torch.arange(pages, dtype=torch.int32)[None],
                             torch.tensor([n], dtype=torch.int32),
                             torch.tensor([n], dtype=torch.int32), torch.arange(n - 1))


@torch.inference_mode()
def rank_layers(spec: ModelSpec, weights: dict[str, torch.Tensor], windows, policy: KVPolicy,
                calibration: KVCalibration | None = None, progress=None,
                page_size: int = 64) -> list[dict]:
    """Per layer (list index = layer): {"layer", "kl", "dnll", "share", "rank"} (module doc).

    windows: token-id sequences (BOS included), each scored as an independent sequence on every
    position after the first. policy: its base (`policy.base`) is what layer l stores; its
    per-layer pages, if any, are ignored. calibration: the K calibration behind the base
    policy's center / balance / whiten (required for those; not computed here, so the text it
    comes from is the caller's choice). progress(done, total): called after every decoder-layer
    pass (total = `layer_passes`).
    """
    base = policy.base
    if not base.quantized:
        raise PolicyError(f"{base} pages are the reference the ranking compares against: "
                          "rank a quantized policy (int8, int4, int4-bdr)")
    transform = None
    if base.transforms_k:
        if calibration is None:
            raise ValueError(f"{base} transforms K: rank_layers needs its K calibration "
                             "(kv_transform.calibrate over the calibration text)")
        transform = KVTransform(base, calibration.check(spec), spec.num_heads, torch.float32)
    seqs = [_window_ids(w) for w in windows]
    if not seqs or min(len(s) for s in seqs) < 2:
        raise ValueError("rank_layers needs windows of at least 2 tokens (one scored token)")
    nl = spec.num_layers
    longest = max(len(s) for s in seqs)

    def model(pol, kvt=None):
        layout = PageLayout(pol, spec.head_dim, spec.num_kv_heads, page_size)
        return CausalLM(spec, layout, weights, dtype=torch.float32, device="cpu",
                        max_positions=longest, kv_transform=kvt)

    # two models on the same weights: their layers differ only in the pages (and K transform)
    reference, quantized = model(REFERENCE), model(base, transform)
    kl, dnll = [0.0] * nl, [0.0] * nl
    scored, done, total = 0, 0, layer_passes(nl, len(seqs))

    def tick():
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, total)

    for ids in seqs:
        ids = torch.tensor(ids)
        n = len(ids)
        meta = _prefill_meta(n, page_size)
        pages = -(-n // page_size)
        # every pass writes all n slots of a layer before attending, so the pools are reused
        ref_pool = kv_cache.new_pool(reference.layout, nl, pages)
        q_pool = kv_cache.new_pool(quantized.layout, 1, pages)[0]
        targets = ids[1:, None]
        x = torch.nn.functional.embedding(ids, reference.embed)
        entering = []                                   # hidden state entering layer i
        for i in range(nl):
            entering.append(x)
            x = reference.layer(i, x, meta, ref_pool[i])
            tick()
        ref_lp = torch.log_softmax(reference.logits(x, meta), -1)
        ref_p = ref_lp.exp()
        ref_nll = -float(ref_lp.gather(-1, targets).sum())
        for l in range(nl):
            x = quantized.layer(l, entering[l], meta, q_pool)
            tick()
            for i in range(l + 1, nl):
                x = reference.layer(i, x, meta, ref_pool[i])
                tick()
            lp = torch.log_softmax(reference.logits(x, meta), -1)
            kl[l] += float((ref_p * (ref_lp - lp)).sum())
            dnll[l] += -float(lp.gather(-1, targets).sum()) - ref_nll
        scored += n - 1
    total_kl = sum(kl)
    rows = [{"layer": l, "kl": kl[l] / scored, "dnll": dnll[l] / scored,
             "share": kl[l] / total_kl if total_kl > 0 else 0.0} for l in range(nl)]
    for r, l in enumerate(sorted(range(nl), key=lambda i: (-kl[i], i)), 1):
        rows[l]["rank"] = r
    if not all(math.isfinite(r["kl"]) for r in rows):
        raise FloatingPointError("non-finite KL in the layer ranking (the model diverged)")
    return rows


def top_layers(ranking: list[dict], n: int) -> list[int]:
    """The n most sensitive layers, most sensitive first."""
    return [r["layer"] for r in sorted(ranking, key=lambda r: r["rank"])[:n]]


def suggest_policy(policy: KVPolicy, ranking: list[dict], n: int,
                   kind: str = "int8") -> KVPolicy:
    """`policy` with `kind` pages for the n top-ranked layers (n = 0: the policy itself)."""
    if policy.mixed:
        raise PolicyError(f"{policy} already names per-layer pages (layers "
                          f"{list(policy.wide_layers)}): suggest from its base policy "
                          f"{policy.base}")
    nl = len(ranking)
    if not 0 <= n < nl:
        raise PolicyError(f"cannot widen {n} of {nl} layers: choose 0..{nl - 1} (all of them "
                          "wide is the plain wide policy)")
    if n == 0:
        return policy
    return dataclasses.replace(policy, layer_pages=((kind, tuple(top_layers(ranking, n))),))


def format_ranking(ranking: list[dict], top: int | None = None) -> str:
    """The table `sawtrt rank-layers` prints, most sensitive layer first; a line under the top
    `top` rows."""
    lines = [f"{'rank':>4} {'layer':>5} {'KL x1e-3':>9} {'share':>7} {'dNLL':>9}"]
    for r in sorted(ranking, key=lambda r: r["rank"]):
        lines.append(f"{r['rank']:>4} {r['layer']:>5} {1e3 * r['kl']:>9.3f} "
                     f"{100 * r['share']:>6.1f}% {r['dnll']:>+9.5f}")
        if top and r["rank"] == top and top < len(ranking):
            lines.append("-" * len(lines[0]))
    return "\n".join(lines)
