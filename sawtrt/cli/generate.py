import sys
import time

import click

# long enough for a chat answer to end on its own (the engine stops at EOS first)
DEFAULT_MAX_TOKENS = 256


def _device(device: str | None):
    """The torch device for --device, or a one-line error (no GPU, a bad name)."""
    import torch
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise click.BadParameter(f"{device!r} is not a device (cpu, cuda, cuda:1 ...)",
                                 param_hint="--device") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise click.BadParameter(f"{device}: there is no CUDA GPU on this machine "
                                     "(use --device cpu)", param_hint="--device")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise click.BadParameter(f"{device}: this machine has {torch.cuda.device_count()} "
                                     "CUDA GPU(s)", param_hint="--device")
    elif dev.type != "cpu":
        raise click.BadParameter(f"{device!r}: sawtrt runs on cpu or cuda",
                                 param_hint="--device")
    return dev


@click.command("generate")
@click.option("--engine", "engine_dir", required=True, type=click.Path(exists=True,
              file_okay=False), help="Engine directory made by `sawtrt build`.")
@click.argument("prompts", nargs=-1, required=True)
@click.option("--max-tokens", default=DEFAULT_MAX_TOKENS, show_default=True,
              type=click.IntRange(min=0), help="Most new tokens per prompt (EOS stops earlier).")
@click.option("--temperature", default=0.0, show_default=True, type=float)
@click.option("--top-k", default=0, show_default=True, type=int)
@click.option("--top-p", default=1.0, show_default=True, type=float)
@click.option("--seed", default=None, type=int)
@click.option("--stop", multiple=True, help="Stop string (repeatable).")
@click.option("--ignore-eos", is_flag=True)
@click.option("--chat/--raw", default=False, show_default=True,
              help="Wrap each prompt in the model's chat template.")
@click.option("--stream/--no-stream", default=None,
              help="Print text as it is generated [default: on for one prompt].")
@click.option("--device", default=None, help="cpu, cuda, cuda:1 ... [default: cuda if present]")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="torch CPU threads on --device cpu [default: $OMP_NUM_THREADS, else 1].")
def generate(engine_dir, prompts, max_tokens, temperature, top_k, top_p, seed, stop, ignore_eos,
             chat, stream, device, threads):
    """Generate text from PROMPTS with an engine directory."""
    from ..engine.config import EngineConfig, EngineConfigError
    from ..engine.sampling import SamplingParams
    params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_k=top_k,
                            top_p=top_p, seed=seed, stop=tuple(stop), ignore_eos=ignore_eos)
    try:
        params.validate()
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    if stream is None:
        stream = len(prompts) == 1
    if stream and len(prompts) != 1:
        raise click.UsageError("--stream takes exactly one prompt")
    try:
        EngineConfig.load(engine_dir)           # a wrong directory fails before torch loads
    except EngineConfigError as e:
        raise click.BadParameter(str(e), param_hint="--engine") from None
    dev = _device(device)
    if dev.type == "cpu":
        _cpu_threads(threads)
    from ..engine.llm import LLM
    try:
        llm = LLM(engine_dir, device=dev)
    except EngineConfigError as e:
        raise click.ClickException(f"{engine_dir}: {e}") from None
    if chat:
        prompts = [llm.tokenizer.apply_chat_template(p) for p in prompts]
    t0 = time.perf_counter()
    try:
        if stream:
            n = 0
            reason = None
            for out in llm.stream_outputs(prompts[0], params):
                click.echo(out.new_text, nl=False)
                sys.stdout.flush()
                n += len(out.new_token_ids)
                reason = out.finish_reason if out.finished else reason
            click.echo()
            sys.stdout.flush()                  # the answer ends before the stderr line
            _stats(n, time.perf_counter() - t0, [reason], llm)
            return
        outs = llm.generate(list(prompts), params)
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    dt = time.perf_counter() - t0
    for p, o in zip(prompts, outs):
        if len(outs) > 1:
            click.echo(f"--- {p!r}")
        click.echo(o.text)
    _stats(sum(len(o.token_ids) for o in outs), dt, [o.finish_reason for o in outs], llm)


def _cpu_threads(threads: int | None) -> None:
    """One thread unless asked: a CPU decode step of a small model is hundreds of tiny torch
    calls, and handing each to a thread pool costs more than the second core gives (SmolLM2-135M
    on a busy 2-core machine: 8.2 tok/s on one thread, 1.2 tok/s on two, same minutes)."""
    import os

    import torch
    if threads is None and os.environ.get("OMP_NUM_THREADS"):
        return                                  # torch already follows it
    torch.set_num_threads(threads or 1)


def _stats(n: int, dt: float, reasons, llm) -> None:
    click.echo(f"[{n} tokens in {dt:.2f} s, {n / dt if dt > 0 else 0.0:.1f} tok/s; finish: "
               f"{', '.join(str(r) for r in reasons)}; {llm.engine.runner.graph_note}]", err=True)
