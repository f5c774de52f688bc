"""`sawtrt eval`: perplexity, greedy agreement and K outlier statistics under KV policies."""
from __future__ import annotations

import json

import click


@click.command("eval")
@click.option("--model", "models", multiple=True,
              help="packaged model: smollm2-135m (served path) or gemma3-270m; repeatable")
@click.option("--checkpoint", type=click.Path(exists=True, file_okay=False),
              help="a transformers checkpoint directory instead of --model")
@click.option("--policies", default="fp32,bf16,int8,int4,int4-bdr:h=16,int4-bdr:h=32,int4-bdr:h=64",
              show_default=True,
              help="comma-separated: fp32, bf16, int8, int4, int4-bdr[:h=H,kv,seed=S,center,"
                   "balance=A|whiten] (served; K transforms calibrated like `sawtrt build`) and "
                   "prototype variants @center, @lut, @clip, @vcenter, @konly, @vonly, "
                   "@k8=L+L, @bal=A, @balmax=A, @balrot=A, @whiten, @vbal=A (fake path)")
@click.option("--tokens", default=2048, show_default=True, help="tokens per text source")
@click.option("--window", default=512, show_default=True, help="tokens per window")
@click.option("--offset", default=0, show_default=True, help="skip this many tokens per source")
@click.option("--greedy", "greedy_tokens", default=64, show_default=True,
              help="greedy continuation length compared with bf16 (0: skip)")
@click.option("--cross-check", is_flag=True, help="also run served policies by fake quantization")
@click.option("--hf-paged", is_flag=True,
              help="also run served policies through the transformers model + paged cache")
@click.option("--no-outliers", is_flag=True, help="skip the K outlier statistics")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="write results here")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), help="write a PNG here")
@click.option("--threads", type=int, default=None, help="torch CPU threads")
@click.option("--prefill-kv", type=click.Choice(["cache", "fresh"]), default="cache",
              show_default=True,
              help="runtime path: prompt tokens read the quantized cache (cache) or their own "
                   "K/V, windows in 128-token chunks (fresh, the serving engine's semantics)")
@click.option("--probe", is_flag=True,
              help="instead of perplexity: per-layer attention-output error of each policy from "
                   "exact inputs (no cascade; a low-noise screen for variants)")
def eval_cmd(models, checkpoint, policies, tokens, window, offset, greedy_tokens, cross_check,
             hf_paged, no_outliers, json_path, plot_path, threads, probe, prefill_kv):
    """Teacher-forced perplexity on real text with the KV cache in each policy.

    Text: the GPL-3 text shipped in yamllint 1.38.0's wheel and Python's language reference
    (stdlib pydoc_data), see docs/accuracy.md. Each row says which path produced it (reference, runtime, hf-paged, fake).
    """
    import torch

    from ..eval.api import evaluate, format_table, save_json
    from ..eval.kvquant import split_schemes
    if threads:
        torch.set_num_threads(threads)
    if not models and not checkpoint:
        raise click.UsageError("give --model NAME or --checkpoint PATH")
    schemes = split_schemes(policies)
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
