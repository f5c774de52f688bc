"""Kernel benchmark: our paged decode (bf16 / int8 / int4 / int4-bdr caches) against PyTorch's
best BF16 path (scaled_dot_product_attention on a contiguous cache, enable_gqa=True; cuDNN and
flash backends, the faster is the baseline), with bytes moved, effective bandwidth and the
fraction of the device-to-device copy bandwidth measured in the same run.

Timing: CUDA events around each launch, a 256 MB buffer written between launches so nothing sits
in the 60 MB L2, median over `reps`. Pools hold random bytes with valid fp16 (scale, offset)
params (timing does not depend on the values); pages are in random order.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass, field

SHAPES = {  # name -> (Hq, Hkv, D)
    "qwen3-4b": (32, 8, 128),
    "d64": (32, 8, 64),
    "d256": (16, 4, 256),
}
BATCHES = (1, 8, 32, 128)
CONTEXTS = (1024, 4096, 16384, 32768)
POLICIES = ("bf16", "int4", "int4-bdr")                  # prefill benchmark (bench.prefill)
DECODE_POLICIES = ("bf16", "int8", "int4", "int4-bdr")   # decode benchmark default (int8: the
                                                         # plain 8-bit pages of mixed policies)


@dataclass
class Row:
    shape: str
    hq: int
    hkv: int
    d: int
    batch: int
    context: int
    page_size: int
    ms: dict = field(default_factory=dict)        # kernel -> median ms
    bytes: dict = field(default_factory=dict)     # kernel -> bytes moved
    tbps: dict = field(default_factory=dict)      # kernel -> effective TB/s
    frac_copy: dict = field(default_factory=dict)
    sdpa_backend: str | None = None
    write_ms: float | None = None


def _l2_flush_buffer(torch):
    return torch.empty(256 << 20, dtype=torch.uint8, device="cuda")


def time_ms(torch, fn, reps: int, flush) -> float:
    """Median ms of `fn` over `reps` launches, L2 flushed before each."""
    fn()  # warm-up (module load, attribute calls)
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for i in range(reps):
        flush.fill_(i & 0xFF)
        starts[i].record()
        fn()
        ends[i].record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends))


def copy_bandwidth(torch, nbytes: int = 4 << 30, reps: int = 10) -> float:
    """Device-to-device copy bandwidth in TB/s, counting bytes read + written."""
    a = torch.empty(nbytes, dtype=torch.uint8, device="cuda").random_(0, 255)
    b = torch.empty_like(a)
    flush = _l2_flush_buffer(torch)
    ms = time_ms(torch, lambda: b.copy_(a), reps, flush)
    del a, b
    return 2 * nbytes / (ms * 1e-3) / 1e12


def random_pool(torch, layout, num_pages: int, gen):
    """A pool of random bytes whose (scale, offset) params are valid fp16 (scale in [0.01, 0.1],
    offset in [-1, 0]); bf16 pools hold random normal bf16 values."""
    hbb = layout.head_block_bytes
    pool = torch.empty((num_pages, layout.num_kv_heads, hbb), dtype=torch.uint8, device="cuda")
    if not layout.policy.quantized:
        pool.view(torch.bfloat16).normal_(generator=gen)
        return pool
    pool.random_(0, 256, generator=gen)
    p, cb = layout.page_size, layout.code_bytes
    for at in (layout.k_params, layout.v_params):
        params = pool[..., at:at + 4 * p].view(torch.float16).view(num_pages, layout.num_kv_heads, p, 2)
        params[..., 0].uniform_(0.01, 0.1, generator=gen)
        params[..., 1].uniform_(-1.0, 0.0, generator=gen)
    del cb
    return pool


class DecodeLib:
    """The kernel library (sawtrt.kernels.library) with the saw_decode calls the benchmark times."""

    def __init__(self, path: str | None = None):
        from ..kernels import library
        self.library = library
        self.full = library.load(path)
        self.name = "libsawtrt_kernels.so"

    def config(self, layout, num_q_heads: int, dtype, signs):
        return self.library.make_config(layout, num_q_heads, dtype,
                                        signs_ptr=signs.data_ptr() if signs is not None else 0)

    def workspace_bytes(self, cfg, num_seqs: int, max_seq_len: int) -> int:
        import ctypes
        return int(self.full.saw_workspace_bytes(ctypes.byref(cfg), num_seqs, num_seqs,
                                                 max_seq_len))

    def decode(self, cfg, q, pool_layer, block_tables, seq_lens, max_seq_len, out, ws,
               stream: int = 0) -> None:
        import ctypes
        args = (ctypes.byref(cfg), q.data_ptr(), q.stride(0), pool_layer.data_ptr(),
                block_tables.data_ptr(), block_tables.shape[1], seq_lens.data_ptr(),
                seq_lens.shape[0], max_seq_len, out.data_ptr(),
                ws.data_ptr() if ws is not None and ws.numel() else None,
                ws.numel() if ws is not None else 0, stream or None)
        self.library.check(self.full.saw_decode(*args), self.full)


class DecodeCall:
    """A prepared decode launch over fixed tensors: call it to run once (graph-capturable)."""

    def __init__(self, lib: DecodeLib, layout, q, pool_layer, block_tables, seq_lens,
                 max_seq_len: int | None = None):
        import torch
        self.lib = lib
        self.q, self.pool, self.bt = q, pool_layer, block_tables
        self.lens = seq_lens.to(device=q.device, dtype=torch.int32)
        self.max_len = int(seq_lens.max()) if max_seq_len is None else max_seq_len
        signs = layout.policy.signs(layout.head_dim)
        self.signs = signs.to(q.device) if signs is not None else None
        self.cfg = lib.config(layout, q.shape[1], q.dtype, self.signs)
        nbytes = lib.workspace_bytes(self.cfg, q.shape[0], self.max_len)
        self.ws = torch.empty(max(nbytes, 1), dtype=torch.uint8, device=q.device)
        self.out = torch.empty_like(q)

    def __call__(self):
        import torch
        self.lib.decode(self.cfg, self.q, self.pool, self.bt, self.lens, self.max_len, self.out,
                        self.ws, torch.cuda.current_stream().cuda_stream)
        return self.out


def sdpa_best(torch, q4, k, v, reps, flush):
    """(ms, backend) of the faster of cuDNN / flash SDPA (None if neither runs)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    import torch.nn.functional as F
    best = (None, None)
    for name, backend in (("cudnn", SDPBackend.CUDNN_ATTENTION),
                          ("flash", SDPBackend.FLASH_ATTENTION)):
        try:
            def run():
                with sdpa_kernel(backend):
                    return F.scaled_dot_product_attention(q4, k, v, enable_gqa=True)
            ms = time_ms(torch, run, reps, flush)
        except Exception:  # backend refuses this shape
            continue
        if best[0] is None or ms < best[0]:
            best = (ms, name)
    return best


def bench_point(torch, lib, shape: str, batch: int, ctx: int, page_size: int, reps: int,
                flush, copy_tbps: float, gen, with_write: bool = True,
                policies=DECODE_POLICIES) -> Row:
    from ..spec import KVPolicy, PageLayout
    hq, hkv, d = SHAPES[shape]
    row = Row(shape, hq, hkv, d, batch, ctx, page_size)
    dev = "cuda"
    q = torch.randn(batch, hq, d, device=dev, generator=gen).to(torch.bfloat16)
    qo_bytes = 2 * q.numel() * 2  # q read + out written (bf16)
    pages_per = math.ceil(ctx / page_size)
    num_pages = batch * pages_per
    lens = torch.full((batch,), ctx, dtype=torch.int32, device=dev)
    bt = torch.randperm(num_pages, device=dev, generator=gen).to(torch.int32).view(batch, pages_per)
    for policy in policies:
        layout = PageLayout(KVPolicy.parse(policy), d, hkv, page_size)
        pool = random_pool(torch, layout, num_pages, gen)
        call = DecodeCall(lib, layout, q, pool, bt, lens, ctx)
        ms = time_ms(torch, call, reps, flush)
        nbytes = batch * ctx * hkv * layout.token_bytes + qo_bytes
        row.ms[policy], row.bytes[policy] = ms, nbytes
        if with_write and policy == "int4-bdr":
            row.write_ms = write_step_ms(torch, lib, layout, hq, batch, pool, bt, ctx, reps, flush,
                                         gen)
        del pool, call
    # BF16 SDPA on a contiguous cache [B, Hkv, L, D]
    k = torch.randn(batch, hkv, ctx, d, device=dev, dtype=torch.bfloat16, generator=gen)
    v = torch.randn_like(k)
    ms, backend = sdpa_best(torch, q.view(batch, hq, 1, d), k, v, reps, flush)
    del k, v
    if ms is not None:
        row.ms["sdpa"] = ms
        row.bytes["sdpa"] = batch * ctx * hkv * d * 2 * 2 + qo_bytes
        row.sdpa_backend = backend
    for key, ms in row.ms.items():
        row.tbps[key] = row.bytes[key] / (ms * 1e-3) / 1e12
        row.frac_copy[key] = row.tbps[key] / copy_tbps
    return row


def write_step_ms(torch, lib, layout, hq, batch, pool, bt, ctx, reps, flush, gen):
    """One decode step's K/V write (one token per sequence) through saw_write_kv (None if it
    fails for this shape)."""
    import ctypes
    hkv, d = layout.num_kv_heads, layout.head_dim
    qkv = torch.randn(batch, (hq + 2 * hkv) * d, device="cuda", generator=gen).to(torch.bfloat16)
    pos = ctx - 1
    slots = (bt[:, pos // layout.page_size].long() * layout.page_size
             + pos % layout.page_size).to(torch.int32)
    signs = layout.policy.signs(d)
    signs = signs.cuda() if signs is not None else None
    cfg = lib.config(layout, hq, torch.bfloat16, signs)

    def run():
        lib.library.check(lib.full.saw_write_kv(
            ctypes.byref(cfg), qkv.data_ptr(), qkv.stride(0), slots.data_ptr(), batch,
            pool.data_ptr(), torch.cuda.current_stream().cuda_stream or None), lib.full)
    try:
        return time_ms(torch, run, reps, flush)
    except Exception:
        return None


def run(shapes=("qwen3-4b",), batches=BATCHES, contexts=CONTEXTS, page_size: int = 64,
        reps: int = 20, max_tokens: int = 128 * 32768, lib_path: str | None = None,
        log=print, policies=DECODE_POLICIES) -> dict:
    """Time every (shape, batch, context) point for each KV policy in `policies` (policy strings
    as in kv-plan, e.g. "int8", "int4-bdr:h=64") and BF16 SDPA; returns the JSON-able result."""
    import torch
    from ..spec import KVPolicy
    policies = tuple(str(KVPolicy.parse(p)) for p in policies)
    if not torch.cuda.is_available():
        raise RuntimeError("sawtrt bench kernels needs a CUDA GPU")
    lib = DecodeLib(lib_path)
    gen = torch.Generator(device="cuda").manual_seed(0)
    copy_tbps = copy_bandwidth(torch)
    flush = _l2_flush_buffer(torch)
    props = torch.cuda.get_device_properties(0)
    log(f"device {props.name}, {props.multi_processor_count} SMs; library {lib.name}; "
        f"copy bandwidth {copy_tbps:.2f} TB/s (read + write)")
    rows = []
    for shape in shapes:
        for batch in batches:
            for ctx in contexts:
                if batch * ctx > max_tokens:
                    continue
                row = bench_point(torch, lib, shape, batch, ctx, page_size, reps, flush,
                                  copy_tbps, gen, policies=policies)
                rows.append(row)
                log(format_row(row))
                torch.cuda.empty_cache()
    return {"device": props.name, "sms": props.multi_processor_count, "library": lib.name,
            "torch": torch.__version__, "copy_tbps": copy_tbps, "page_size": page_size,
            "reps": reps, "policies": list(policies), "rows": [asdict(r) for r in rows]}


HEADER = (f"{'shape':9s} {'B':>4s} {'ctx':>6s} | {'bf16':>8s} {'int8':>8s} {'int4':>8s} "
          f"{'bdr':>8s} {'sdpa':>8s} ms | {'bdr TB/s':>8s} {'%copy':>6s} | {'int8 TB/s':>9s} "
          f"{'%copy':>6s} | {'sdpa/bdr':>8s} {'bdr/int4':>8s} {'write%':>7s}")


def format_row(r: Row) -> str:
    """One table line; a policy that was not timed prints '-' (its ratios nan)."""
    ms = r.ms
    nan = float("nan")
    f = lambda k: f"{ms[k]:8.4f}" if k in ms else f"{'-':>8s}"  # noqa: E731
    ratio = lambda a, b: ms[a] / ms[b] if a in ms and b in ms else nan  # noqa: E731
    tb = lambda k: r.tbps.get(k, nan)  # noqa: E731
    pc = lambda k: 100 * r.frac_copy.get(k, nan)  # noqa: E731
    wpct = 100 * r.write_ms / ms["int4-bdr"] if r.write_ms and "int4-bdr" in ms else nan
    return (f"{r.shape:9s} {r.batch:4d} {r.context:6d} | {f('bf16')} {f('int8')} {f('int4')} "
            f"{f('int4-bdr')} {f('sdpa')} ms | {tb('int4-bdr'):8.2f} {pc('int4-bdr'):5.1f}% | "
            f"{tb('int8'):9.2f} {pc('int8'):5.1f}% | {ratio('sdpa', 'int4-bdr'):8.2f} "
            f"{ratio('int4-bdr', 'int4'):8.3f} {wpct:6.2f}%")
