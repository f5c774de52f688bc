"""LLMEngine: requests in, token/text deltas out, one `step()` at a time.

    engine = LLMEngine.from_engine_dir("engines/smollm2-135m-int4-bdr")
    engine.add_request("r1", "The capital of France is", SamplingParams(max_tokens=16))
    while engine.has_unfinished():
        for out in engine.step():
            print(out.request_id, out.new_text, out.finished)

Thread safety: add_request / abort_request / step take one lock, so a server thread may add or
abort requests while another thread drives step().

Async scheduling (`async_scheduling`, default on CUDA): step() schedules and launches step N+1
while the GPU still runs step N, then waits for step N's tokens and turns them into outputs, so
scheduling, metadata, detokenization and the caller's own work run behind the GPU. Each step()
then returns the previous model step's outputs (the same outputs in the same order, one call
later). A sequence decoding in step N is scheduled into N+1 with its step-N token as a hole
that the runner fills on the device (seq.num_pending). Finishes the host can foresee (max_tokens,
max_seq_len) retire the sequence before N+1 is scheduled, so batches are those of the
synchronous engine; an EOS or stop string is seen one step late: that sequence's token from
N+1 is dropped. Pages freed while a step that uses them is in flight (finish, abort,
preemption) are safe to hand out again at once: every step runs on one stream, in order.
"""
from __future__ import annotations

import gc
import random
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..kv_cache import new_pool
from ..spec import KVPolicy, PageLayout
from ..models import tokenizer as tokenizers
from ..models.kv_transform import KVCalibration, KVCalibrationError, KVTransform
from ..models.model import CausalLM
from ..models.weights import random_weights
from .block_manager import BlockManager, pages_for
from .config import EngineConfig, EngineConfigError
from .detokenizer import IncrementalDetokenizer
from .model_runner import ModelRunner
from .sampling import SamplingParams
from .scheduler import Scheduler
from .sequence import Sequence, Status

DEFAULT_CPU_KV_BYTES = 1 << 30        # KV pool cap on CPU
DEFAULT_GPU_KV_FRACTION = 0.6         # of the GPU memory free after loading the weights


@dataclass
class StepOutput:
    request_id: str
    new_token_ids: list[int]
    new_text: str
    finished: bool
    finish_reason: str | None          # None | "stop" | "length" | "abort"
    num_prompt_tokens: int
    num_output_tokens: int


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_weights(cfg: EngineConfig, engine_dir: Path, device, dtype) -> dict:
    w = cfg.weights
    if w.get("format") == "random":
        return random_weights(cfg.model, seed=int(w["seed"]), dtype=dtype, device=device)
    if w.get("format") == "safetensors":
        from safetensors.torch import load_file
        path = engine_dir / w["file"]
        if not path.is_file():
            raise EngineConfigError(f"engine weights {str(path)!r} are missing")
        return load_file(str(path), device=str(device))
    raise EngineConfigError(f"unknown weights format {w.get('format')!r}")


def load_kv_transform(cfg: EngineConfig, engine_dir: Path, dtype, device) -> KVTransform | None:
    """The policy's model-side K transform (center / balance / whiten) from the engine's calibration
    file, or None when the policy has none."""
    pol = cfg.layout.policy
    if not pol.transforms_k:
        return None
    info = cfg.kv_calibration
    if not info:
        raise EngineConfigError(f"KV policy {pol} needs a K calibration and this engine has none; "
                                f"rebuild it with `sawtrt build --kv-cache {pol}`")
    try:
        cal = KVCalibration.load(Path(engine_dir) / info["file"], cfg.model, info.get("sha256"))
        return KVTransform(pol, cal, cfg.model.num_heads, dtype, device)
    except KVCalibrationError as e:      # e.g. a whiten policy over a file without moments
        raise EngineConfigError(f"{engine_dir}: KV policy {pol}: {e}") from None


def freeze_gc() -> None:
    """For serving processes, once an engine is loaded: everything alive now (weights' module
    wrappers, CUDA graphs, tables) stays for the process's life, so move it out of the
    collector's generations and full collections during serving stay short. Process-wide, so
    the serving entry points call it, not LLMEngine itself."""
    gc.collect()
    gc.freeze()


class LLMEngine:
    def __init__(self, cfg: EngineConfig, model: CausalLM, tokenizer, device,
                 num_pages: int | None = None, max_num_batched_tokens: int | None = None,
                 kv_memory_bytes: int | None = None, cuda_graphs: bool | str = "auto",
                 max_num_seqs: int | None = None, async_scheduling: bool | str = "auto"):
        self.config = cfg
        self.model = model
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        self.max_seq_len = cfg.max_seq_len
        self.max_num_seqs = max_num_seqs or cfg.max_batch
        layout = cfg.layout
        per_page = layout.pool_page_bytes(cfg.model.num_layers)    # every layer's pool
        need = self.max_num_seqs * pages_for(cfg.max_seq_len, layout.page_size)
        if num_pages is None:
            if kv_memory_bytes is None:
                if self.device.type == "cuda":
                    free, _ = torch.cuda.mem_get_info(self.device)
                    kv_memory_bytes = int(free * DEFAULT_GPU_KV_FRACTION)
                else:
                    kv_memory_bytes = DEFAULT_CPU_KV_BYTES
            num_pages = max(1, min(need, kv_memory_bytes // per_page))
        # page 0 is scratch (padding rows of CUDA-graph batches); pages 1..num_pages are used
        self.kv_pool = new_pool(layout, cfg.model.num_layers, num_pages + 1, self.device)
        self.block_manager = BlockManager(num_pages, layout.page_size, first_page=1)
        tokens = max_num_batched_tokens or max(512, self.max_num_seqs)
        self.scheduler = Scheduler(self.block_manager, self.max_num_seqs, tokens, cfg.max_seq_len)
        self.runner = ModelRunner(model, self.kv_pool, self.max_num_seqs, cfg.max_seq_len,
                                  cuda_graphs)
        # a fresh prompt run is at most one step's budget and one sequence long
        self._prefill_budget = min(tokens, cfg.max_seq_len)
        self._warm_threads: set[int] = set()
        self.prefill_note = "cuDNN prefill plans not built yet"
        if async_scheduling not in (True, False, "auto"):
            raise ValueError("async_scheduling must be True, False or 'auto'")
        # auto: on CUDA, where the host can run ahead of the device; on CPU every op already
        # waits for its result, so overlap gains nothing (forcing it on there tests it)
        self.async_scheduling = self.device.type == "cuda" if async_scheduling == "auto" \
            else bool(async_scheduling)
        self._inflight = None           # the launched step whose tokens are not processed yet
        self._seqs: dict[str, Sequence] = {}
        self._pending: list[StepOutput] = []
        self._arrivals = 0
        self._rng = random.Random()
        self._lock = threading.RLock()
        self.detokenizer = IncrementalDetokenizer(tokenizer)
        stops = {cfg.model.eos_token_id, getattr(tokenizer, "eos_token_id", None)}
        self.eos_token_ids = {t for t in stops if t is not None}

    @classmethod
    def from_engine_dir(cls, engine_dir, device=None, dtype: torch.dtype | None = None,
                        kv_policy: str | KVPolicy | None = None, prefill_kv: str = "auto",
                        **kwargs) -> "LLMEngine":
        """Load an engine directory made by `sawtrt build`.

        device: "cpu", "cuda", ... (default: cuda when available); dtype of the weights and
        activations: bf16 on GPU, fp32 on CPU unless given. kwargs go to __init__ (num_pages,
        max_num_batched_tokens, kv_memory_bytes, cuda_graphs, max_num_seqs). kv_policy
        overrides the engine's KV policy (e.g. "int4-bdr:h=32"); the weights do not depend on it.
        prefill_kv: what prompt tokens attend to (CausalLM): "fresh" their own unquantized K/V,
        "cache" the quantized cache, "auto" fresh where the compiled kernels serve every layer.
        """
        engine_dir = Path(engine_dir)
        cfg = EngineConfig.load(engine_dir)
        if kv_policy is not None:
            pol = KVPolicy.parse(kv_policy) if isinstance(kv_policy, str) else kv_policy
            cfg.layout = PageLayout(pol, cfg.layout.head_dim, cfg.layout.num_kv_heads,
                                    cfg.layout.page_size)
            pol.check_layers(cfg.model.num_layers)     # before the weights are loaded
        device = torch.device(device) if device is not None else default_device()
        if dtype is None:
            dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        weights = load_weights(cfg, engine_dir, device, dtype)
        model = CausalLM(cfg.model, cfg.layout, weights, dtype=dtype, device=device,
                         max_positions=cfg.max_seq_len,
                         kv_transform=load_kv_transform(cfg, engine_dir, dtype, device),
                         prefill_kv=prefill_kv)
        del weights
        tok = tokenizers.load(engine_dir)
        return cls(cfg, model, tok, device, **kwargs)

    # -- requests ---------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt: str | list[int],
                    params: SamplingParams | None = None) -> None:
        params = (params or SamplingParams()).validate()
        if not isinstance(request_id, str) or not request_id:
            raise ValueError("request_id must be a non-empty string")
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt)
        else:
            ids = [int(t) for t in prompt]
            vocab = self.config.model.vocab_size
            if any(not 0 <= t < vocab for t in ids):
                raise ValueError(f"prompt token ids must be in [0, {vocab})")
        if not ids:
            raise ValueError("empty prompt")
        if len(ids) >= self.max_seq_len:
            raise ValueError(f"prompt has {len(ids)} tokens; this engine's max_seq_len is "
                             f"{self.max_seq_len} (prompt + output), so at most "
                             f"{self.max_seq_len - 1} prompt tokens")
        with self._lock:
            if request_id in self._seqs:
                raise ValueError(f"duplicate request id {request_id!r}")
            seed = params.seed if params.seed is not None else self._rng.getrandbits(63)
            gen = None
            if not params.greedy:
                gen = torch.Generator(device=self.device).manual_seed(seed)
            seq = Sequence(request_id, ids, params, self._arrivals, gen)
            self._arrivals += 1
            self._seqs[request_id] = seq
            if params.max_tokens == 0:
                seq.status = Status.FINISHED
                seq.finish_reason = "length"
                del self._seqs[request_id]
                self._pending.append(self._output(seq, [], ""))
                return
            self.scheduler.add(seq)

    def abort_request(self, request_id: str) -> bool:
        """Stop a request and free its pages; the next step() reports it with "abort".
        Returns False when the id is unknown or already finished."""
        with self._lock:
            seq = self._seqs.pop(request_id, None)
            if seq is None:
                return False
            self.scheduler.finish(seq, "abort")
            self._pending.append(self._output(seq, [], ""))
            return True

    def has_unfinished(self) -> bool:
        with self._lock:
            return bool(self._seqs or self._pending or self._inflight is not None)

    def kv_cache_usage(self) -> dict:
        return {"used_pages": self.block_manager.num_used,
                "total_pages": self.block_manager.num_pages,
                "page_size": self.config.layout.page_size}

    # -- the step ---------------------------------------------------------------------------
    def warm_up(self) -> str:
        """Build the dense prefill's cuDNN plans (CausalLM.warm_up_prefill) for the calling
        thread: torch keeps them per thread, so the thread that steps calls this before serving
        (the server's engine loop does; `step` does on a thread's first step). Returns a note."""
        warm = getattr(self.model, "warm_up_prefill", None)     # stand-in models have none
        t0 = time.perf_counter()
        n = warm(self._prefill_budget) if warm is not None else 0
        self._warm_threads.add(threading.get_ident())
        self.prefill_note = f"cuDNN prefill: {n} shapes warmed in " \
            f"{time.perf_counter() - t0:.1f} s" if n else "no cuDNN prefill plans"
        return self.prefill_note

    def step(self) -> list[StepOutput]:
        if threading.get_ident() not in self._warm_threads:
            self.warm_up()
        if self.async_scheduling:
            return self._step_async()
        with self._lock:
            # outputs accumulate in self._pending until returned: a step that raises keeps
            # the finishes and aborts queued before it for the next call
            outputs = self._pending
            batch = self.scheduler.schedule()
            if not batch.seqs:
                if self.scheduler.has_unfinished() and not outputs:
                    raise RuntimeError("scheduler made no progress (pool too small?)")
                self._pending = []
                return outputs
            tokens = self.runner.run(batch)
            for seq, n, tok in zip(batch.seqs, batch.num_tokens, tokens):
                seq.num_computed += n
                if tok is not None:
                    outputs.append(self._accept_token(seq, tok))
            self._pending = []
            return outputs

    def _step_async(self) -> list[StepOutput]:
        with self._lock:
            try:
                return self._step_async_locked()
            except BaseException:
                self._drop_inflight()
                raise

    def _drop_inflight(self) -> None:
        """After a failed step: forget the tokens of launched steps, so that every live sequence
        can be scheduled again (its last token is recomputed and sampled anew; a retiring one
        goes back to the waiting queue)."""
        self._inflight = None
        for seq in self._seqs.values():
            if seq.num_pending:
                seq.num_pending = 0
                seq.num_computed = min(seq.num_computed, len(seq.token_ids) - 1)
            if seq.status == Status.RETIRING:
                seq.num_computed = 0
                self.scheduler.add(seq)

    def _step_async_locked(self) -> list[StepOutput]:
        outputs = self._pending       # kept there until returned (see step)
        prev = self._inflight
        if prev is not None:
            for seq in prev.sampled:
                if seq.status == Status.RUNNING and self._last_token_in_flight(seq):
                    self.scheduler.retire(seq)
        batch = self.scheduler.schedule()
        step = None
        if batch.seqs:
            step = self.runner.launch(batch, prev)
            for seq, n in zip(batch.seqs, batch.num_tokens):
                seq.num_computed += n
            for seq in step.sampled:
                seq.num_pending += 1
        elif prev is None and self.scheduler.has_unfinished() and not outputs:
            raise RuntimeError("scheduler made no progress (pool too small?)")
        self._inflight = step
        if prev is not None:
            for seq, tok in zip(prev.sampled, prev.results()):
                seq.num_pending -= 1
                if seq.is_finished:     # aborted, or its EOS / stop string came a step late
                    continue
                outputs.append(self._accept_token(seq, tok))
        self._pending = []
        return outputs

    def _ends_by_length(self, seq: Sequence, pending: int = 0) -> bool:
        """seq is done by max_tokens or max_seq_len once `pending` more tokens arrive."""
        return seq.num_output_tokens + pending >= seq.params.max_tokens \
            or len(seq.token_ids) + pending >= self.max_seq_len

    def _last_token_in_flight(self, seq: Sequence) -> bool:
        """The token seq waits for ends it by length whatever it is."""
        return self._ends_by_length(seq, seq.num_pending)

    def _accept_token(self, seq: Sequence, tok: int) -> StepOutput:
        """Append a sampled token and report it. If reporting raises (the detokenizer, a stop
        string), the token is taken back and its step recomputed: a last token (by length or
        EOS) kept without its report would never finish the request."""
        seq.token_ids.append(tok)
        try:
            return self._process_token(seq, tok)
        except BaseException:
            if not seq.is_finished:
                seq.token_ids.pop()
                seq.num_computed = min(seq.num_computed, len(seq.token_ids) - 1)
            raise

    def _process_token(self, seq: Sequence, tok: int) -> StepOutput:
        p = seq.params
        reason = None
        if not p.ignore_eos and tok in self.eos_token_ids:
            reason = "stop"
        elif self._ends_by_length(seq):
            reason = "length"
        text = self.detokenizer.text(seq, final=reason is not None)
        if p.stop:
            lo = max(0, seq.num_emitted_chars - max(len(s) for s in p.stop))
            hits = [i for i in (text.find(s, lo) for s in p.stop) if i >= 0]
            if hits:
                text = text[:min(hits)]
                reason = "stop"
        seq.text = text
        safe = len(text)
        if reason is None:
            while safe > seq.num_emitted_chars and text[safe - 1] == "\ufffd":
                safe -= 1                           # incomplete UTF-8 sequence: wait
            if p.stop:                              # a stop string may be starting: hold back
                safe = max(seq.num_emitted_chars, safe - (max(len(s) for s in p.stop) - 1))
        delta = text[seq.num_emitted_chars:safe]
        seq.num_emitted_chars = safe
        new_ids = seq.token_ids[seq.num_prompt_tokens + seq.num_emitted_tokens:]
        seq.num_emitted_tokens = seq.num_output_tokens
        if reason is not None:
            self.scheduler.finish(seq, reason)
            self._seqs.pop(seq.request_id, None)
        return self._output(seq, new_ids, delta)

    @staticmethod
    def _output(seq: Sequence, new_ids: list[int], delta: str) -> StepOutput:
        return StepOutput(seq.request_id, list(new_ids), delta, seq.is_finished,
                          seq.finish_reason, seq.num_prompt_tokens, seq.num_output_tokens)
