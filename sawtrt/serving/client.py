"""gRPC streaming client for a sawtrt (or TensorRT-LLM-compatible) Triton model.

    from sawtrt.serving.client import generate
    r = generate("127.0.0.1:8001", "The capital of France is", max_tokens=16)
    print(r.text, r.finish_reason, r.ttft_s)

One call = one gRPC stream = one request, so concurrent callers (threads) are independent users.
`r.error` holds the server's error message (bad request, cancelled, ...) instead of raising,
so a load generator can count failures; `check()` raises it.
"""
from __future__ import annotations

import itertools
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

_ids = itertools.count()
_ids_lock = threading.Lock()


class GenerationError(RuntimeError):
    pass


@dataclass
class StreamResult:
    text: str = ""
    num_input_tokens: int = 0
    num_output_tokens: int = 0
    finish_reason: str | None = None
    error: str | None = None
    t_start: float = 0.0
    t_first: float | None = None              # first response carrying text or tokens
    t_end: float | None = None
    chunk_times: list = field(default_factory=list)   # (time, num_output_tokens) per response
    cancelled_by_client: bool = False

    @property
    def ok(self) -> bool:
        return self.error is None and self.finish_reason is not None

    @property
    def ttft_s(self) -> float | None:
        return None if self.t_first is None else self.t_first - self.t_start

    @property
    def latency_s(self) -> float | None:
        return None if self.t_end is None else self.t_end - self.t_start

    def inter_token_latencies(self) -> list[float]:
        """Seconds per token between consecutive responses (a response may carry several tokens)."""
        out = []
        for (t0, n0), (t1, n1) in zip(self.chunk_times, self.chunk_times[1:]):
            if n1 > n0:
                out += [(t1 - t0) / (n1 - n0)] * (n1 - n0)
        return out

    def check(self) -> "StreamResult":
        if self.error is not None:
            raise GenerationError(self.error)
        return self


def make_inputs(prompt: str, max_tokens: int, *, temperature: float | None = None,
                top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                stop: Sequence[str] = (), stream: bool = True, ignore_eos: bool | None = None,
                cap_max_tokens: bool | None = None):
    """tritonclient InferInputs with the TensorRT-LLM names and [1, 1] shapes. ValueError for
    a value its tensor's type cannot hold (numpy would wrap an int32 around)."""
    import tritonclient.grpc as grpcclient

    for name, v, lo, hi in (("max_tokens", max_tokens, -2**31, 2**31 - 1),
                            ("top_k", top_k, -2**31, 2**31 - 1), ("seed", seed, 0, 2**64 - 1)):
        if v is not None and not lo <= v <= hi:
            raise ValueError(f"{name} {v} does not fit the model's input (in [{lo}, {hi}])")

    def tensor(name, arr, dtype):
        t = grpcclient.InferInput(name, list(arr.shape), dtype)
        t.set_data_from_numpy(arr)
        return t

    ins = [tensor("text_input", np.array([[prompt.encode("utf-8")]], dtype=np.object_), "BYTES"),
           tensor("max_tokens", np.array([[max_tokens]], dtype=np.int32), "INT32"),
           tensor("stream", np.array([[stream]], dtype=bool), "BOOL")]
    if temperature is not None:
        ins.append(tensor("temperature", np.array([[temperature]], dtype=np.float32), "FP32"))
    if top_k is not None:
        ins.append(tensor("top_k", np.array([[top_k]], dtype=np.int32), "INT32"))
    if top_p is not None:
        ins.append(tensor("top_p", np.array([[top_p]], dtype=np.float32), "FP32"))
    if seed is not None:
        ins.append(tensor("seed", np.array([[seed]], dtype=np.uint64), "UINT64"))
    if stop:
        ins.append(tensor("stop_words",
                          np.array([[s.encode("utf-8") for s in stop]], dtype=np.object_), "BYTES"))
    if ignore_eos is not None:
        ins.append(tensor("ignore_eos", np.array([[ignore_eos]], dtype=bool), "BOOL"))
    if cap_max_tokens is not None:
        ins.append(tensor("cap_max_tokens", np.array([[cap_max_tokens]], dtype=bool), "BOOL"))
    return ins


def stream_infer(url: str, inputs, *, model: str = "sawtrt", timeout: float = 300.0,
                 on_delta: Callable[[str], None] | None = None,
                 cancel_after: int | None = None) -> StreamResult:
    """Send prepared `inputs` on a fresh gRPC stream and collect the responses until FINAL.

    cancel_after: cancel the stream (as a disconnecting client would) after that many responses.
    Timeout: total seconds for the request; on expiry the stream is cancelled and `error` set.
    """
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    res = StreamResult(t_start=time.perf_counter())
    q: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(url)
    finished = False
    with _ids_lock:
        rid = f"c{next(_ids)}"
    try:
        client.start_stream(callback=lambda result, error: q.put((time.perf_counter(), result, error)))
        try:
            client.async_stream_infer(model, inputs, request_id=rid,
                                      enable_empty_final_response=True)
        except InferenceServerException as e:
            # the stream broke before the request went out (nothing listening): the callback
            # has the cause, this exception only that the stream is no longer valid
            try:
                error = q.get(timeout=1.0)[2] or e
            except queue.Empty:
                error = e
            res.error = error.message() if isinstance(error, InferenceServerException) \
                else str(error)
            res.t_end = time.perf_counter()
            finished = True
            return res
        deadline = res.t_start + timeout
        n_responses = 0
        while True:
            left = deadline - time.perf_counter()
            if left <= 0:
                res.error = f"client timeout after {timeout:.0f} s"
                break
            try:
                t, result, error = q.get(timeout=left)
            except queue.Empty:
                continue
            if error is not None:
                res.error = error.message() if isinstance(error, InferenceServerException) else str(error)
                res.t_end = t
                finished = True
                break
            resp = result.get_response()
            final = resp.parameters["triton_final_response"].bool_param \
                if "triton_final_response" in resp.parameters else True
            if resp.outputs:
                delta = result.as_numpy("text_output")
                delta = b"" if delta is None else delta.reshape(-1)[0]
                delta = delta.decode("utf-8") if isinstance(delta, bytes) else str(delta)
                n_out = result.as_numpy("num_output_tokens")
                n_in = result.as_numpy("num_input_tokens")
                reason = result.as_numpy("finish_reason")
                if n_out is not None:
                    res.num_output_tokens = int(n_out.reshape(-1)[0])
                if n_in is not None:
                    res.num_input_tokens = int(n_in.reshape(-1)[0])
                if (delta or res.num_output_tokens > 0) and res.t_first is None:
                    res.t_first = t
                res.text += delta
                res.chunk_times.append((t, res.num_output_tokens))
                if on_delta is not None and delta:
                    on_delta(delta)
                if final and reason is not None:
                    r = reason.reshape(-1)[0]
                    res.finish_reason = (r.decode() if isinstance(r, bytes) else str(r)) or None
                n_responses += 1
            if final:
                res.t_end = t
                finished = True
                break
            if cancel_after is not None and n_responses >= cancel_after:
                res.cancelled_by_client = True
                res.t_end = t
                break
    finally:
        try:
            client.stop_stream(cancel_requests=not finished)
        finally:
            client.close()
    return res


def generate(url: str, prompt: str, max_tokens: int = 64, *, model: str = "sawtrt",
             timeout: float = 300.0, on_delta: Callable[[str], None] | None = None,
             cancel_after: int | None = None, **sampling) -> StreamResult:
    """Stream one prompt; see make_inputs for the sampling keywords."""
    inputs = make_inputs(prompt, max_tokens, **sampling)
    return stream_infer(url, inputs, model=model, timeout=timeout, on_delta=on_delta,
                        cancel_after=cancel_after)
