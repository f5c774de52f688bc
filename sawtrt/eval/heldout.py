"""The held-out protocol of `sawtrt eval`: calibrate on one set of texts, score on another.

    calibration   `calib_tokens` tokens of each calibration source (default corpus.CALIB_SOURCES:
                  technical, legal, conversational), the sample every calibrated K transform
                  (center / balance / whiten) is estimated from
    evaluation    `tokens` tokens of each eval source (default corpus.EVAL_SOURCES, the same
                  three genres, other documents); `corpus.check_disjoint` refuses shared text
    realisations  every rotated policy is run with sign seeds 1..seeds (the +-1 signs of the
                  block Hadamard; plain Hadamard is one more draw of the same family); the
                  report gives, per policy, the mean and sample sd over realisations of the
                  ppl change vs bf16, over all eval tokens and per source
    overfit       calibrated policies, and the same policy without its K transform, are also
                  scored on the first window of each calibration source; the transform's gain
                  (ppl change without it minus with it, points) on calibration text and on
                  held-out text is compared: `overfit` is flagged when the held-out gain is
                  below OVERFIT_KEEP x the calibration-text gain and smaller by more than
                  OVERFIT_POINTS (held-out loss much above what the calibration text showed)
    generation    greedy decoding of `prompts` chat prompts (corpus.chat_prompts: opening turns
                  of the eval dialogues, in no calibration text) under each policy's first
                  realisation vs bf16: first divergence and token-match rate

Numbers depend on the torch CPU thread count (the fp32 reductions are blocked differently and
4-bit rounding amplifies the last bit); it is fixed (`threads`, default 1) and recorded.
Paths as `evaluate`: runtime for the runtime's models (SmolLM2), hf-paged otherwise.
"""
from __future__ import annotations

import dataclasses
import datetime
import math
import platform
import statistics
import time

import torch

from ..data import corpus
from ..spec import KVPolicy
from .kvquant import KVScheme
from .runner import agreement

OVERFIT_KEEP = 0.5
OVERFIT_POINTS = 0.5


def expand_seeds(policy: KVPolicy, seeds: int, first: int = 1) -> list[KVPolicy]:
    """The realisations of a policy: sign seeds first..first+seeds-1 for a rotated one, else
    itself."""
    if not (policy.quantized and policy.rotated) or seeds <= 0:
        return [policy]
    return [dataclasses.replace(policy, sign_seed=s) for s in range(first, first + seeds)]


def spread(values) -> dict:
    """mean, sample sd (n - 1; 0 for one value), standard error, min, max, n."""
    v = [float(x) for x in values]
    n = len(v)
    if n == 0:
        raise ValueError("no values")
    mean = math.fsum(v) / n
    sd = statistics.stdev(v) if n > 1 else 0.0
    return {"mean": mean, "sd": sd, "se": sd / math.sqrt(n), "min": min(v), "max": max(v),
            "n": n}


def pct(ppl: float, ref: float) -> float:
    return 100.0 * (ppl / ref - 1.0)


def pooled(per_source: dict) -> tuple[float, int]:
    """(mean nll, tokens) over all sources of {source: [nll sum, tokens]}."""
    nll = math.fsum(a[0] for a in per_source.values())
    n = sum(a[1] for a in per_source.values())
    return nll / n, n


def untransformed(policy: KVPolicy) -> KVPolicy:
    """The policy without its K transform (center / balance / whiten): same pages."""
    return dataclasses.replace(policy, k_center=False, k_balance=None, k_whiten=False)


def overfit_flag(gain_heldout: float, gain_calib: float) -> bool:
    """True when the transform keeps less than OVERFIT_KEEP of its calibration-text gain on
    held-out text, and that shortfall exceeds OVERFIT_POINTS (gains in ppl points)."""
    return gain_heldout < OVERFIT_KEEP * gain_calib and \
        gain_calib - gain_heldout > OVERFIT_POINTS


def default_window(cfg, tok, longest: int = 512) -> int:
    """Tokens per window: `longest`, or what a shorter sliding window holds beside the BOS
    (Gemma-3-270M: 511)."""
    sw = getattr(cfg, "sliding_window", None)
    return min(longest, sw - (tok.bos_token_id is not None)) if sw else longest


class _Scorer:
    """Scores windows under a policy on the model's path (runtime or hf-paged)."""

    def __init__(self, model: str | None, checkpoint: str | None, calib_sources, calib_tokens,
                 window, shrink, log, prefill_kv: str = "cache"):
        from .hf_models import load
        from .runtime_path import RUNTIME_MODELS, RuntimeModel
        self.hf, self.tok, self.label = load(model, checkpoint)
        cfg = self.hf.config
        self.cfg = cfg
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        window = default_window(cfg, self.tok) if window is None else window
        self.calib_sources, self.calib_tokens, self.window = calib_sources, calib_tokens, window
        self.shrink = shrink
        self.runtime = RuntimeModel(self.label, tokenizer=self.tok, calib_sources=calib_sources,
                                    calib_tokens=calib_tokens, shrink=shrink,
                                    prefill_kv=prefill_kv) \
            if (checkpoint is None and self.label in RUNTIME_MODELS) else None
        self.path = "runtime" if self.runtime else "hf-paged"
        self._hf_calib: dict = {}
        self.log = log

    def configure(self, calib_sources, calib_tokens: int, shrink: float) -> None:
        """Calibrate on other text / tokens (statistics recomputed) or shrink differently."""
        if (list(calib_sources), calib_tokens) != (list(self.calib_sources), self.calib_tokens):
            self.calib_sources, self.calib_tokens = calib_sources, calib_tokens
            self._hf_calib = {}
            if self.runtime:
                self.runtime.calib_sources, self.runtime.calib_tokens = calib_sources, calib_tokens
                self.runtime._calibration = None
                self.runtime._models = {}
        self.shrink = shrink
        if self.runtime:
            self.runtime.set_shrink(shrink)

    def _hook_kw(self, policy: KVPolicy) -> dict:
        if not policy.transforms_k:
            return {}
        from .calibrate import calibrate, kv_calibration
        blk = policy.block_for(self.head_dim) or min(128, self.head_dim)
        if blk not in self._hf_calib:
            self._hf_calib[blk] = calibrate(self.hf, self.tok, self.label, blk,
                                            self.calib_tokens, self.window,
                                            sources=self.calib_sources)
        c = self._hf_calib[blk]
        return {"kv_calibration": kv_calibration(c, self.shrink)}

    def score(self, policy: KVPolicy, windows) -> dict:
        """{source: [nll sum, tokens]} over the windows."""
        acc: dict = {}
        if self.runtime:
            for w in windows:
                nll, n = self.runtime.window_nll(policy, w)
                a = acc.setdefault(w.source, [0.0, 0])
                a[0] += nll
                a[1] += n
            return acc
        from .runner import window_nll
        from .hooks import KVHook
        hook = KVHook(KVScheme.parse(str(policy)), mode="paged",
                      max_tokens=max(len(w.ids) for w in windows), **self._hook_kw(policy))
        for w in windows:
            hook.reset()
            with hook.attach(self.hf):
                nll, n = window_nll(self.hf, w)
            a = acc.setdefault(w.source, [0.0, 0])
            a[0] += nll
            a[1] += n
        return acc

    def generate(self, policy: KVPolicy, prompt: list[int], steps: int) -> list[int]:
        if self.runtime:
            return self.runtime.greedy(policy, prompt, steps)
        from .runner import greedy
        return greedy(self.hf, prompt, steps, str(policy), "paged", **self._hook_kw(policy))

    def bytes_per_token(self, policy: KVPolicy) -> int:
        return KVScheme.parse(str(policy)).cache_bytes_per_token(
            self.cfg.num_hidden_layers, self.cfg.num_key_value_heads, self.head_dim)

    def chat_ids(self, text: str) -> list[int]:
        tok = self.tok
        if getattr(tok, "chat_template", None):
            ids = tok.apply_chat_template([{"role": "user", "content": text}],
                                          add_generation_prompt=True, tokenize=True)
            ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
            return list(ids)
        bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
        return bos + tok(f"A: {text}\nB:", add_special_tokens=False).input_ids


def heldout(model: str | None = None, checkpoint: str | None = None,
            policies=("bf16", "int4-bdr:h=64", "int4-bdr:h=64,kv,center,whiten"),
            seeds: int = 4, eval_sources=corpus.EVAL_SOURCES,
            calib_sources=corpus.CALIB_SOURCES, tokens: int = 1024, calib_tokens: int = 1024,
            window: int | None = None, shrink: float = 0.0, overfit: bool = True,
            prompts: int = 0,
            gen_tokens: int = 32, threads: int = 1, log=print, scorer=None,
            prefill_kv: str = "cache",
            memo: dict | None = None, first_seed: int = 1) -> dict:
    """Run the held-out protocol (module doc); returns a JSON-able dict (`format_heldout`).

    scorer, memo: a `_Scorer` and a dict shared between calls (studies): scores that do not
    depend on the calibration are computed once."""
    t0 = time.time()
    torch.set_num_threads(threads)
    overlaps = corpus.check_disjoint(calib_sources, eval_sources)
    pols = [KVPolicy.parse(p) if isinstance(p, str) else p for p in policies]
    if not any(p.kind == "bf16" and not p.mixed for p in pols):
        pols.insert(0, KVPolicy("bf16"))
    sc = scorer or _Scorer(model, checkpoint, calib_sources, calib_tokens, window, shrink, log,
                           prefill_kv)
    if scorer is not None:
        sc.configure(calib_sources, calib_tokens, shrink)
    window = sc.window if window is None else window
    sw = getattr(sc.cfg, "sliding_window", None)
    bos = sc.tok.bos_token_id
    if sw and window + (bos is not None) > sw:
        raise ValueError(f"{sc.label}: BOS + {window}-token windows exceed its {sw}-token "
                         f"sliding window; use --window {sw - (bos is not None)}")
    ws, info = corpus.windows(sc.tok, eval_sources, tokens, window)
    cws, cinfo = corpus.windows(sc.tok, calib_sources, min(window, calib_tokens), window) \
        if overfit else ([], [t.describe() for t in map(corpus.get_text, calib_sources)])
    log(f"model {sc.label}, path {sc.path}, torch threads {torch.get_num_threads()}")
    for s in info:
        log(f"eval  {s['source']:<12} {s['genre']:<14} {s['origin']} sha256 "
            f"{s['sha256'][:16]}…{'' if s['pinned'] else ' (unpinned)'} "
            f"tokens [0, {s['tokens']}) of {s['source_tokens']}")
    for t in map(corpus.get_text, calib_sources):
        log(f"calib {t.name:<12} {t.genre:<14} {t.origin} sha256 {t.sha256[:16]}…"
            f"{'' if t.pinned else ' (unpinned)'}: first {calib_tokens} tokens"
            f"{' (whiten shrinkage %g)' % shrink if shrink else ''}")

    memo = {} if memo is None else memo
    ekey = (tuple(t.sha256 for t in map(corpus.get_text, eval_sources)), tokens, window)
    ckey = (tuple(t.sha256 for t in map(corpus.get_text, calib_sources)), calib_tokens)

    def run(pol, windows):
        key = (str(pol), ekey if windows is ws else ckey + (window,),
               ckey + (shrink,) if pol.transforms_k else None)
        if key not in memo:
            t = time.time()
            memo[key] = (sc.score(pol, windows), time.time() - t)
        return memo[key]

    def delta(pol, windows, ref_acc):
        return pct(math.exp(pooled(run(pol, windows)[0])[0]), math.exp(pooled(ref_acc)[0]))

    ref, _ = run(KVPolicy("bf16"), ws)
    ref_nll, ntok = pooled(ref)
    ref_calib = run(KVPolicy("bf16"), cws)[0] if cws else None
    log(f"bf16: held-out ppl {math.exp(ref_nll):.4f} over {ntok} tokens")
    rows = []
    for pol in pols:
        if pol.kind == "bf16" and not pol.mixed:
            continue
        reals = []
        for p in expand_seeds(pol, seeds, first_seed):
            acc, dt = run(p, ws)
            nll, _ = pooled(acc)
            r = {"policy": str(p), "seed": p.sign_seed, "ppl": math.exp(nll),
                 "delta_pct": pct(math.exp(nll), math.exp(ref_nll)),
                 "per_source": {s: pct(math.exp(a[0] / a[1]), math.exp(ref[s][0] / ref[s][1]))
                                for s, a in acc.items()}, "seconds": round(dt, 1)}
            if cws and p.transforms_k:
                plain = untransformed(p)
                r["calib_delta_pct"] = delta(p, cws, ref_calib)
                r["gain_calib"] = delta(plain, cws, ref_calib) - r["calib_delta_pct"]
                r["gain_heldout"] = delta(plain, ws, ref) - r["delta_pct"]
            reals.append(r)
            log(f"  {str(p):<44} held-out {r['delta_pct']:+7.2f} %  "
                + "  ".join(f"{s} {v:+.2f}" for s, v in r["per_source"].items())
                + (f"  calib-text {r['calib_delta_pct']:+.2f} %, transform gain calib "
                   f"{r['gain_calib']:+.2f} held-out {r['gain_heldout']:+.2f} points"
                   if "calib_delta_pct" in r else "") + f"  ({r['seconds']} s)")
        row = {"policy": str(pol), "bytes_per_token": sc.bytes_per_token(pol),
               "realisations": reals, "delta": spread(r["delta_pct"] for r in reals),
               "per_source": {s: spread(r["per_source"][s] for r in reals)
                              for s in reals[0]["per_source"]}}
        if "calib_delta_pct" in reals[0]:
            row["calib_delta"] = spread(r["calib_delta_pct"] for r in reals)
            row["gain_calib"] = spread(r["gain_calib"] for r in reals)
            row["gain_heldout"] = spread(r["gain_heldout"] for r in reals)
            row["overfit"] = overfit_flag(row["gain_heldout"]["mean"], row["gain_calib"]["mean"])
        rows.append(row)

    gen = []
    if prompts > 0:
        texts = corpus.chat_prompts(prompts)
        ids = [sc.chat_ids(t) for t in texts]
        eos = {sc.tok.eos_token_id} | set(getattr(sc.hf.generation_config, "eos_token_id", None)
                                          and _as_list(sc.hf.generation_config.eos_token_id) or [])
        gen_pols = [KVPolicy("bf16")] + [expand_seeds(p, seeds, first_seed)[0] for p in pols
                                         if not (p.kind == "bf16" and not p.mixed)]
        outs = {}
        for p in gen_pols:
            t = time.time()
            outs[str(p)] = [_cut(sc.generate(p, x, gen_tokens), eos) for x in ids]
            log(f"  generated {len(ids)} x {gen_tokens} tokens under {p} "
                f"({time.time() - t:.0f} s)")
        refs = outs["bf16"]
        for p in gen_pols[1:]:
            per = [agreement(r, o) for r, o in zip(refs, outs[str(p)])]
            first = [a["first_divergence"] if a["first_divergence"] is not None else len(r)
                     for a, r in zip(per, refs)]
            match = math.fsum(a["identical_pct"] * a["tokens"] for a in per) / \
                max(1, sum(a["tokens"] for a in per))
            gen.append({"policy": str(p), "prompts": len(ids), "tokens": gen_tokens,
                        "identical_prompts": sum(a["first_divergence"] is None for a in per),
                        "first_divergence_median": statistics.median(first),
                        "first_divergence_mean": statistics.fmean(first),
                        "token_match_pct": match})
    return {"protocol": "held-out", "model": sc.label, "path": sc.path,
            "date": datetime.date.today().isoformat(), "threads": torch.get_num_threads(),
            "seeds": seeds, "first_seed": first_seed, "tokens": tokens, "calib_tokens": calib_tokens, "window": window,
            "shrink": shrink, "eval_text": info, "calib_text": cinfo, "overlap": overlaps,
            "bf16_ppl": math.exp(ref_nll), "scored_tokens": ntok, "results": rows,
            "generation": gen, "prompts": corpus.chat_prompts(prompts) if prompts else [],
            "env": {"python": platform.python_version(), "torch": torch.__version__},
            "seconds": round(time.time() - t0, 1)}


def _as_list(x):
    return list(x) if isinstance(x, (list, tuple, set)) else [x]


def _cut(tokens: list[int], eos: set) -> list[int]:
    """The continuation up to and including its first end-of-turn token."""
    for i, t in enumerate(tokens):
        if t in eos:
            return tokens[:i + 1]
    return tokens


def row_cells(row: dict, srcs: list[str]) -> dict:
    """One policy row of a held-out result as formatted cells, for the text and Markdown
    tables: delta (mean ± sd), per-source means, and the overfit check's numbers (None
    where the row was not checked)."""
    d, cd = row["delta"], row.get("calib_delta")
    return {"delta": f"{d['mean']:+.2f} ± {d['sd']:.2f} %",
            "sources": [f"{row['per_source'][s]['mean']:+.2f} %" for s in srcs],
            "calib": f"{cd['mean']:+.2f} %" if cd else None,
            "gain": (f"{row['gain_calib']['mean']:+.2f}", f"{row['gain_heldout']['mean']:+.2f}")
            if cd else None,
            "overfit": bool(row.get("overfit"))}


def generation_summary(g: dict) -> str:
    """Greedy agreement of one policy with bf16, in one phrase."""
    return (f"token match {g['token_match_pct']:.1f} %, identical {g['identical_prompts']}/"
            f"{g['prompts']}, first divergence median {g['first_divergence_median']:g} "
            f"(mean {g['first_divergence_mean']:.1f})")


def format_heldout(res: dict) -> str:
    srcs = [s["source"] for s in res["eval_text"]]
    lines = [f"model {res['model']} ({res['path']} path), held-out text: "
             + ", ".join(f"{s['source']} ({s['genre']})" for s in res["eval_text"])
             + f"; calibration: {', '.join(s['source'] for s in res['calib_text'])}",
             f"{res['scored_tokens']} scored tokens, bf16 ppl {res['bf16_ppl']:.4f}, "
             f"{res['seeds']} sign realisations per rotated policy, torch threads "
             f"{res['threads']}, whiten shrinkage {res['shrink']:g}"]
    w = max([34] + [len(r["policy"]) + 2 for r in res["results"]])
    lines.append(f"{'policy':<{w}}{'B/token':>8}  {'held-out vs bf16':>18}  "
                 + "".join(f"{s:>10}" for s in srcs)
                 + "  calib-text  gain calib/held-out  overfit")
    for r in res["results"]:
        c = row_cells(r, srcs)
        lines.append(f"{r['policy']:<{w}}{r['bytes_per_token']:>8}  {c['delta']:>18}  "
                     + "".join(f"{x:>10}" for x in c["sources"])
                     + (f"  {c['calib']:>10}  {c['gain'][0]:>8} / {c['gain'][1]:<8}  "
                        f"{'FLAGGED' if c['overfit'] else 'ok'}" if c["calib"] else ""))
    if res["generation"]:
        g0 = res["generation"][0]
        lines.append(f"greedy vs bf16 over {g0['prompts']} chat prompts, {g0['tokens']} new tokens "
                     f"(to the end of turn):")
        for g in res["generation"]:
            lines.append(f"  {g['policy']:<{w}} {generation_summary(g)}")
    return "\n".join(lines)
