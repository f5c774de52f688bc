import sys
import time

import click


@click.command("generate")
@click.option("--engine", "engine_dir", required=True, type=click.Path(exists=True,
              file_okay=False), help="Engine directory made by `sawtrt build`.")
@click.argument("prompts", nargs=-1, required=True)
@click.option("--max-tokens", default=64, show_default=True, type=int)
@click.option("--temperature", default=0.0, show_default=True, type=float)
@click.option("--top-k", default=0, show_default=True, type=int)
@click.option("--top-p", default=1.0, show_default=True, type=float)
@click.option("--seed", default=None, type=int)
@click.option("--stop", multiple=True, help="Stop string (repeatable).")
@click.option("--ignore-eos", is_flag=True)
@click.option("--chat/--raw", default=False, show_default=True,
              help="Wrap each prompt in the model's chat template.")
@click.option("--stream", is_flag=True, help="Print text as it is generated (one prompt).")
@click.option("--device", default=None, help="cpu, cuda, cuda:1 ... [default: cuda if present]")
def generate(engine_dir, prompts, max_tokens, temperature, top_k, top_p, seed, stop, ignore_eos,
             chat, stream, device):
    """Generate text from PROMPTS with an engine directory."""
    from ..engine.llm import LLM
    from ..engine.sampling import SamplingParams
    params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_k=top_k,
                            top_p=top_p, seed=seed, stop=tuple(stop), ignore_eos=ignore_eos)
    try:
        params.validate()
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    if stream and len(prompts) != 1:
        raise click.UsageError("--stream takes exactly one prompt")
    llm = LLM(engine_dir, device=device)
    if chat:
        prompts = [llm.tokenizer.apply_chat_template(p) for p in prompts]
    t0 = time.perf_counter()
    try:
        if stream:
            for delta in llm.stream(prompts[0], params):
                click.echo(delta, nl=False)
                sys.stdout.flush()
            click.echo()
            return
        outs = llm.generate(list(prompts), params)
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    dt = time.perf_counter() - t0
    for p, o in zip(prompts, outs):
        if len(outs) > 1:
            click.echo(f"--- {p!r}")
        click.echo(o.text)
    n = sum(len(o.token_ids) for o in outs)
    click.echo(f"[{n} tokens in {dt:.2f} s, {n / dt:.1f} tok/s; finish: "
               f"{', '.join(str(o.finish_reason) for o in outs)}; "
               f"{llm.engine.runner.graph_note}]", err=True)
