"""What each calibration change buys on held-out text, and the bytes-for-accuracy frontier.

    python -m sawtrt.eval.heldout_study --model smollm2-135m --out DIR

One process, one model load; every configuration runs the held-out protocol (`heldout.heldout`)
with the same eval text, windows and sign seeds, sharing the scores that do not depend on the
calibration (bf16, the plain policies):

    1. calib-only      the K calibration `sawtrt build` used so far: 1024 tokens of pydoc 'calib'
    2. diverse         1024 tokens of each of the three calibration genres
    3. diverse+shrink  the same, whitening moments shrunk toward the identity (each --shrinks)
    4. frontier        per-layer int8 pages for the top n layers (n in --layers), ranked on the
                       calibration sample only (runtime models: `calibration.layer_rank` KL;
                       others: the per-layer attention-output error of the probe), each verified
                       on held-out text; plus bf16, int8 and plain int4-bdr, for the Pareto plot
    5. generation      greedy agreement over --prompts chat prompts for the main policies

Writes DIR/<model>.json (every configuration's result) and DIR/<model>-pareto.png.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from ..data import corpus
from ..spec import KVPolicy


def _rank(sc, base: KVPolicy, calib_sources, calib_tokens, window, log,
          kl: bool = False) -> list[int]:
    """Layers by KV sensitivity on the calibration sample only, most sensitive first.
    kl (runtime models): `calibration.layer_rank`'s KL ranking (L(L+1)/2 layer passes per
    window); else the probe's per-layer attention-output error (one pass per window)."""
    if kl and sc.runtime is not None:
        from ..calibration import layer_rank
        from ..models import kv_transform as kvt
        tok = sc.tok
        ws, _ = kvt.calibration_sample(lambda t: tok(t, add_special_tokens=False).input_ids,
                                       tok.bos_token_id, calib_sources, min(calib_tokens, window),
                                       window)
        rows = layer_rank.rank_layers(sc.runtime.spec, sc.runtime.weights, ws, base,
                                      sc.runtime.calibration() if base.transforms_k else None)
        order = sorted(rows, key=lambda r: r["rank"])
        log("layer ranking (KL on calibration text): "
            + ", ".join(f"{r['layer']}:{r['kl']:.4f}" for r in order[:6]))
        return [r["layer"] for r in order]
    from .hooks import KVHook
    from .kvquant import KVScheme
    from .runner import window_nll
    ws, _ = corpus.windows(sc.tok, calib_sources, min(calib_tokens, window), window)
    hook = KVHook(KVScheme.parse(str(base)), mode="probe", **sc._hook_kw(base))
    for w in ws:
        with hook.attach(sc.hf):
            window_nll(sc.hf, w)
    per = {layer: a / b for layer, (a, b) in hook.errors.items()}
    order = sorted(per, key=per.get, reverse=True)
    log("layer ranking (attention-output error on calibration text): "
        + ", ".join(f"{i}:{per[i]:.4f}" for i in order[:6]))
    return order


def main(argv=None) -> None:
    import sys
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--markdown"]:
        for f in argv[1:]:
            print(markdown(json.loads(Path(f).read_text())))
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--block", type=int, default=None, help="rotation block h (default: policy's)")
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--first-seed", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--calib-tokens", type=int, default=1024)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--shrinks", default="0.05,0.2")
    ap.add_argument("--layers", default="1,2,3", help="int8 layer counts of the frontier")
    ap.add_argument("--prompts", type=int, default=50)
    ap.add_argument("--gen-tokens", type=int, default=24)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--skip", default="", help="comma-separated steps to skip (names above)")
    ap.add_argument("--overfit", default="diverse,shrink",
                    help="steps that run the overfit check (it scores the calibration text too)")
    ap.add_argument("--kl-rank", action="store_true",
                    help="rank layers by layer_rank's KL (runtime models) instead of the probe")
    a = ap.parse_args(argv)
    from .heldout import _Scorer, format_heldout, heldout
    from .plot import pareto
    torch.set_num_threads(a.threads)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    skip = set(filter(None, a.skip.split(",")))
    h = f":h={a.block}," if a.block else ":"
    plain, plainkv = f"int4-bdr{h}".rstrip(":,"), f"int4-bdr{h}kv"
    served = f"int4-bdr{h}kv,center,whiten"
    log = lambda s: print(s, flush=True)                              # noqa: E731
    sc = _Scorer(a.model, None, corpus.CALIB_SOURCES, a.calib_tokens, a.window, 0.0, log)
    memo: dict = {}
    results: dict = {}
    common = dict(seeds=a.seeds, first_seed=a.first_seed, tokens=a.tokens, window=a.window, threads=a.threads, log=log,
                  scorer=sc, memo=memo)

    def step(name, **kw):
        t = time.time()
        log(f"== {name}")
        r = heldout(a.model, **common, **kw)
        r["study_step"] = name
        results[name] = r
        log(format_heldout(r) + f"\n({time.time() - t:.0f} s)")
        (out / f"{a.model}.json").write_text(json.dumps(results, indent=1))
        return r

    if "calib-only" not in skip:
        step("calib-only", policies=[plain, served], calib_sources=("calib",),
             calib_tokens=1024, shrink=0.0, overfit="calib-only" in a.overfit)
    if "diverse" not in skip:
        step("diverse", policies=[served], calib_sources=corpus.CALIB_SOURCES,
             calib_tokens=a.calib_tokens, shrink=0.0, overfit="diverse" in a.overfit)
    best_shrink = 0.0
    for s in [float(x) for x in a.shrinks.split(",") if x] if "shrink" not in skip else []:
        step(f"diverse+shrink={s:g}", policies=[served], calib_sources=corpus.CALIB_SOURCES,
             calib_tokens=a.calib_tokens, shrink=s, overfit="shrink" in a.overfit)
    if "frontier" not in skip:
        # the shrinkage of the frontier is chosen on calibration text (overfit check's
        # calibration-text numbers), never on the held-out numbers
        cands = {k: v for k, v in results.items() if k.startswith("diverse") and
                 any("calib_delta" in r for r in v["results"])}
        if cands:
            k = min(cands, key=lambda k: next(r["calib_delta"]["mean"] for r in
                                              cands[k]["results"] if r["policy"] == served))
            best_shrink = cands[k]["shrink"]
        elif a.shrinks:
            best_shrink = float(a.shrinks.split(",")[-1])
        log(f"frontier: shrinkage {best_shrink:g} (lowest calibration-text loss, else the "
            "last --shrinks)")
        sc.configure(corpus.CALIB_SOURCES, a.calib_tokens, best_shrink)
        order = _rank(sc, KVPolicy.parse(served), corpus.CALIB_SOURCES, a.calib_tokens,
                      a.window, log, kl=a.kl_rank)
        ns = [int(x) for x in a.layers.split(",") if x]
        wide = [f"{served},int8=" + "+".join(map(str, sorted(order[:n]))) for n in ns]
        step("frontier", policies=["int8", plain, served] + wide,
             calib_sources=corpus.CALIB_SOURCES, calib_tokens=a.calib_tokens,
             shrink=best_shrink, overfit=False)
        results["frontier"]["layer_order"] = order
        pareto([results["frontier"]], out / f"{a.model}-pareto.png")
        if "generation" not in skip and a.prompts:
            # perplexities come from the memo; generation for the main policies only
            step("generation", policies=[plain, served] + wide[-1:],
                 calib_sources=corpus.CALIB_SOURCES, calib_tokens=a.calib_tokens,
                 shrink=best_shrink, prompts=a.prompts, gen_tokens=a.gen_tokens, overfit=False)
    (out / f"{a.model}.json").write_text(json.dumps(results, indent=1))




def markdown(results: dict) -> str:
    """Markdown tables of a study's JSON (`python -m sawtrt.eval.heldout_study --markdown F`)."""
    from .heldout import generation_summary, row_cells
    lines = []
    for step, r in results.items():
        srcs = [s["source"] for s in r["eval_text"]]
        lines += [f"**{r['model']} — {step}** (calibration: "
                  f"{'+'.join(s['source'] for s in r['calib_text'])}, "
                  f"{r['calib_tokens']} tokens each, whiten shrinkage {r['shrink']:g}; "
                  f"{r['scored_tokens']} held-out tokens, bf16 ppl {r['bf16_ppl']:.3f})", "",
                  "| policy | B/token | held-out vs bf16 (mean ± sd) | realisations | "
                  + " | ".join(srcs) + " | calib-text | overfit |",
                  "|---|---:|---:|---|" + "---:|" * len(srcs) + "---:|---|"]
        for row in r["results"]:
            c = row_cells(row, srcs)
            reals = ", ".join(f"{x['delta_pct']:+.2f}" for x in row["realisations"])
            lines.append(f"| `{row['policy']}` | {row['bytes_per_token']} | {c['delta']} | "
                         f"{reals} | " + " | ".join(c["sources"])
                         + (f" | {c['calib']} | {'flagged' if c['overfit'] else 'no'} (gain "
                            f"{c['gain'][0]} → {c['gain'][1]}) |" if c["calib"] else " | — | — |"))
        for g in r.get("generation") or ():
            lines.append(f"\ngreedy `{g['policy']}` vs bf16: {generation_summary(g)} "
                         f"of {g['tokens']} tokens")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
