"""Serving load generator: N users in closed loop against a Triton gRPC endpoint.

Each user (a thread) sends one streaming request at a time until the level's request count is
used up. Per level it reports what users feel and what the server delivers:

  ttft_s          time to first text (queueing + prefill)
  itl_s           inter-token latency (decode time per token, from the streamed chunks)
  latency_s       whole request
  output_tok_s_per_user   (output tokens - 1) / (end - first token), mean over requests
  output_tok_s            all output tokens / wall time of the level; per_gpu divides by --num-gpus
  lost            requests that did not finish with a finish_reason (errors, timeouts)
"""
from __future__ import annotations

import random
import statistics
import threading
import time
from dataclasses import dataclass

from .stats import dist as _dist
from ..serving.client import StreamResult, generate

_WORDS = ("the quick brown fox jumps over a lazy dog while seven bright stars watch "
          "quiet rivers carry old stories to distant hills and every small town keeps "
          "its own song of rain wind bread and iron").split()


def make_prompt(num_words: int, seed: int, tokenizer=None) -> str:
    """About `num_words` tokens of English-like text (common words are ~1 BPE token each).

    With `tokenizer` (the served engine's: encode / decode), the text is cut to `num_words`
    *tokens* of that tokenizer instead (exact for a byte tokenizer, within a token or two for
    BPE, whose merges may change at the cut)."""
    rng = random.Random(seed)
    if tokenizer is None:
        return " ".join(rng.choice(_WORDS) for _ in range(max(1, num_words)))
    n = max(1, num_words)
    words: list[str] = []
    ids: list[int] = []
    while len(ids) < n:
        words += [rng.choice(_WORDS) for _ in range(max(16, n - len(ids)))]
        ids = tokenizer.encode(" ".join(words))
    text = tokenizer.decode(ids[:n])
    for _ in range(4):                  # re-encoding the cut text may merge differently
        extra = len(tokenizer.encode(text)) - n
        if extra <= 0:
            break
        text = tokenizer.decode(tokenizer.encode(text)[:n - extra])
    return text


@dataclass
class LevelConfig:
    concurrency: int
    num_requests: int
    prompt_len: int = 128
    output_len: int = 64
    ignore_eos: bool = True
    timeout_s: float = 600.0
    seed: int = 0
    tokenizer: object = None     # prompt_len in this tokenizer's tokens (else words)


def run_level(url: str, cfg: LevelConfig, *, model: str = "sawtrt", num_gpus: int = 1,
              progress=None) -> dict:
    """Run one concurrency level; return its summary (see module docstring)."""
    results: list[StreamResult | None] = [None] * cfg.num_requests
    counter = iter(range(cfg.num_requests))
    lock = threading.Lock()

    def user():
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            try:
                r = generate(url, make_prompt(cfg.prompt_len, cfg.seed + i, cfg.tokenizer),
                             cfg.output_len,
                             model=model, timeout=cfg.timeout_s, ignore_eos=cfg.ignore_eos,
                             stream=True)
            except Exception as e:          # noqa: BLE001 - count it, keep the level going
                r = StreamResult(error=f"client exception: {type(e).__name__}: {e}")
            results[i] = r
            if progress is not None:
                progress(1)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=user, daemon=True) for _ in range(cfg.concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return summarize(results, cfg, wall, num_gpus)


def summarize(results, cfg: LevelConfig, wall_s: float, num_gpus: int = 1) -> dict:
    ok = [r for r in results if r is not None and r.ok]
    errors = [r.error or "no final response" for r in results if r is None or not r.ok]
    out_tokens = sum(r.num_output_tokens for r in ok)
    itl = [x for r in ok for x in r.inter_token_latencies()]
    per_user = [(r.num_output_tokens - 1) / (r.t_end - r.t_first) for r in ok
                if r.num_output_tokens > 1 and r.t_first is not None and r.t_end > r.t_first]
    distinct_errors = sorted(set(errors))
    return {
        "concurrency": cfg.concurrency, "num_requests": cfg.num_requests,
        "prompt_len_words": cfg.prompt_len, "output_len": cfg.output_len,
        "prompt_unit": "words" if cfg.tokenizer is None else "tokens",
        "completed": len(ok), "lost": cfg.num_requests - len(ok),
        "errors": distinct_errors[:5], "num_distinct_errors": len(distinct_errors),
        "wall_s": wall_s,
        "input_tokens_mean": statistics.fmean([r.num_input_tokens for r in ok]) if ok else None,
        "output_tokens_total": out_tokens,
        "ttft_s": _dist([r.ttft_s for r in ok if r.ttft_s is not None]),
        "itl_s": _dist(itl),
        "latency_s": _dist([r.latency_s for r in ok if r.latency_s is not None]),
        "output_tok_s_per_user": statistics.fmean(per_user) if per_user else None,
        "output_tok_s": out_tokens / wall_s if wall_s > 0 else None,
        "output_tok_s_per_gpu": out_tokens / wall_s / max(1, num_gpus) if wall_s > 0 else None,
        "requests_per_s": len(ok) / wall_s if wall_s > 0 else None,
    }


def format_table(levels: list[dict]) -> str:
    def f(x, scale=1.0, fmt="{:.1f}"):
        return "-" if x is None else fmt.format(x * scale)

    head = (f"{'conc':>5} {'done':>6} {'lost':>5} {'TTFT p50/p99 ms':>17} {'ITL p50/p99 ms':>16} "
            f"{'tok/s/user':>10} {'tok/s':>8} {'tok/s/GPU':>9} {'req/s':>7}")
    rows = [head]
    for lv in levels:
        rows.append(
            f"{lv['concurrency']:>5} {lv['completed']:>6} {lv['lost']:>5} "
            f"{f(lv['ttft_s']['p50'], 1e3) + '/' + f(lv['ttft_s']['p99'], 1e3):>17} "
            f"{f(lv['itl_s']['p50'], 1e3) + '/' + f(lv['itl_s']['p99'], 1e3):>16} "
            f"{f(lv['output_tok_s_per_user']):>10} {f(lv['output_tok_s']):>8} "
            f"{f(lv['output_tok_s_per_gpu']):>9} {f(lv['requests_per_s'], fmt='{:.2f}'):>7}")
        for e in lv["errors"]:
            rows.append(f"      error: {e}")
    return "\n".join(rows)
