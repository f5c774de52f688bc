import json
import sys

import click


@click.command("client")
@click.argument("prompt")
@click.option("--url", default="127.0.0.1:8001", show_default=True, help="Triton gRPC HOST:PORT.")
@click.option("--model", default="sawtrt", show_default=True, help="Model name in the repository.")
@click.option("--max-tokens", default=64, show_default=True, type=int)
@click.option("--temperature", type=float, default=None, help="0 = greedy (the server's default).")
@click.option("--top-k", type=int, default=None)
@click.option("--top-p", type=float, default=None)
@click.option("--seed", type=int, default=None)
@click.option("--stop", multiple=True, help="Stop string (repeatable).")
@click.option("--no-stream", is_flag=True, help="One response with the whole text.")
@click.option("--timeout", default=300.0, show_default=True, type=float, help="Seconds.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON record instead of the text.")
def client(prompt, url, model, max_tokens, temperature, top_k, top_p, seed, stop, no_stream,
           timeout, as_json):
    """Send PROMPT to a sawtrt Triton server over gRPC and stream the reply to stdout."""
    from ..serving.client import generate

    def on_delta(text):
        if not as_json:
            sys.stdout.write(text)
            sys.stdout.flush()

    try:
        r = generate(url, prompt, max_tokens, model=model, timeout=timeout, on_delta=on_delta,
                     temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, stop=stop,
                     stream=not no_stream)
    except ValueError as e:         # a value the model's inputs cannot hold
        raise click.BadParameter(str(e)) from None
    if as_json:
        click.echo(json.dumps({"text": r.text, "finish_reason": r.finish_reason,
                               "num_input_tokens": r.num_input_tokens,
                               "num_output_tokens": r.num_output_tokens, "error": r.error,
                               "ttft_s": r.ttft_s, "latency_s": r.latency_s}))
    elif r.error is None:
        click.echo()
        click.echo(f"[{r.num_output_tokens} tokens, finish_reason={r.finish_reason}, "
                   f"ttft {r.ttft_s or 0:.3f} s, total {r.latency_s or 0:.3f} s]", err=True)
    if r.error is not None:
        raise click.ClickException(r.error)
