"""`evaluate()`: the Python API behind `sawtrt eval` (the CLI only parses and prints).

Which path produces a number (recorded as "path" in every row):

    reference   fp32 row: the transformers model with its own attention, no cache format
    runtime     sawtrt's torch model (CausalLM) over the paged cache, ops.write_kv +
                ops.paged_attention — the served path (Llama-architecture models: SmolLM2)
    hf-paged    the transformers model whose attention writes K/V (after RoPE and QK-norm) into
                sawtrt's paged cache and reads it back with the same ops (models the runtime
                does not have yet: Gemma 3)
    fake        the transformers model with K/V fake-quantized by the spec (or a variant) —
                the cross-check, and the only path for prototype variants ("...@clip")
"""
from __future__ import annotations

import datetime
import json
import math
import platform
import time

import torch

from .calibrate import calibrate, kv_calibration
from ..data.corpus import SOURCES, windows
from .hf_models import load
from .kvquant import KVScheme
from .runner import FP32, OutlierStats, agreement, greedy, perplexity, window_nll
from .runtime_path import RUNTIME_MODELS, RuntimeModel

DEFAULT_SCHEMES = ("fp32", "bf16", "int8", "int4", "int4-bdr:h=16", "int4-bdr:h=32",
                   "int4-bdr:h=64")


def _bytes_per_token(scheme: str, cfg) -> int | None:
    if scheme == FP32:
        return None
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return KVScheme.parse(scheme).cache_bytes_per_token(cfg.num_hidden_layers,
                                                        cfg.num_key_value_heads, d)


def _calib_windows(window: int) -> dict:
    """Calibration windows no longer than the evaluated ones: Gemma-3's local layers see 511
    tokens + BOS, and KVHook refuses longer sequences there (2 windows either way)."""
    w = min(512, window)
    return {"tokens": 2 * w, "window": w}


def evaluate(model: str | None = None, checkpoint: str | None = None,
             schemes=DEFAULT_SCHEMES, tokens: int = 2048, window: int = 512,
             sources=SOURCES, offset: int = 0, greedy_tokens: int = 64,
             greedy_prompt: int = 128, outliers: bool = True, cross_check: bool = False,
             hf_paged: bool = False, log=print, on_row=None, prefill_kv: str = "cache") -> dict:
    """Evaluate one model under each scheme. Returns a JSON-able dict (see docs/accuracy.md).

    cross_check: also run every served policy through the fake-quant path.
    hf_paged: for runtime models, also run served policies through the hf-paged path.
    on_row(row): called after each perplexity row (to checkpoint partial results).
    prefill_kv: what the runtime model's prompt tokens attend to ("cache": the quantized cache,
    what teacher-forced perplexity measures; "fresh": their own K/V, windows in 128-token
    chunks so later chunks read earlier ones from the cache, as a serving engine does).
    """
    t0 = time.time()
    hf, tok, label = load(model, checkpoint)
    cfg = hf.config
    sw = getattr(cfg, "sliding_window", None)
    need = window + (tok.bos_token_id is not None)
    if sw and need > sw:
        raise ValueError(f"{label}: BOS + {window}-token windows exceed its {sw}-token sliding "
                         f"window, which the paged path does not model; use --window {sw - 1}")
    if sw and greedy_tokens and greedy_prompt + greedy_tokens + 1 > sw:
        raise ValueError(f"{label}: greedy prompt + continuation exceed the sliding window {sw}")
    ws, info = windows(tok, sources, tokens, window, offset)
    for s in info:
        log(f"text {s['source']}: {s['origin']} sha256 {s['sha256'][:16]}… "
            f"tokens [{s['offset']}, {s['offset'] + s['tokens']}) of {s['source_tokens']} "
            f"in {s['windows']} windows of {window}")
    log(f"{len(ws)} windows, {sum(w.scored for w in ws)} scored tokens"
        f"{' (+BOS each)' if tok.bos_token_id is not None else ''}")
    runtime = RuntimeModel(label, tokenizer=tok, prefill_kv=prefill_kv) \
        if (checkpoint is None and label in RUNTIME_MODELS) else None
    parsed = {s: (None if s == FP32 else KVScheme.parse(s)) for s in schemes}
    calib = None
    if any(p is not None and p.calibrated for p in parsed.values()):
        d = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        blk = next((p.policy.block_for(d) for p in parsed.values()
                    if p is not None and p.calibrated and p.policy.rotated),
                   min(128, d))
        calib = calibrate(hf, tok, label, blk, **_calib_windows(window))
        log(f"calibrated variants on 'calib' text ({calib['tokens']} tokens, h={blk})")
    hook_kw = {"kv_calibration": kv_calibration(calib)} if calib else {}

    def paths_for(s):
        p = parsed[s]
        if p is None:
            return ["reference"]
        if not p.is_plain:
            return ["fake"]
        out = ["runtime" if runtime else "hf-paged"]
        if runtime and hf_paged:
            out.append("hf-paged")
        if cross_check:
            out.append("fake")
        return out

    rows = []
    for s in schemes:
        for path in paths_for(s):
            t = time.time()
            if path == "runtime":
                pol = parsed[s].policy
                acc: dict = {}
                for w in ws:
                    nll, n = runtime.window_nll(pol, w)
                    a = acc.setdefault(w.source, [0.0, 0])
                    a[0] += nll
                    a[1] += n
                nll = sum(a[0] for a in acc.values())
                n = sum(a[1] for a in acc.values())
                row = {"scheme": s, "path": path, "ppl": math.exp(nll / n), "nll": nll / n,
                       "tokens": n, "per_source": {k: math.exp(a[0] / a[1]) for k, a in acc.items()}}
            else:
                mode = {"reference": "fake", "hf-paged": "paged", "fake": "fake"}[path]
                r = perplexity(hf, ws, s, mode, **hook_kw)
                row = {"scheme": s, "path": path, "ppl": r.ppl, "nll": r.nll, "tokens": r.tokens,
                       "per_source": r.per_source}
            row["seconds"] = round(time.time() - t, 1)
            row["bytes_per_token"] = _bytes_per_token(s, cfg)
            rows.append(row)
            log(f"  {s:<28} {path:<9} ppl {row['ppl']:.4f}  "
                + "  ".join(f"{k} {v:.3f}" for k, v in row["per_source"].items())
                + f"  ({row['seconds']} s)")
            if on_row:
                on_row(row)
    _relative(rows)

    greedy_rows = []
    if greedy_tokens > 0:
        bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
        prompts = {}
        for w in ws:
            prompts.setdefault(w.source, list(w.ids[:len(bos) + greedy_prompt]))
        refs = {}
        for s in schemes:
            if s == FP32:
                continue
            path = paths_for(s)[0]
            for src, prompt in prompts.items():
                if path == "runtime":
                    out = runtime.greedy(parsed[s].policy, prompt, greedy_tokens)
                else:
                    out = greedy(hf, prompt, greedy_tokens, s,
                                 "paged" if path == "hf-paged" else "fake", **hook_kw)
                if s == "bf16":
                    refs[src] = out
                greedy_rows.append({"scheme": s, "path": path, "source": src, "tokens": out})
        for g in greedy_rows:
            if g["source"] in refs:
                g.update(agreement(refs[g["source"]], g["tokens"]))
        log("greedy continuation vs bf16 (%d prompt tokens, %d new):" % (greedy_prompt, greedy_tokens))
        for g in greedy_rows:
            log(f"  {g['scheme']:<28} {g['source']:<6} first divergence {g.get('first_divergence')}"
                f"  identical {g.get('identical_pct', float('nan')):.1f} %")

    outlier_rows = []
    if outliers:
        stats = OutlierStats()
        from .hooks import KVHook
        hook = KVHook("bf16", mode="fake", record=stats)
        for w in ws[:1] + [w for w in ws if w.source != ws[0].source][:1]:
            with hook.attach(hf):
                window_nll(hf, w)
        outlier_rows = stats.table()

    return {
        "model": label, "checkpoint": checkpoint, "date": datetime.date.today().isoformat(),
        "config": {"layers": cfg.num_hidden_layers, "kv_heads": cfg.num_key_value_heads,
                   "head_dim": getattr(cfg, "head_dim", None), "arch": cfg.model_type},
        "text": info, "tokens": tokens, "window": window, "results": rows,
        "greedy": greedy_rows, "outliers": outlier_rows,
        "env": {"python": platform.python_version(), "torch": torch.__version__},
        "seconds": round(time.time() - t0, 1),
    }


def probe(model: str | None = None, checkpoint: str | None = None, schemes=DEFAULT_SCHEMES,
          tokens: int = 128, window: int = 128, offset: int = 2048, sources=SOURCES,
          log=print) -> list[dict]:
    """Screening metric per scheme: sum over layers of ||o_q - o||^2 / sum ||o||^2, the
    attention output with quantized K/V vs exact, both from the exact inputs (no cascade)."""
    from .hooks import KVHook
    hf, tok, label = load(model, checkpoint)
    cfg = hf.config
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    ws, _ = windows(tok, sources, tokens, window, offset)
    out = []
    for s in schemes:
        if s == FP32:
            continue
        sch = KVScheme.parse(s)
        kw = {}
        if sch.calibrated:
            c = calibrate(hf, tok, label, sch.policy.block_for(d) or min(128, d),
                          **_calib_windows(window))
            kw = {"kv_calibration": kv_calibration(c)}
        hook = KVHook(sch, mode="probe", **kw)
        for w in ws:
            with hook.attach(hf):
                window_nll(hf, w)
        err = sum(a for a, _ in hook.errors.values())
        ref = sum(b for _, b in hook.errors.values())
        per = {layer: a / b for layer, (a, b) in sorted(hook.errors.items())}
        worst = sorted(per, key=per.get, reverse=True)[:5]
        out.append({"scheme": s, "error": err / ref, "per_layer": per})
        log(f"  {s:<40} probe error {err / ref:.5f}  worst layers "
            + ", ".join(f"{i}:{per[i]:.4f}" for i in worst))
    return out


def _relative(rows) -> None:
    """Add the % change of ppl vs the bf16 and fp32 rows (same path family)."""
    base = {r["scheme"]: r["ppl"] for r in rows if r["path"] != "fake" or r["scheme"] in ("bf16",)}
    for r in rows:
        for ref in ("bf16", "fp32"):
            if ref in base:
                r[f"vs_{ref}_pct"] = 100.0 * (r["ppl"] / base[ref] - 1.0)


def format_table(result: dict) -> str:
    w = max([30] + [len(r["scheme"]) + 2 for r in result["results"]])
    lines = [f"model {result['model']}  ({result['tokens']} tokens per source, windows of "
             f"{result['window']})",
             f"{'scheme':<{w}}{'path':<10}{'ppl':>9}{'vs bf16':>9}{'vs fp32':>9}"
             f"{'B/token':>9}  per source"]
    for r in result["results"]:
        b = r["bytes_per_token"]
        lines.append(f"{r['scheme']:<{w}}{r['path']:<10}{r['ppl']:>9.3f}"
                     f"{r.get('vs_bf16_pct', float('nan')):>+8.2f}%"
                     f"{r.get('vs_fp32_pct', float('nan')):>+8.2f}%{(b or 0):>9}  "
                     + " ".join(f"{k}={v:.3f}" for k, v in r["per_source"].items()))
    if result.get("outliers"):
        lines.append("K outliers: mean over vectors of max|k|/RMS(k) per layer (before -> after BDR)")
        for row in result["outliers"]:
            lines.append(f"  layer {row['layer']:>2}: " + "  ".join(
                f"{k} {v['mean']:.2f} (max {v['max']:.1f})" for k, v in row.items() if k != "layer"))
    return "\n".join(lines)


def save_json(result: dict, path) -> None:
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
