"""`sawtrt eval`: perplexity, greedy agreement and K outlier statistics under KV policies."""
from __future__ import annotations

import json

import click


@click.command("eval")
@click.option("--model", "models", multiple=True,
              help="packaged model: smollm2-135m (served path) or gemma3-270m; repeatable")
@click.option("--checkpoint", type=click.Path(exists=True, file_okay=False),
              help="a transformers checkpoint directory instead of --model")
@click.option("--protocol", type=click.Choice(["heldout", "same-source"]), default="heldout",
              show_default=True,
              help="heldout: calibrate on the calibration texts, score on disjoint eval texts "
                   "(three genres each), sign realisations with mean ± sd (docs/accuracy.md); "
                   "same-source: the older single-realisation table on gpl3 + pyref")
@click.option("--policies", default=None,
              help="default (heldout): " + "bf16,int8,int4-bdr,int4-bdr:kv,center,whiten; "
                   "(same-source): fp32,bf16,int8,int4,int4-bdr:h=16,int4-bdr:h=32,int4-bdr:h=64. "
                   "comma-separated: fp32, bf16, int8, int4, int4-bdr[:h=H,kv,seed=S,center,"
                   "balance=A|whiten] (served; K transforms calibrated like `sawtrt build`) and "
                   "prototype variants @center, @lut, @clip, @vcenter, @konly, @vonly, "
                   "@k8=L+L, @bal=A, @balmax=A, @balrot=A, @whiten, @vbal=A (fake path)")
@click.option("--tokens", default=None, type=int,
              help="tokens per eval source [heldout: 1024, same-source: 2048]")
@click.option("--window", default=None, type=int,
              help="tokens per window [512; the sliding window - 1 for models with a shorter one]")
@click.option("--seeds", default=4, show_default=True,
              help="heldout: sign realisations (seeds 1..N) of every rotated policy")
@click.option("--eval-text", "eval_texts", multiple=True, type=click.Path(dir_okay=False),
              help="heldout: score on this UTF-8 file (or packaged source: pyref, gpl3, chat, "
                   "calib, apache2, chat-calib) instead of the packaged eval texts (repeatable)")
@click.option("--calib-text", "calib_texts", multiple=True, type=click.Path(dir_okay=False),
              help="heldout: calibrate on this UTF-8 file (or packaged source) instead of the "
                   "packaged calibration texts (repeatable)")
@click.option("--calib-tokens", default=1024, show_default=True,
              help="heldout: calibration tokens taken from each calibration text")
@click.option("--shrink", default=0.0, show_default=True,
              help="heldout: shrinkage of the whitening's moment matrices toward the identity")
@click.option("--overfit-check/--no-overfit-check", default=True, show_default=True,
              help="heldout: also score calibrated policies (and their pages without the K "
                   "transform) on the calibration text, and flag a transform whose held-out gain "
                   "falls far below its calibration-text gain")
@click.option("--prompts", default=0, show_default=True,
              help="heldout: greedy agreement with bf16 over this many chat prompts (0: skip)")
@click.option("--gen-tokens", default=32, show_default=True,
              help="heldout: new tokens per chat prompt")
@click.option("--offset", default=0, show_default=True, help="skip this many tokens per source")
@click.option("--greedy", "greedy_tokens", default=64, show_default=True,
              help="greedy continuation length compared with bf16 (0: skip)")
@click.option("--cross-check", is_flag=True, help="also run served policies by fake quantization")
@click.option("--hf-paged", is_flag=True,
              help="also run served policies through the transformers model + paged cache")
@click.option("--no-outliers", is_flag=True, help="skip the K outlier statistics")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="write results here")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), help="write a PNG here")
@click.option("--threads", type=int, default=None,
              help="torch CPU threads [heldout: 1, fixed and printed: results depend on it]")
@click.option("--prefill-kv", type=click.Choice(["cache", "fresh"]), default="cache",
              show_default=True,
              help="runtime path: prompt tokens read the quantized cache (cache) or their own "
                   "K/V, windows in 128-token chunks (fresh, the serving engine's semantics)")
@click.option("--probe", is_flag=True,
              help="instead of perplexity: per-layer attention-output error of each policy from "
                   "exact inputs (no cascade; a low-noise screen for variants)")
def eval_cmd(models, checkpoint, protocol, policies, tokens, window, seeds, eval_texts,
             calib_texts, calib_tokens, shrink, overfit_check, prompts, gen_tokens, offset,
             greedy_tokens,
             cross_check, hf_paged, no_outliers, json_path, plot_path, threads, probe, prefill_kv):
    """Teacher-forced perplexity on real text with the KV cache in each policy.

    Held-out protocol (default): K transforms are calibrated on technical, legal and
    conversational text (pydoc_data chapters, the Apache-2.0 licence, chatterbot-corpus
    tech-support/trivia dialogues) and scored on other documents of the same genres (Python's
    language reference, the GPL-3, chatterbot-corpus small talk), all pinned by sha256 and
    checked disjoint; each rotated policy over --seeds sign realisations (mean ± sd, per source).
    Each row says which path produced it (runtime: the served model; hf-paged: transformers +
    the paged cache).
    """
    import torch

    from ..eval.api import evaluate, format_table, save_json
    from ..eval.kvquant import split_schemes
    if threads:
        torch.set_num_threads(threads)
    if not models and not checkpoint:
        raise click.UsageError("give --model NAME or --checkpoint PATH")
    if protocol == "heldout" and not probe:
        return _heldout(models, checkpoint, policies, tokens, window, seeds, eval_texts,
                        calib_texts, calib_tokens, shrink, prompts, gen_tokens, json_path,
                        plot_path, threads or 1, overfit_check, prefill_kv)
    tokens, window = tokens or 2048, window or 512
    schemes = split_schemes(policies or
                            "fp32,bf16,int8,int4,int4-bdr:h=16,int4-bdr:h=32,int4-bdr:h=64")
    if probe:
        from ..eval.api import probe as run_probe
        out = {m or checkpoint: run_probe(m, checkpoint if m is None else None, schemes, tokens,
                                          window, offset, log=click.echo)
               for m in (models or [None])}
        if json_path:
            with open(json_path, "w") as f:
                json.dump(out, f, indent=1)
        return
    results = []
    for m in (models or [None]):
        res = evaluate(m, checkpoint if m is None else None, schemes, tokens, window,
                       offset=offset, greedy_tokens=greedy_tokens, outliers=not no_outliers,
                       cross_check=cross_check, hf_paged=hf_paged, prefill_kv=prefill_kv,
                       log=lambda s: click.echo(s, err=True))
        click.echo(format_table(res))
        results.append(res)
    if json_path:
        save_json(results[0] if len(results) == 1 else {"models": results}, json_path)
        click.echo(f"wrote {json_path}", err=True)
    if plot_path:
        from ..eval.plot import plot
        plot(results, plot_path)
        click.echo(f"wrote {plot_path}", err=True)


HELDOUT_POLICIES = "bf16,int8,int4-bdr,int4-bdr:kv,center,whiten"


def _text(arg: str):
    """A packaged source name (sawtrt.data.corpus) or a UTF-8 file."""
    from ..data import corpus
    return corpus.get_text(arg) if arg in corpus.SOURCE_NAMES else corpus.file_text(arg)


def _heldout(models, checkpoint, policies, tokens, window, seeds, eval_texts, calib_texts,
             calib_tokens, shrink, prompts, gen_tokens, json_path, plot_path, threads,
             overfit_check=True, prefill_kv="cache"):
    from ..data import corpus
    from ..eval.heldout import format_heldout, heldout
    from ..eval.kvquant import split_schemes
    from ..spec import KVPolicy, PolicyError
    try:
        pols = [KVPolicy.parse(p) for p in split_schemes(policies or HELDOUT_POLICIES)]
    except PolicyError as e:
        raise click.BadParameter(f"{e} (the held-out protocol takes served policies; "
                                 "prototype @variants: --protocol same-source)",
                                 param_hint="--policies") from None
    try:
        ev = [_text(p) for p in eval_texts] or list(corpus.EVAL_SOURCES)
        ca = [_text(p) for p in calib_texts] or list(corpus.CALIB_SOURCES)
    except corpus.CorpusError as e:
        raise click.UsageError(str(e)) from None
    if seeds < 1:
        raise click.BadParameter("give at least 1", param_hint="--seeds")
    results = []
    for m in (models or [None]):
        try:
            res = heldout(m, checkpoint if m is None else None, pols, seeds, ev, ca,
                          tokens or 1024, calib_tokens, window, shrink, overfit=overfit_check,
                          prompts=prompts,
                          gen_tokens=gen_tokens, threads=threads, prefill_kv=prefill_kv,
                          log=lambda s: click.echo(s, err=True))
        except (corpus.CorpusError, ValueError) as e:
            raise click.ClickException(str(e)) from None
        click.echo(format_heldout(res))
        results.append(res)
    if json_path:
        with open(json_path, "w") as f:
            json.dump(results[0] if len(results) == 1 else {"models": results}, f, indent=1)
        click.echo(f"wrote {json_path}", err=True)
    if plot_path:
        from ..eval.plot import pareto
        pareto(results, plot_path)
        click.echo(f"wrote {plot_path}", err=True)
