import json

import click

from ..kv_plan import DEFAULT_POLICIES, parse_bytes, plan
from ..models.specs import MODELS, get_spec
from ..spec import DEFAULT_PAGE_SIZE, PAGE_SIZES, PolicyError, split_policy_list


@click.command("kv-plan")
@click.option("--model", "model", required=True, type=click.Choice(sorted(MODELS)),
              help="Model whose layer/head/dim counts size the cache.")
@click.option("--memory", default="80GiB", show_default=True, help="KV-cache memory budget.")
@click.option("--seq-len", default=8192, show_default=True, type=click.IntRange(min=1),
              help="Sequence length for the 'concurrent sequences' column.")
@click.option("--policies", default=",".join(DEFAULT_POLICIES), show_default=True,
              help="Comma-separated KV policies, e.g. bf16,int4,int4-bdr:h=64,kv,seed=1.")
@click.option("--page-size", default=DEFAULT_PAGE_SIZE, show_default=True,
              type=click.Choice([str(p) for p in PAGE_SIZES]))
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def kv_plan(model, memory, seq_len, policies, page_size, as_json):
    """Bytes per token, tokens and concurrent sequences that fit, per KV policy."""
    spec = get_spec(model)
    try:
        budget = parse_bytes(memory)
        rows = plan(spec, budget, seq_len, split_policy_list(policies), int(page_size))
    except (ValueError, PolicyError) as e:
        raise click.BadParameter(str(e)) from None
    if as_json:
        click.echo(json.dumps({"model": spec.name, "memory_bytes": budget, "seq_len": seq_len,
                               "page_size": int(page_size), "policies": rows}, indent=2))
        return
    click.echo(f"{spec.name}: {spec.num_layers} layers x {spec.num_kv_heads} KV heads x "
               f"D={spec.head_dim}; budget {budget / 2**30:.1f} GiB; seq_len {seq_len}")
    w = max([22] + [len(r["policy"]) + 2 for r in rows])
    click.echo(f"{'policy':<{w}}{'B/token':>10}{'B/tok/head':>12}{'tokens':>14}{'seqs':>8}{'vs bf16':>9}")
    for r in rows:
        click.echo(f"{r['policy']:<{w}}{r['bytes_per_token']:>10}{r['bytes_per_token_per_kv_head']:>12}"
                   f"{r['tokens']:>14,}{r['sequences']:>8}{r['tokens_vs_bf16']:>8.2f}x")
