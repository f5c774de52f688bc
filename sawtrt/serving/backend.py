"""Serving logic with no Triton import: request parsing and the background engine loop.

The Triton model (`triton_model.py`) turns each Triton request into a numpy input dict and a
`Sink` (where responses go); everything else happens here, so tests drive it with a fake engine
and fake sinks.

Threading: one loop thread owns the engine (add_request / step / abort_request are only ever
called from it). `submit()` is thread-safe: it queues the request and wakes the loop. Responses
go out through a second thread (`_Outbox`, one FIFO, so each request's responses keep their
order): a send is an IPC round trip in Triton's Python backend (it releases the GIL), and with 16
streams the H200 run showed ITL 15 ms through the server against 10 ms engine-only, which the
loop's own sends are suspected to explain (docs/performance.md); now they overlap the next step.
The outbox reports each request's outcome back to the loop (final delivered, or a send failed),
and the loop keeps all counters and aborts requests whose client went away. One FIFO means a
send that blocks holds up the others; Triton's sends hand the response to the server and do
not wait for the network.
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import logging
import math
import queue
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Mapping, Protocol

import numpy as np

from sawtrt.engine.sampling import SamplingParams
from sawtrt.serving.triton_repo import INPUTS

log = logging.getLogger("sawtrt.serving")

MAX_PROMPT_BYTES = 1 << 20     # 1 MiB of text; longer is refused before tokenizing


class RequestError(ValueError):
    """A bad request: the message goes back to the client verbatim."""


@dataclass
class ParsedRequest:
    prompt: str
    params: SamplingParams
    stream: bool
    cap_max_tokens: bool = False     # prompt + max_tokens over max_seq_len: cap, not an error
    prompt_ids: list | None = None   # set by check_context (tokenized off the engine loop)


# ---------------------------------------------------------------------------------------------
# Parsing: numpy tensors (as Triton hands them, with the batch dimension) -> ParsedRequest
# ---------------------------------------------------------------------------------------------

def _single(name: str, arr) -> object:
    """The one element of a [1], [1, 1] or [] tensor; RequestError otherwise."""
    a = np.asarray(arr)
    if a.ndim >= 1 and a.shape[0] != 1:
        raise RequestError(f"{name}: batch size {a.shape[0]} is not supported; "
                           "send one prompt per request (shape [1, 1])")
    if a.size != 1:
        raise RequestError(f"{name}: expected one value, got shape {list(a.shape)}")
    return a.reshape(-1)[0]


def _text(name: str, value) -> str:
    if isinstance(value, (bytes, np.bytes_)):
        if len(value) > MAX_PROMPT_BYTES:
            raise RequestError(f"{name}: {len(value)} bytes is over the {MAX_PROMPT_BYTES}-byte limit")
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError as e:
            raise RequestError(f"{name}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
    if isinstance(value, (str, np.str_)):
        return str(value)
    raise RequestError(f"{name}: expected BYTES (a UTF-8 string), got {type(value).__name__}")


def _int(name: str, value) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise RequestError(f"{name}: expected an integer, got {np.asarray(value).dtype} value {value!r}")
    return int(value)


def _float(name: str, value) -> float:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise RequestError(f"{name}: expected a number, got {np.asarray(value).dtype} value {value!r}")
    v = float(value)
    if not math.isfinite(v):
        raise RequestError(f"{name}: must be finite, got {v}")
    return v


def _bool(name: str, arr) -> bool:
    if arr is None:
        return False
    v = _single(name, arr)
    if not isinstance(v, (bool, np.bool_)):
        raise RequestError(f"{name}: expected BOOL, got {np.asarray(v).dtype}")
    return bool(v)


def parse_request(inputs: Mapping[str, object]) -> ParsedRequest:
    """Validate the tensors of one request; raise RequestError naming the bad input.

    `inputs` maps input name -> numpy array (absent or None: not sent). Only the prompt's
    emptiness is checked here; its token length is checked by the engine on add_request.
    """
    unknown = sorted(set(k for k, v in inputs.items() if v is not None) - set(INPUT_NAMES))
    if unknown:
        raise RequestError(f"unknown input(s) {unknown}; expected a subset of {list(INPUT_NAMES)}")
    for required in ("text_input", "max_tokens"):
        if inputs.get(required) is None:
            raise RequestError(f"missing required input '{required}'")

    prompt = _text("text_input", _single("text_input", inputs["text_input"]))
    if not prompt:
        raise RequestError("text_input: the prompt is empty")

    max_tokens = _int("max_tokens", _single("max_tokens", inputs["max_tokens"]))
    if max_tokens < 1:
        raise RequestError(f"max_tokens: must be >= 1, got {max_tokens}")

    kwargs = {"max_tokens": max_tokens}
    for name, convert in (("temperature", _float), ("top_p", _float), ("top_k", _int),
                          ("seed", _int)):
        if inputs.get(name) is not None:
            kwargs[name] = convert(name, _single(name, inputs[name]))
    if inputs.get("random_seed") is not None:
        rs = _int("random_seed", _single("random_seed", inputs["random_seed"]))
        if kwargs.setdefault("seed", rs) != rs:
            raise RequestError(f"seed ({kwargs['seed']}) and random_seed ({rs}) disagree")
    if inputs.get("beam_width") is not None:
        bw = _int("beam_width", _single("beam_width", inputs["beam_width"]))
        if bw != 1:
            raise RequestError(f"beam_width: only 1 is supported (no beam search), got {bw}")
    if inputs.get("bad_words") is not None:
        bad = [s for s in (_text("bad_words", v)
                           for v in np.asarray(inputs["bad_words"], dtype=object).reshape(-1)) if s]
        if bad:
            raise RequestError(f"bad_words: not supported by sawtrt (got {bad[:4]}); "
                               "send none or empty strings")
    if inputs.get("stop_words") is not None:
        sw = np.asarray(inputs["stop_words"], dtype=object)
        if sw.ndim >= 2 and sw.shape[0] != 1:
            raise RequestError(f"stop_words: batch size {sw.shape[0]} is not supported")
        # TensorRT-LLM clients send [[""]] for "none": empty strings are dropped.
        kwargs["stop"] = tuple(s for s in (_text("stop_words", v) for v in sw.reshape(-1)) if s)
    stream = _bool("stream", inputs.get("stream"))
    if inputs.get("ignore_eos") is not None:
        kwargs["ignore_eos"] = _bool("ignore_eos", inputs["ignore_eos"])
    cap = _bool("cap_max_tokens", inputs.get("cap_max_tokens"))

    params = SamplingParams(**kwargs)
    try:
        params.validate()
    except ValueError as e:
        raise RequestError(str(e)) from None
    return ParsedRequest(prompt, params, stream, cap)


def check_context(parsed: ParsedRequest, tokenizer, max_seq_len: int) -> ParsedRequest:
    """Tokenize the prompt (on the caller's thread, not the engine loop's) and check that
    prompt + max_tokens fits the engine's context. Over it: a RequestError naming both numbers,
    or, when the request opted in (cap_max_tokens), max_tokens lowered to what fits."""
    ids = tokenizer.encode(parsed.prompt)
    n, m = len(ids), parsed.params.max_tokens
    if not ids:
        raise RequestError("text_input: the prompt is empty (no tokens)")
    if n >= max_seq_len:
        raise RequestError(f"prompt has {n} tokens; this engine's max_seq_len is {max_seq_len} "
                           f"(prompt + output), so at most {max_seq_len - 1} prompt tokens")
    if n + m > max_seq_len:
        if not parsed.cap_max_tokens:
            raise RequestError(
                f"prompt ({n} tokens) + max_tokens ({m}) = {n + m} is over this engine's "
                f"max_seq_len ({max_seq_len}); ask for at most {max_seq_len - n} tokens, or set "
                "cap_max_tokens to generate up to the limit")
        parsed.params = dataclasses.replace(parsed.params, max_tokens=max_seq_len - n)
    parsed.prompt_ids = ids
    return parsed


INPUT_NAMES = tuple(name for name, *_ in INPUTS)


# ---------------------------------------------------------------------------------------------
# The engine loop
# ---------------------------------------------------------------------------------------------

# what went wrong, for the transport's status code (Triton: INVALID_ARG, CANCELLED, ...)
INVALID_ARGUMENT, CANCELLED, UNAVAILABLE, INTERNAL = ("invalid_argument", "cancelled",
                                                      "unavailable", "internal")


class Sink(Protocol):
    """Where the responses of one request go (a Triton response sender, or a test double)."""

    def send(self, text: str, num_input_tokens: int, num_output_tokens: int,
             finish_reason: str | None, final: bool) -> None: ...

    def error(self, message: str, kind: str = INTERNAL) -> None: ...   # final error response

    def is_cancelled(self) -> bool: ...


@dataclass
class _Active:
    sink: Sink
    stream: bool
    submitted: float
    parts: list = field(default_factory=list)     # non-streaming: text pieces so far
    sent_tokens: int = 0                          # streaming: output tokens reported so far


@dataclass
class LoopStats:
    submitted: int = 0
    completed: int = 0
    rejected: int = 0          # bad requests (parse or add_request errors)
    cancelled: int = 0
    failed: int = 0            # internal errors (engine step raised, sink broke)
    unavailable: int = 0       # draining: refused at admission, or ended by the drain timeout
    steps: int = 0


class _Outbox:
    """One thread that runs sink calls in the order they were posted. Per request: a call that
    raises marks the request broken (its later calls are dropped) and `report(rid, False)` is
    called once; a delivered final response calls `report(rid, True)`."""

    _STOP = object()
    CHUNK, FINAL, ERROR = range(3)   # what a posted call is

    def __init__(self, report: Callable[[str, bool], None]):
        self._q: queue.SimpleQueue = queue.SimpleQueue()
        self._report = report
        self._broken: set[str] = set()
        self._thread = threading.Thread(target=self._run, name="sawtrt-responses", daemon=True)
        self._thread.start()

    def post(self, rid: str, call: Callable[[], None], what: int) -> None:
        self._q.put((rid, call, what))

    def close(self, timeout: float = 30.0) -> None:
        """Deliver everything posted so far, then stop the thread."""
        self._q.put(self._STOP)
        self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            item = self._q.get()
            if item is self._STOP:
                return
            rid, call, what = item
            last = what != self.CHUNK     # nothing more comes for rid after a final or an error
            if rid in self._broken:
                if last:
                    self._broken.discard(rid)
                continue
            try:
                call()
            except Exception:            # noqa: BLE001 - the client went away
                log.warning("sending a response for %s failed: %s", rid, traceback.format_exc())
                if what != self.ERROR:   # an undeliverable error changes nothing for the loop
                    if not last:
                        self._broken.add(rid)
                    self._report(rid, False)
                continue
            if what == self.FINAL:
                self._report(rid, True)


class EngineLoop:
    """Runs `engine.step()` in a background thread and routes outputs to per-request sinks.

    engine: the LLMEngine contract (add_request, step, abort_request, has_unfinished,
    kv_cache_usage). `on_step(loop)` is called after every step and idle wake-up (metrics).
    `cancel_check_interval_s`: how often each active request is asked `is_cancelled()`.
    In Triton that is an IPC round trip per request, so a third thread asks (64 requests every
    50 ms would otherwise cost the step loop several ms per 50 ms) and hands the loop the ids.
    """

    def __init__(self, engine, *, on_step: Callable[["EngineLoop"], None] | None = None,
                 cancel_check_interval_s: float = 0.05, idle_wait_s: float = 0.5):
        self.engine = engine
        self.on_step = on_step
        self.cancel_check_interval_s = cancel_check_interval_s
        self.idle_wait_s = idle_wait_s
        self.stats = LoopStats()
        self._incoming: deque = deque()
        self._wake = threading.Condition()
        self._stop = False
        self._active: dict[str, _Active] = {}
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None
        self._cancelled: deque = deque()    # (rid, _Active) from the cancel poller
        self._outcomes: deque = deque()     # (rid, delivered) from the outbox thread
        self._delivering: set[str] = set()  # finished in the engine, final not delivered yet
        self._outbox: _Outbox | None = None
        self._drain_deadline: float | None = None   # monotonic; set once by drain()
        self._drain_timeout_s = 0.0

    # --- public, thread-safe -----------------------------------------------------------------
    def start(self) -> "EngineLoop":
        self._outbox = _Outbox(self._outcome)
        self._thread = threading.Thread(target=self._run, name="sawtrt-engine-loop", daemon=True)
        self._thread.start()
        threading.Thread(target=self._poll_cancelled, name="sawtrt-cancel-poller",
                         daemon=True).start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the loop; requests still active get an error response ("server shutting down")."""
        with self._wake:
            self._stop = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    def drain(self, timeout_s: float) -> None:
        """Stop admitting (new requests get "server is shutting down"), let the active ones run
        for up to `timeout_s`, then end the rest with a final error. Called again, it can only
        bring the deadline closer."""
        deadline = time.monotonic() + max(0.0, timeout_s)
        with self._wake:
            if self._drain_deadline is None or deadline < self._drain_deadline:
                self._drain_timeout_s = timeout_s
                self._drain_deadline = deadline
                log.info("draining: %d request(s) in flight, %g s to finish",
                         self.num_active + len(self._delivering), timeout_s)
            self._wake.notify()

    @property
    def draining(self) -> bool:
        return self._drain_deadline is not None

    @property
    def drained(self) -> bool:
        """Draining and nothing left: no request queued, running or awaiting its final send."""
        with self._wake:
            return (self._drain_deadline is not None and not self._incoming and not self._active
                    and not self._delivering and not self._outcomes)

    def submit(self, parsed: ParsedRequest, sink: Sink, tag: str = "") -> str:
        """Queue one parsed request; returns the engine request id."""
        rid = f"{next(self._ids)}" + (f"-{tag}" if tag else "")
        with self._wake:
            if self._stop or self._drain_deadline is not None:
                self.stats.unavailable += 1
                sink.error("server is shutting down", UNAVAILABLE)
                return rid
            self._incoming.append((rid, parsed, sink))
            self.stats.submitted += 1
            self._wake.notify()
        return rid

    @property
    def num_active(self) -> int:
        return len(self._active) + len(self._incoming)

    def num_running_waiting(self) -> tuple[int, int]:
        """(in the engine's running batch, waiting: queued here or in the scheduler). Engines
        without a scheduler count every active request as running."""
        sched = getattr(self.engine, "scheduler", None)
        if sched is None or not hasattr(sched, "running"):
            return len(self._active), len(self._incoming)
        running = len(sched.running)
        return running, max(0, len(self._active) - running) + len(self._incoming)

    def kv_cache_usage(self) -> dict:
        return self.engine.kv_cache_usage()

    # --- loop thread ---------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            warm = getattr(self.engine, "warm_up", None)   # per-thread state (cuDNN plans):
            if warm is not None:                            # built here, before any request
                try:
                    log.info("engine warm-up: %s", warm())
                except Exception:        # noqa: BLE001 - serving works without it, only slower
                    log.error("engine warm-up failed: %s", traceback.format_exc())
            while True:
                with self._wake:
                    if (not self._stop and not self._incoming and not self._outcomes
                            and not self._cancelled and not self.engine.has_unfinished()):
                        self._wake.wait(self.idle_wait_s)
                    if self._stop:
                        break
                    incoming = list(self._incoming)
                    self._incoming.clear()
                try:
                    self._handle_outcomes()
                    for item in incoming:
                        self._admit(*item)
                    self._check_drain_deadline()
                    self._check_cancelled()
                    if self.engine.has_unfinished():
                        self._step()
                except Exception:        # noqa: BLE001 - keep serving; _step handles engine errors
                    log.error("engine loop error: %s", traceback.format_exc())
                    time.sleep(0.01)
                self._notify()
        finally:
            self._shutdown()

    def _admit(self, rid: str, parsed: ParsedRequest, sink: Sink) -> None:
        prompt = parsed.prompt_ids if parsed.prompt_ids is not None else parsed.prompt
        try:
            self.engine.add_request(rid, prompt, parsed.params)
        except ValueError as e:           # empty / too long prompt, bad params
            self.stats.rejected += 1
            self._safe_error(sink, f"bad request: {e}", INVALID_ARGUMENT, rid)
            return
        except Exception as e:           # noqa: BLE001 - a broken request must not kill the loop
            self.stats.failed += 1
            log.error("add_request failed: %s", traceback.format_exc())
            self._safe_error(sink, f"internal error while adding the request: {type(e).__name__}: {e}",
                             rid=rid)
            return
        self._active[rid] = _Active(sink, parsed.stream, time.monotonic())

    def _poll_cancelled(self) -> None:          # cancel-poller thread
        interval = max(self.cancel_check_interval_s, 0.002)
        while not self._stop:
            time.sleep(interval)
            # list() of a dict's items runs without releasing the GIL: a consistent snapshot
            for rid, a in list(self._active.items()):
                try:
                    cancelled = a.sink.is_cancelled()
                except Exception:        # noqa: BLE001 - a dead request counts as cancelled
                    cancelled = True
                if cancelled:
                    with self._wake:
                        self._cancelled.append((rid, a))
                        self._wake.notify()

    def _check_cancelled(self) -> None:
        while self._cancelled:
            rid, a = self._cancelled.popleft()
            if self._active.get(rid) is not a:     # finished, or reported twice
                continue
            self._abort(rid)
            self.stats.cancelled += 1
            self._safe_error(a.sink, "request cancelled", CANCELLED, rid)

    def _check_drain_deadline(self) -> None:
        if self._drain_deadline is None or time.monotonic() < self._drain_deadline:
            return
        for rid, a in list(self._active.items()):
            self._abort(rid)
            self.stats.unavailable += 1
            self._safe_error(a.sink, "server is shutting down: the request did not finish "
                             f"within the drain timeout ({self._drain_timeout_s:g} s)",
                             UNAVAILABLE, rid)

    def _outcome(self, rid: str, delivered: bool) -> None:   # outbox thread
        with self._wake:
            self._outcomes.append((rid, delivered))
            self._wake.notify()

    def _handle_outcomes(self) -> None:
        """Count finished requests when their final response is delivered; a failed send aborts
        a request still running. Requests already cancelled or failed are not counted again."""
        while self._outcomes:
            rid, delivered = self._outcomes.popleft()
            if rid in self._delivering:
                self._delivering.discard(rid)
                if delivered:
                    self.stats.completed += 1
                else:
                    self.stats.failed += 1
            elif not delivered and rid in self._active:
                sink = self._active[rid].sink
                self._abort(rid)
                self.stats.failed += 1
                # the outbox drops it (the client is gone) and forgets the request with it
                self._safe_error(sink, "response delivery failed", rid=rid)

    def _abort(self, rid: str) -> None:
        self._active.pop(rid, None)
        try:
            self.engine.abort_request(rid)
        except Exception:                # noqa: BLE001
            log.error("abort_request(%s) failed: %s", rid, traceback.format_exc())

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as e:           # noqa: BLE001
            # The engine state of the batch is unknown: fail every active request, free their pages.
            log.error("engine step failed: %s", traceback.format_exc())
            for rid, a in list(self._active.items()):
                self._abort(rid)
                self.stats.failed += 1
                self._safe_error(a.sink, f"internal error in the engine step: {type(e).__name__}: {e}",
                                 rid=rid)
            return
        self.stats.steps += 1
        self._notify()           # metrics first: a client that reacts to a token sees them
        for out in outputs:
            rid = out.request_id
            a = self._active.get(rid)
            if a is None:
                continue
            final = bool(out.finished)
            what = _Outbox.FINAL if final else _Outbox.CHUNK
            if a.stream:
                # one response per step that produced tokens, even when they decode to no text
                # yet (a split UTF-8 character; a random-weight engine's ids outside its byte
                # vocabulary): clients time tokens by num_output_tokens
                if out.new_text or final or out.num_output_tokens > a.sent_tokens:
                    self._outbox.post(rid, functools.partial(
                        a.sink.send, out.new_text, out.num_prompt_tokens, out.num_output_tokens,
                        out.finish_reason if final else None, final), what)
                    a.sent_tokens = out.num_output_tokens
            else:
                a.parts.append(out.new_text)
                if final:
                    self._outbox.post(rid, functools.partial(
                        a.sink.send, "".join(a.parts), out.num_prompt_tokens,
                        out.num_output_tokens, out.finish_reason, True), what)
            if final:
                self._active.pop(rid, None)
                self._delivering.add(rid)

    def _notify(self) -> None:
        if self.on_step is not None:
            try:
                self.on_step(self)
            except Exception:            # noqa: BLE001 - metrics must never stop serving
                log.warning("on_step failed: %s", traceback.format_exc())

    def _shutdown(self) -> None:
        with self._wake:
            pending = list(self._incoming)
            self._incoming.clear()
        for _, _, sink in pending:
            self._safe_error(sink, "server is shutting down", UNAVAILABLE)
        for rid, a in list(self._active.items()):
            self._abort(rid)
            self._safe_error(a.sink, "server is shutting down", UNAVAILABLE, rid)
        self._outbox.close()

    def _safe_error(self, sink: Sink, message: str, kind: str = INTERNAL, rid: str = "") -> None:
        """A final error response, after whatever was posted for the request before it (and
        not at all to a client whose earlier send failed)."""
        self._outbox.post(rid, functools.partial(sink.error, message, kind), _Outbox.ERROR)

