"""`TritonPythonModel` for Triton's Python backend (decoupled mode): a thin adapter over
`sawtrt.serving.backend`. Importable only inside the Python backend stub, where
`triton_python_backend_utils` exists; see triton_repo.py for the tensors.

initialize: load the engine directory named by the `engine_dir` config parameter (or
            $SAWTRT_ENGINE_DIR when the parameter is the template placeholder), start the loop;
            with $SAWTRT_CONTROL_DIR set (sawtrt serve sets it), watch it for a drain order.
execute:    parse and tokenize each request (here, not on the engine loop); a bad one gets an
            error response at once, a good one is queued. Returns None (decoupled): responses
            are sent from the loop's response thread.
finalize:   stop the loop; requests still running get "server is shutting down".

Metrics (on Triton's metrics port, label model=<name>):
  sawtrt_kv_cache_used_pages / sawtrt_kv_cache_total_pages / sawtrt_kv_cache_page_size,
  sawtrt_kv_cache_usage_ratio (gauges), sawtrt_active_requests (queued + running),
  sawtrt_num_requests_running / sawtrt_num_requests_waiting (gauges),
  sawtrt_requests{outcome=completed|rejected|cancelled|failed|unavailable} (counter).
"""
from __future__ import annotations

import json
import logging
import os
import time

import numpy as np
import triton_python_backend_utils as pb_utils

from sawtrt.serving.backend import (CANCELLED, INPUT_NAMES, INTERNAL, INVALID_ARGUMENT,
                                    UNAVAILABLE, EngineLoop, RequestError, check_context,
                                    parse_request)
from sawtrt.serving.control import CONTROL_DIR_ENV, watch_control_dir
from sawtrt.serving.triton_repo import ENGINE_DIR_PLACEHOLDER

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
METRICS_INTERVAL_S = 0.1
# backend error kinds -> pb_utils.TritonError code names
_CODES = {INVALID_ARGUMENT: "INVALID_ARG", CANCELLED: "CANCELLED", UNAVAILABLE: "UNAVAILABLE",
          INTERNAL: "INTERNAL"}


def _error(message: str, code_name: str = "INVALID_ARG"):
    code = getattr(pb_utils.TritonError, code_name, None)
    if code is None:
        return pb_utils.TritonError(message)
    return pb_utils.TritonError(message, code)


class _TritonLogHandler(logging.Handler):
    def emit(self, record):
        msg = self.format(record)
        if record.levelno >= logging.ERROR:
            pb_utils.Logger.log_error(msg)
        elif record.levelno >= logging.WARNING:
            pb_utils.Logger.log_warn(msg)
        else:
            pb_utils.Logger.log_info(msg)


class _ResponseSink:
    """One Triton request's response sender, seen as a backend.Sink."""

    def __init__(self, request):
        self.request = request
        self.sender = request.get_response_sender()
        self.closed = False

    def send(self, text, num_input_tokens, num_output_tokens, finish_reason, final):
        tensors = [
            pb_utils.Tensor("text_output", np.array([[text.encode("utf-8")]], dtype=np.object_)),
            pb_utils.Tensor("num_input_tokens", np.array([[num_input_tokens]], dtype=np.int32)),
            pb_utils.Tensor("num_output_tokens", np.array([[num_output_tokens]], dtype=np.int32)),
            pb_utils.Tensor("finish_reason",
                            np.array([[(finish_reason or "").encode()]], dtype=np.object_)),
        ]
        self.sender.send(pb_utils.InferenceResponse(output_tensors=tensors),
                         flags=FINAL if final else 0)
        self.closed = final

    def error(self, message, kind=INTERNAL):
        if self.closed:
            return
        self.closed = True
        self.sender.send(pb_utils.InferenceResponse(error=_error(message,
                                                                 _CODES.get(kind, "INTERNAL"))),
                         flags=FINAL)

    def is_cancelled(self):
        return self.request.is_cancelled()


class TritonPythonModel:
    def initialize(self, args):
        self.model_config = json.loads(args["model_config"])
        self.model_name = args.get("model_name", self.model_config.get("name", "sawtrt"))
        if not pb_utils.using_decoupled_model_transaction_policy(self.model_config):
            raise pb_utils.TritonModelException(
                "the sawtrt model must run in decoupled mode (model_transaction_policy.decoupled)")
        handler = _TritonLogHandler()
        handler.setFormatter(logging.Formatter("sawtrt: %(message)s"))
        logger = logging.getLogger("sawtrt")
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)

        params = {k: v.get("string_value", "") for k, v in self.model_config.get("parameters", {}).items()}
        engine_dir = params.get("engine_dir", "")
        if not engine_dir or engine_dir == ENGINE_DIR_PLACEHOLDER:
            engine_dir = os.environ.get("SAWTRT_ENGINE_DIR", "")
        if not engine_dir:
            raise pb_utils.TritonModelException(
                "no engine directory: set the `engine_dir` parameter in config.pbtxt "
                "(sawtrt build / write_model_repository do) or $SAWTRT_ENGINE_DIR")
        device = params.get("device") or None
        from sawtrt.engine.options import EngineOptions
        try:
            options = EngineOptions.from_params(params)
        except ValueError as e:
            raise pb_utils.TritonModelException(f"config.pbtxt parameters: {e}") from None

        logger.info(f"loading engine {engine_dir} (device {device or 'default'}; "
                    f"{options.describe()})")
        self.engine = options.load(engine_dir, device)   # heavy import: torch, the model
        from sawtrt.engine.llm_engine import freeze_gc
        freeze_gc()
        self._init_metrics()
        self.loop = EngineLoop(self.engine, on_step=self._update_metrics).start()
        self._update_metrics(self.loop)
        control = os.environ.get(CONTROL_DIR_ENV)
        if control:
            watch_control_dir(self.loop, control)
        logger.info(f"engine ready: max_seq_len={self.engine.max_seq_len}, "
                    f"kv cache {self.engine.kv_cache_usage()}")

    # --- metrics -----------------------------------------------------------------------------
    def _init_metrics(self):
        labels = {"model": self.model_name}
        gauge, counter = pb_utils.MetricFamily.GAUGE, pb_utils.MetricFamily.COUNTER
        self._families = {
            "used": pb_utils.MetricFamily("sawtrt_kv_cache_used_pages",
                                          "KV-cache pages held by requests", gauge),
            "total": pb_utils.MetricFamily("sawtrt_kv_cache_total_pages",
                                           "KV-cache pages in the pool", gauge),
            "page_size": pb_utils.MetricFamily("sawtrt_kv_cache_page_size",
                                               "tokens per KV-cache page", gauge),
            "active": pb_utils.MetricFamily("sawtrt_active_requests",
                                            "requests queued or running in the engine", gauge),
            "running": pb_utils.MetricFamily("sawtrt_num_requests_running",
                                             "requests in the engine's running batch", gauge),
            "waiting": pb_utils.MetricFamily("sawtrt_num_requests_waiting",
                                             "requests waiting for a batch slot or pages", gauge),
            "usage": pb_utils.MetricFamily("sawtrt_kv_cache_usage_ratio",
                                           "fraction of the KV-cache pages in use", gauge),
            "requests": pb_utils.MetricFamily("sawtrt_requests",
                                              "finished requests by outcome", counter),
        }
        f = self._families
        self._gauges = {k: f[k].Metric(labels=labels)
                        for k in ("used", "total", "page_size", "active", "running", "waiting",
                                  "usage")}
        self._counters = {o: f["requests"].Metric(labels={**labels, "outcome": o})
                          for o in ("completed", "rejected", "cancelled", "failed", "unavailable")}
        self._last = {}
        self._rejected_here = 0
        self._last_update_t = 0.0

    def _update_metrics(self, loop):
        # each changed value is an IPC round trip to tritonserver: at most every 100 ms while
        # requests run (not once per step), always when idle (so idle values are exact)
        if loop.num_active:
            now = time.monotonic()
            if now - self._last_update_t < METRICS_INTERVAL_S:
                return
            self._last_update_t = now
        kv = loop.kv_cache_usage()
        running, waiting = loop.num_running_waiting()
        values = {"used": kv["used_pages"], "total": kv["total_pages"],
                  "page_size": kv["page_size"], "active": loop.num_active,
                  "running": running, "waiting": waiting,
                  "usage": kv["used_pages"] / max(1, kv["total_pages"])}
        for k, v in values.items():
            if self._last.get(k) != v:
                self._gauges[k].set(float(v))
                self._last[k] = v
        s = loop.stats
        counts = {"completed": s.completed, "rejected": s.rejected + self._rejected_here,
                  "cancelled": s.cancelled, "failed": s.failed, "unavailable": s.unavailable}
        for k, v in counts.items():
            delta = v - self._last.get(("n", k), 0)
            if delta > 0:
                self._counters[k].increment(float(delta))
                self._last[("n", k)] = v

    # --- requests ----------------------------------------------------------------------------
    def execute(self, requests):
        for request in requests:
            try:
                inputs = {}
                for name in INPUT_NAMES:
                    t = pb_utils.get_input_tensor_by_name(request, name)
                    inputs[name] = None if t is None else t.as_numpy()
                parsed = check_context(parse_request(inputs), self.engine.tokenizer,
                                       self.engine.max_seq_len)
            except RequestError as e:
                self._rejected_here += 1
                request.get_response_sender().send(
                    pb_utils.InferenceResponse(error=_error(f"bad request: {e}")), flags=FINAL)
                continue
            except Exception as e:       # noqa: BLE001 - never let one request take the model down
                request.get_response_sender().send(
                    pb_utils.InferenceResponse(error=_error(
                        f"internal error while parsing the request: {type(e).__name__}: {e}",
                        "INTERNAL")), flags=FINAL)
                continue
            self.loop.submit(parsed, _ResponseSink(request), tag=request.request_id() or "")
        return None

    def finalize(self):
        loop = getattr(self, "loop", None)
        if loop is not None:
            loop.stop()
