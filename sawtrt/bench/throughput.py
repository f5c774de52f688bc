"""Engine-only serving throughput: N users in closed loop against `LLMEngine`, no server.

The Python-API twin of `sawtrt bench serve` (which measures the same through Triton + gRPC):
per concurrency level, `concurrency` users each keep one request in flight (prompt of random
token ids, `output_len` tokens, EOS ignored) until `num_requests` requests are done; one thread
drives `engine.step()` and timestamps every token when its step returns, so the latencies are
what a client co-located with the engine would see.

Per level:
  output_tok_s            all output tokens / wall time of the level (one GPU: also per GPU)
  output_tok_s_per_user   mean over requests of (output tokens - 1) / (last token - first token)
  ttft_s, itl_s, latency_s  distributions (mean, p50, p90, p99, max)
  kv                      pages in the pool, peak and mean (decode steps) pages in use, peak
                          running sequences, preemptions
  steps                   decode-only steps (CUDA-graph replays) vs mixed/prefill steps: count,
                          median wall, forward and device time (forward minus its metadata
                          build); host_overhead_ms = median (wall - device) of decode steps =
                          the Python time the GPU waits for (scheduling, metadata, sampling,
                          detokenization); gpu_idle_ms = the device's idle time before each
                          decode step (CUDA events, read after the level): the host time not
                          hidden behind the GPU, which async scheduling (on by default on CUDA)
                          shrinks, p50 and mean, and as a fraction of the decode step
With num_requests == concurrency (the CLI default) a level is one wave: every user's request
starts at t = 0, so TTFT includes queueing behind the other prompts and tok/s includes the
ramp-up and the drain; several requests per user approach the steady state.
"""
from __future__ import annotations

import gc
import statistics
import time
from dataclasses import asdict, dataclass

import torch

from ..engine.options import SCHEDULING, EngineOptions
from ..engine.sampling import SamplingParams
from . import roofline
from .stats import dist
from .step_timer import ForwardTimer

GiB = 1 << 30


@dataclass
class Level:
    concurrency: int
    num_requests: int
    prompt_len: int
    output_len: int
    seed: int = 0


def random_prompt(vocab: int, length: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (length,), generator=g).tolist()


def start_decoding(engine, batch: int, context: int, steps: int, tag: str) -> list[str]:
    """Add `batch` requests of `context` random tokens, run their (chunked) prefill, and return
    their ids once every one is decoding, with room for `steps` more decode steps. The first
    sequences decode while later ones prefill, so each may run up to max_seq_len; the caller
    aborts them when done."""
    room = engine.max_seq_len - context - 1
    if room < steps + batch + 1:
        raise ValueError(f"context {context} leaves too few tokens in max_seq_len "
                         f"{engine.max_seq_len} for {steps} decode steps of {batch} sequences")
    params = SamplingParams(max_tokens=room, ignore_eos=True)
    vocab = engine.config.model.vocab_size
    rids = [f"{tag}{batch}-{i}" for i in range(batch)]
    for i, r in enumerate(rids):
        engine.add_request(r, random_prompt(vocab, context, 7 * i + 1), params)
    seqs = [engine._seqs[r] for r in rids]
    while not all(s.num_output_tokens >= 1 for s in seqs):
        engine.step()
    return rids


def _sync(engine) -> None:
    if engine.device.type == "cuda":
        torch.cuda.synchronize(engine.device)


def run_level(engine, lv: Level, progress=None) -> dict:
    """Run one level to completion on an idle engine; return its summary (module docstring)."""
    if engine.has_unfinished():
        raise RuntimeError("run_level needs an idle engine")
    vocab = engine.config.model.vocab_size
    params = SamplingParams(max_tokens=lv.output_len, ignore_eos=True)
    sent, done = 0, 0
    t_sent: dict[str, float] = {}
    tok_times: dict[str, list[float]] = {}
    pre0 = engine.scheduler.num_preemptions
    total_pages = engine.block_manager.num_pages
    peak_pages, peak_running, decode_pages = 0, 0, []
    steps = []                                   # (wall_ms, ForwardRecord) per model step

    def send(now):
        nonlocal sent
        rid = f"c{lv.concurrency}-{sent}"
        engine.add_request(rid, random_prompt(vocab, lv.prompt_len, lv.seed * 1_000_003 + sent),
                           params)
        t_sent[rid] = now
        tok_times[rid] = []
        sent += 1

    _sync(engine)
    t0 = time.perf_counter()
    for _ in range(min(lv.concurrency, lv.num_requests)):
        send(t0)
    with ForwardTimer(engine) as timer:
        while done < lv.num_requests:
            n_rec = len(timer.records)
            ts = time.perf_counter()
            outs = engine.step()
            now = time.perf_counter()
            if len(timer.records) > n_rec:
                rec = timer.records[-1]
                steps.append(((now - ts) * 1e3, rec))
                used = engine.block_manager.num_used
                peak_pages = max(peak_pages, used)
                peak_running = max(peak_running, len(engine.scheduler.running))
                if rec.is_decode:
                    decode_pages.append(used)
            for o in outs:
                tok_times[o.request_id].extend([now] * len(o.new_token_ids))
                if o.finished:
                    done += 1
                    if progress is not None:
                        progress(1)
                    if sent < lv.num_requests:      # closed loop: this user sends the next one
                        send(now)
            if not outs and not engine.has_unfinished():
                raise RuntimeError("engine went idle with requests outstanding")
    wall = time.perf_counter() - t0
    while engine.has_unfinished():     # async scheduling: a step may still be in flight
        engine.step()

    ttft, itl, lat, per_user, n_out = [], [], [], [], 0
    for rid, times in tok_times.items():
        n_out += len(times)
        if not times:
            continue
        ttft.append(times[0] - t_sent[rid])
        lat.append(times[-1] - t_sent[rid])
        itl.extend(b - a for a, b in zip(times, times[1:]))
        if len(times) > 1 and times[-1] > times[0]:
            per_user.append((len(times) - 1) / (times[-1] - times[0]))
    dec = [(w, r) for w, r in steps if r.is_decode]
    mixed = [(w, r) for w, r in steps if not r.is_decode]
    idle = [r.idle_before_ms for _, r in dec if r.idle_before_ms is not None]

    def med(xs):
        return statistics.median(xs) if xs else None

    def mean(xs):
        return statistics.fmean(xs) if xs else None

    return {
        **asdict(lv), "wall_s": wall, "output_tokens": n_out,
        "output_tok_s": n_out / wall, "output_tok_s_per_user": statistics.fmean(per_user)
        if per_user else None,
        "ttft_s": dist(ttft), "itl_s": dist(itl), "latency_s": dist(lat),
        "kv": {"total_pages": total_pages, "page_size": engine.config.layout.page_size,
               "peak_pages_used": peak_pages,
               "mean_pages_used_decode": statistics.fmean(decode_pages) if decode_pages else None,
               "peak_running": peak_running,
               "preemptions": engine.scheduler.num_preemptions - pre0},
        "steps": {"decode": len(dec), "mixed": len(mixed),
                  "decode_wall_ms_p50": med([w for w, _ in dec]),
                  "decode_forward_ms_p50": med([r.forward_ms for _, r in dec]),
                  "decode_device_ms_p50": med([r.device_ms for _, r in dec]),
                  "decode_batch_mean": statistics.fmean([r.batch_size for _, r in dec])
                  if dec else None,
                  "host_overhead_ms_p50": med([w - r.device_ms for w, r in dec]),
                  "gpu_idle_ms_p50": med(idle), "gpu_idle_ms_mean": mean(idle),
                  "gpu_idle_fraction": sum(idle) / (sum(idle) + sum(r.device_ms for _, r in dec))
                  if idle else None,
                  "decode_time_s": sum(w for w, _ in dec) / 1e3,
                  "mixed_time_s": sum(w for w, _ in mixed) / 1e3,
                  "mixed_tokens": sum(r.num_tokens for _, r in mixed)},
    }


def default_kv_gib(engine_dir, device=None, fraction: float = 0.8) -> float:
    """`fraction` of (free device memory now - the model's bf16 weights): one budget for every
    policy of a run. On CPU: 1 GiB."""
    from ..engine.config import EngineConfig
    from ..models.weights import weight_shapes
    dev = torch.device(device) if device else torch.device(
        "cuda" if torch.cuda.is_available() else "cpu")
    if dev.type != "cuda":
        return 1.0
    spec = EngineConfig.load(engine_dir).model
    weights = 2 * sum(int(torch.Size(s).numel()) for s in weight_shapes(spec).values())
    free, _ = torch.cuda.mem_get_info(dev)
    return round(fraction * (free - weights) / GiB, 1)


def make_engine(engine_dir, policy: str, max_num_seqs: int, kv_memory_gib: float,
                max_num_batched_tokens: int, device=None, scheduling: str = "auto"):
    return EngineOptions(kv_policy=policy, kv_memory_gib=kv_memory_gib,
                         max_num_batched_tokens=max_num_batched_tokens, max_num_seqs=max_num_seqs,
                         async_scheduling=SCHEDULING[scheduling]).load(engine_dir, device)


def level_roofline(engine, row: dict, hw: roofline.Hardware,
                   max_num_batched_tokens: int) -> dict:
    """The roofline of a measured level on this engine's model, KV bytes and pool size."""
    cfg = engine.config
    return roofline.level(
        cfg.model, cfg.layout.bytes_per_token(cfg.model.num_layers), hw, row["concurrency"],
        row["num_requests"], row["prompt_len"], row["output_len"],
        kv_capacity_tokens=engine.block_manager.num_pages * cfg.layout.page_size,
        max_num_batched_tokens=max_num_batched_tokens, dtype_bytes=engine.model.dtype.itemsize,
        page_size=cfg.layout.page_size)


def run(engine_dir, policies: list[str], levels: list[Level], kv_memory_gib: float,
        max_num_batched_tokens: int = 8192, device=None, log=print, progress=None,
        checkpoint=None, tflops: float | None = None,
        scheduling: tuple[str, ...] = ("auto",)) -> dict:
    """Every level for every policy, one engine per policy (same KV memory budget for all),
    each level with its roofline (bench.roofline: copy bandwidth measured here, before the
    first engine; `tflops` the tensor-core rate, default roofline.hardware's).
    checkpoint(record) is called with the record so far after every level (partial results
    survive a run that is cut off). scheduling: "auto", "async", "sync" (several: one engine
    per policy and mode, labelled "policy mode")."""
    for m in scheduling:
        if m not in SCHEDULING:
            raise ValueError(f"scheduling must be one of {sorted(SCHEDULING)}, got {m!r}")
    runs = []
    info = {}
    dev = torch.device(device) if device else torch.device(
        "cuda" if torch.cuda.is_available() else "cpu")
    hw = roofline.hardware(dev, tflops)
    log(f"roofline: copy bandwidth {hw.copy_tbps:.2f} TB/s ({hw.copy_source}), "
        f"matmul {hw.tflops:.0f} TFLOP/s ({hw.tflops_source})")

    def record():
        return {"engine": str(engine_dir), **info, "kv_memory_gib": kv_memory_gib,
                "max_num_batched_tokens": max_num_batched_tokens,
                "hardware": roofline.to_dict(hw), "runs": runs}
    for pol, mode in [(p, m) for p in policies for m in scheduling]:
        label = pol if len(scheduling) == 1 else f"{pol} {mode}"
        t0 = time.perf_counter()
        engine = make_engine(engine_dir, pol, max(lv.concurrency for lv in levels),
                             kv_memory_gib, max(max_num_batched_tokens,
                                                max(lv.concurrency for lv in levels)), device,
                             mode)
        engine.warm_up()                # on this thread, which steps: part of getting ready
        load_s = time.perf_counter() - t0
        from ..engine.llm_engine import freeze_gc
        freeze_gc()                     # as the server does after loading its engine
        cfg = engine.config
        info = {"model": cfg.model.name, "device": str(engine.device),
                "gpu": torch.cuda.get_device_name(engine.device)
                if engine.device.type == "cuda" else None,
                "dtype": str(engine.model.dtype)}
        log(f"{label}: engine ready in {load_s:.0f} s ({engine.runner.graph_note}; "
            f"{engine.prefill_note}; "
            f"{'async' if engine.async_scheduling else 'synchronous'} scheduling; "
            f"{engine.block_manager.num_pages} pages of {cfg.layout.page_size} tokens, "
            f"{cfg.layout.bytes_per_token(cfg.model.num_layers)} B/token)")
        warm = Level(1, 1, min(levels[0].prompt_len, 512), 4, seed=99)
        run_level(engine, warm)                      # lazy inits, cuBLAS heuristics
        rows = []
        runs.append({"policy": str(cfg.layout.policy), "policy_arg": pol, "label": label,
                     "async_scheduling": engine.async_scheduling,
                     "kv_bytes_per_token": cfg.layout.bytes_per_token(cfg.model.num_layers),
                     "fused_kernels": engine.model.fused, "graphs": engine.runner.graph_note,
                     "prefill_plans": engine.prefill_note, "engine_load_s": load_s,
                     "levels": rows})
        for lv in levels:
            row = run_level(engine, lv, progress=progress(label, lv) if progress else None)
            roofline.annotate(row, level_roofline(engine, row, hw, max_num_batched_tokens))
            rows.append(row)
            log(format_row(label, row))
            if checkpoint is not None:
                checkpoint(record())
        del engine
        gc.unfreeze()      # frozen objects are never collected: the engine's cycles (and its
        gc.collect()       # KV pool) must go before the next policy's engine is sized
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return record()


HEADER = (f"{'policy':<10} {'conc':>4} {'tok/s/GPU':>9} {'tok/s/user':>10} {'TTFT p50/p99 s':>15} "
          f"{'ITL p50/p99 ms':>15} {'pages peak/total':>17} {'preempt':>7} "
          f"{'dec step ms':>11} {'host ms':>7} {'idle ms':>7} {'roof tok/s':>10} {'%roof':>5} "
          f"{'roof step ms':>12}")


def format_row(policy: str, r: dict) -> str:
    def f(x, fmt="{:.1f}", scale=1.0):
        return "-" if x is None else fmt.format(x * scale)
    s, kv, roof = r["steps"], r["kv"], r.get("roofline") or {}
    return (f"{policy:<10} {r['concurrency']:>4} {f(r['output_tok_s']):>9} "
            f"{f(r['output_tok_s_per_user']):>10} "
            f"{f(r['ttft_s']['p50'], '{:.2f}') + '/' + f(r['ttft_s']['p99'], '{:.2f}'):>15} "
            f"{f(r['itl_s']['p50'], scale=1e3) + '/' + f(r['itl_s']['p99'], scale=1e3):>15} "
            f"{str(kv['peak_pages_used']) + '/' + str(kv['total_pages']):>17} "
            f"{kv['preemptions']:>7} {f(s['decode_wall_ms_p50'], '{:.2f}'):>11} "
            f"{f(s['host_overhead_ms_p50'], '{:.2f}'):>7} "
            f"{f(s.get('gpu_idle_ms_mean'), '{:.2f}'):>7} "
            f"{f(roof.get('tok_s'), '{:.0f}'):>10} {f(r.get('roofline_fraction'), '{:.0%}'):>5} "
            f"{f(roof.get('decode_step_ms'), '{:.2f}'):>12}")


def format_table(record: dict) -> str:
    rows = [HEADER]
    for run_ in record["runs"]:
        rows += [format_row(_label(run_), r) for r in run_["levels"]]
    return "\n".join(rows)


def _label(run_: dict) -> str:
    return run_.get("label", run_["policy_arg"])


def merge(records: list[dict]) -> dict:
    """One record from several (e.g. one device call per policy): the levels of each policy
    joined, the header fields of the first record kept (all must be of one model)."""
    if not records:
        raise ValueError("nothing to merge")
    shape = {(lv["prompt_len"], lv["output_len"]) for r in records for run_ in r["runs"]
             for lv in run_["levels"]}
    for key in ("model", "gpu", "kv_memory_gib", "max_num_batched_tokens"):
        seen = {str(r.get(key)) for r in records}
        if len(seen) > 1:
            raise ValueError(f"records differ in {key}: {sorted(seen)}")
    out = {k: v for k, v in records[0].items() if k != "runs"}
    runs: dict[str, dict] = {}          # runs of one policy (levels split over calls) join
    for r in records:
        for run_ in r["runs"]:
            have = runs.setdefault(_label(run_), {**run_, "levels": []})
            key = lambda lv: (lv["prompt_len"], lv["output_len"], lv["concurrency"])  # noqa: E731
            dup = {key(lv) for lv in have["levels"]} & {key(lv) for lv in run_["levels"]}
            if dup:
                raise ValueError(f"{_label(run_)}: level(s) {sorted(dup)} (prompt, output, "
                                 "concurrency) appear in more than one record")
            have["levels"] = sorted(have["levels"] + run_["levels"], key=key)
    out["runs"] = list(runs.values())
    out["shapes"] = sorted(shape)
    return out


def plot(record: dict, path) -> None:
    """PNG: output tok/s per GPU (with each policy's roofline dotted) and per user vs
    concurrency, one line per policy and shape."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6))
    for run_ in record["runs"]:
        by_shape: dict = {}
        for lv in run_["levels"]:
            by_shape.setdefault((lv["prompt_len"], lv["output_len"]), []).append(lv)
        for (p, o), lvs in sorted(by_shape.items()):
            lvs.sort(key=lambda x: x["concurrency"])
            c = [x["concurrency"] for x in lvs]
            style = "-o" if p >= 1024 else "--s"
            label = f"{_label(run_)} ({p}/{o})"
            (line,) = axes[0].plot(c, [x["output_tok_s"] for x in lvs], style, label=label)
            roof = [(x.get("roofline") or {}).get("tok_s", float("nan")) for x in lvs]
            if any(r == r for r in roof):             # records from before the roofline lack it
                axes[0].plot(c, roof, ":", color=line.get_color(), label=f"{label} roofline")
            axes[1].plot(c, [x["output_tok_s_per_user"] or float("nan") for x in lvs], style,
                         label=label)
            axes[2].plot(c, [x["ttft_s"]["p50"] for x in lvs], style, label=label)
    titles = ("output tokens/s per GPU", "output tokens/s per user", "TTFT p50 (s)")
    concs = sorted({lv["concurrency"] for run_ in record["runs"] for lv in run_["levels"]})
    for ax, t in zip(axes, titles):
        ax.set_xscale("log", base=2)
        ax.set_xticks(concs, [str(c) for c in concs])
        ax.minorticks_off()
        ax.set_xlabel("concurrency (users)")
        ax.set_title(t)
        ax.grid(True, alpha=0.3)
    axes[2].set_yscale("log")
    axes[0].legend(fontsize=7)
    gpu = record.get("gpu") or record.get("device")
    fig.suptitle(f"sawtrt engine throughput, {record.get('model')} on {gpu}, "
                 f"KV budget {record.get('kv_memory_gib')} GiB per policy (prompt/output tokens)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
