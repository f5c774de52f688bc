"""OpenAI-compatible HTTP API in front of the Triton model (FastAPI + uvicorn).

    /v1/models, /v1/completions, /v1/chat/completions (streaming SSE ending in `data: [DONE]`,
    or one JSON body), /health, /metrics

Every generation goes to tritonserver as one gRPC stream (tritonclient's asyncio client), so
Triton stays the deployment unit: this process holds no engine, only the chat template, the
engine's max_seq_len and the serving metrics. `sawtrt serve` runs it next to tritonserver.

Requests are checked here (unsupported fields, n != 1, bad types: a 400 in OpenAI's error shape)
and by the backend (sampling values, prompt + max_tokens over max_seq_len); the backend's errors
map to status codes by kind: "bad request" 400, "server is shutting down" 503, others 500.
A request without max_tokens generates up to the context limit (cap_max_tokens); one with it
gets a 400 when it does not fit, unless the body says `"cap_max_tokens": true`.

Metrics (prometheus_client, this process's /metrics, which appends tritonserver's own text):
see METRICS below and docs/serving.md.
"""

import asyncio
import contextlib
import functools
import itertools
import json
import logging
import time
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("sawtrt.openai")

DEFAULT_MAX_TOKENS_COMPLETIONS = 16      # OpenAI's default for /v1/completions
MAX_STOP = 4                             # OpenAI: up to 4 stop sequences

# fields a body may carry that change nothing here (accepted silently)
_IGNORED = {"model", "user", "stream_options", "metadata", "store", "service_tier",
            "parallel_tool_calls", "cap_max_tokens"}
_COMMON = {"max_tokens", "temperature", "top_p", "seed", "stop", "n", "stream", "top_k",
           "ignore_eos", "frequency_penalty", "presence_penalty", "logit_bias", "logprobs"}
_COMPLETION_FIELDS = _COMMON | {"prompt", "echo", "best_of", "suffix"}
_CHAT_FIELDS = _COMMON | {"messages", "max_completion_tokens", "top_logprobs", "tools",
                          "tool_choice", "response_format", "functions", "function_call",
                          "modalities", "reasoning_effort"}


class APIError(Exception):
    def __init__(self, status: int, message: str, *, type_: str | None = None,
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type_ or {400: "invalid_request_error", 404: "not_found_error",
                              503: "service_unavailable"}.get(status, "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code if self.code is not None else self.status}}


def _bad(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param=param)


# ---------------------------------------------------------------------------------------------
# Request bodies -> generation parameters
# ---------------------------------------------------------------------------------------------

@dataclass
class GenRequest:
    prompt: str
    max_tokens: int
    cap_max_tokens: bool
    temperature: float
    top_p: float | None
    top_k: int | None
    seed: int | None
    stop: tuple
    stream: bool
    include_usage: bool
    ignore_eos: bool | None


_INT32_MAX = 2**31 - 1       # the backend's INT32 inputs (max_tokens, top_k)
_FLOAT32_MAX = 3.4028234663852886e38


def _number(body, name, lo=None, hi=None, integer=False):
    v = body.get(name)
    if v is None:
        return None
    ok = isinstance(v, int) if integer else isinstance(v, (int, float))
    if isinstance(v, bool) or not ok:
        raise _bad(f"'{name}' must be {'an integer' if integer else 'a number'}, got {v!r}", name)
    if lo is not None and v < lo or hi is not None and v > hi:
        raise _bad(f"'{name}' must be in [{lo}, {hi}], got {v!r}", name)
    if not integer and not abs(v) <= _FLOAT32_MAX:         # NaN too: the backend takes FP32
        raise _bad(f"'{name}' must be a finite 32-bit float, got {v!r}", name)
    return v


def _common(body: dict, allowed: set, *, default_max_tokens: int | None,
            max_seq_len: int) -> dict:
    unknown = sorted(set(body) - allowed - _IGNORED)
    if unknown:
        raise _bad(f"unsupported field(s) {unknown}", unknown[0])
    n = _number(body, "n", integer=True)
    if n is not None and n != 1:
        raise _bad(f"only n=1 is supported, got n={n}", "n")
    for name in ("frequency_penalty", "presence_penalty"):
        if _number(body, name) not in (None, 0, 0.0):
            raise _bad(f"'{name}' is not supported (only 0)", name)
    if body.get("logit_bias"):
        raise _bad("'logit_bias' is not supported", "logit_bias")
    if body.get("logprobs") is not None and body.get("logprobs") is not False:
        raise _bad("'logprobs' is not supported", "logprobs")    # 0 too: 0 == False
    stream = body.get("stream", False)
    if not isinstance(stream, bool) and stream is not None:
        raise _bad(f"'stream' must be a boolean, got {stream!r}", "stream")
    opts = body.get("stream_options") or {}
    if not isinstance(opts, dict):
        raise _bad("'stream_options' must be an object", "stream_options")
    if opts and not stream:
        raise _bad("'stream_options' is only allowed with stream=true", "stream_options")
    stop = body.get("stop")
    if stop is None:
        stop = ()
    elif isinstance(stop, str):
        stop = (stop,)
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        if len(stop) > MAX_STOP:
            raise _bad(f"'stop' takes at most {MAX_STOP} sequences, got {len(stop)}", "stop")
        stop = tuple(stop)
    else:
        raise _bad("'stop' must be a string or a list of strings", "stop")
    max_tokens = _number(body, "max_completion_tokens", integer=True)
    if max_tokens is None:
        max_tokens = _number(body, "max_tokens", integer=True)
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    if max_tokens is not None and not 1 <= max_tokens <= _INT32_MAX:
        raise _bad(f"'{name}' must be in [1, {_INT32_MAX}], got {max_tokens}", name)
    cap = body.get("cap_max_tokens", False)
    if not isinstance(cap, bool):
        raise _bad(f"'cap_max_tokens' must be a boolean, got {cap!r}", "cap_max_tokens")
    if max_tokens is None:
        max_tokens = default_max_tokens
    if max_tokens is None:          # chat: as many as fit (the backend caps at the context)
        max_tokens, cap = max_seq_len, True
    temperature = _number(body, "temperature")
    top_p = _number(body, "top_p")
    top_k = _number(body, "top_k", hi=_INT32_MAX, integer=True)
    seed = _number(body, "seed", integer=True)
    if seed is not None and not 0 <= seed < 2**63:
        raise _bad(f"'seed' must be in [0, 2^63), got {seed}", "seed")
    ignore_eos = body.get("ignore_eos")
    if ignore_eos is not None and not isinstance(ignore_eos, bool):
        raise _bad("'ignore_eos' must be a boolean", "ignore_eos")
    return dict(max_tokens=max_tokens, cap_max_tokens=cap,
                temperature=1.0 if temperature is None else temperature,   # OpenAI's default
                top_p=top_p, top_k=top_k if top_k not in (None, -1) else None, seed=seed,
                stop=stop, stream=bool(stream), include_usage=bool(opts.get("include_usage")),
                ignore_eos=ignore_eos)


def parse_completion(body: dict, max_seq_len: int) -> GenRequest:
    if body.get("echo"):
        raise _bad("'echo' is not supported", "echo")
    if body.get("suffix"):
        raise _bad("'suffix' is not supported", "suffix")
    best_of = body.get("best_of")
    if best_of is not None and (isinstance(best_of, bool) or best_of != 1):
        raise _bad("'best_of' must be 1", "best_of")
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, list) and all(isinstance(p, str) for p in prompt):
        raise _bad(f"one prompt per request (got a list of {len(prompt)})", "prompt")
    if not isinstance(prompt, str):
        raise _bad("'prompt' must be a string (token-id prompts are not supported)", "prompt")
    if not prompt:
        raise _bad("'prompt' is empty", "prompt")
    return GenRequest(prompt=prompt, **_common(body, _COMPLETION_FIELDS,
                                               default_max_tokens=DEFAULT_MAX_TOKENS_COMPLETIONS,
                                               max_seq_len=max_seq_len))


_ROLES = {"system", "developer", "user", "assistant", "tool"}


def _content_text(i: int, content) -> str:
    if isinstance(content, str):
        return content
    if content is None:
        return ""
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" \
                    or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise _bad(f"messages[{i}].content: only text parts are supported, got {kind!r}",
                           "messages")
            parts.append(part["text"])
        return "".join(parts)
    raise _bad(f"messages[{i}].content must be a string or a list of text parts", "messages")


def render_chat(template: str, messages) -> str:
    """The model's own chat template (jinja2, sandboxed as in transformers) over `messages`."""
    if not isinstance(messages, list) or not messages:
        raise _bad("'messages' must be a non-empty list", "messages")
    msgs = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise _bad(f"messages[{i}] must be an object with a 'role'", "messages")
        role = m["role"]
        if role not in _ROLES:
            raise _bad(f"messages[{i}].role {role!r} is not one of {sorted(_ROLES)}", "messages")
        msgs.append({"role": "system" if role == "developer" else role,
                     "content": _content_text(i, m.get("content"))})
    from jinja2 import TemplateError
    try:
        return _compiled_chat_template(template).render(
            messages=msgs, add_generation_prompt=True, bos_token="", eos_token="")
    except TemplateError as e:
        raise _bad(f"the model's chat template refused these messages: {e}", "messages") from None


@functools.lru_cache(maxsize=8)
def _compiled_chat_template(template: str):
    """The template compiled once (~2 ms for SmolLM2's, on the event loop of every chat
    request otherwise); a template that fails to compile is not cached and fails each time."""
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template)


def parse_chat(body: dict, chat_template: str | None, max_seq_len: int) -> GenRequest:
    for name in ("tools", "functions"):
        if body.get(name):
            raise _bad(f"'{name}' is not supported", name)
    rf = body.get("response_format")
    if rf not in (None, {"type": "text"}):
        raise _bad("'response_format' other than text is not supported", "response_format")
    if body.get("top_logprobs") is not None:
        raise _bad("'top_logprobs' is not supported", "top_logprobs")
    if not chat_template:
        raise _bad("this engine's tokenizer has no chat template; use /v1/completions", "messages")
    prompt = render_chat(chat_template, body.get("messages"))
    return GenRequest(prompt=prompt, **_common(body, _CHAT_FIELDS, default_max_tokens=None,
                                               max_seq_len=max_seq_len))


# ---------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------

_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                    7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075,
                0.1, 0.2, 0.4, 0.8, 1.6, 5.0)
OUTCOMES = ("completed", "rejected", "cancelled", "failed", "unavailable")


class Metrics:
    """What clients of this API saw, in vLLM's spirit (names prefixed sawtrt_)."""

    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
        self.registry = r = CollectorRegistry()
        self.ttft = Histogram("sawtrt_time_to_first_token_seconds",
                              "time from request arrival to its first output token",
                              registry=r, buckets=_LATENCY_BUCKETS)
        self.itl = Histogram("sawtrt_inter_token_latency_seconds",
                             "time between consecutive output tokens of a request", registry=r,
                             buckets=_ITL_BUCKETS)
        self.e2e = Histogram("sawtrt_e2e_request_latency_seconds",
                             "time from request arrival to its last token", registry=r,
                             buckets=_LATENCY_BUCKETS)
        self.prompt_tokens = Counter("sawtrt_prompt_tokens", "prompt tokens of finished requests",
                                     registry=r)
        self.generation_tokens = Counter("sawtrt_generation_tokens",
                                         "output tokens sent to clients", registry=r)
        self.requests = Counter("sawtrt_api_requests", "API generation requests by outcome "
                                "(as the client saw it)", ["outcome"], registry=r)
        self.success = Counter("sawtrt_request_success", "completed requests by finish reason",
                               ["finished_reason"], registry=r)
        self.in_flight = Gauge("sawtrt_api_requests_in_flight",
                               "generation requests this API is serving now", registry=r)
        for o in OUTCOMES:
            self.requests.labels(o)
        for reason in ("stop", "length"):
            self.success.labels(reason)


# ---------------------------------------------------------------------------------------------
# The app
# ---------------------------------------------------------------------------------------------

class _Generation:
    """One request's stream state, for metrics."""

    def __init__(self, t0: float):
        self.t0 = t0
        self.t_last: float | None = None
        self.n_out = 0
        self.n_in = 0


def _map_backend_error(message: str) -> APIError:
    if message.startswith("bad request"):
        return APIError(400, message.removeprefix("bad request: "))
    if "server is shutting down" in message:
        return APIError(503, message)
    return APIError(500, message)


class OpenAIFrontend:
    """The FastAPI app and its state. `grpc_url`: tritonserver's gRPC address."""

    def __init__(self, grpc_url: str, *, served_model_name: str, triton_model: str = "sawtrt",
                 chat_template: str | None = None, max_seq_len: int,
                 triton_metrics_url: str | None = None):
        self.grpc_url, self.triton_model = grpc_url, triton_model
        self.served_model_name = served_model_name
        self.chat_template, self.max_seq_len = chat_template, max_seq_len
        self.triton_metrics_url = triton_metrics_url
        # how often a request without a stream asks whether its client is still there
        self.disconnect_poll_s = 0.25
        self.metrics = Metrics()
        self.draining = False
        self.in_flight = 0
        self.created = int(time.time())
        self._client = None
        self._ids = itertools.count()
        self.app = self._make_app()

    @classmethod
    def for_engine(cls, engine_dir, grpc_url: str, served_model_name: str | None = None,
                   **kwargs) -> "OpenAIFrontend":
        engine_dir = Path(engine_dir)
        cfg = json.loads((engine_dir / "config.json").read_text())
        tok_cfg_path = engine_dir / "tokenizer_config.json"
        tok_cfg = json.loads(tok_cfg_path.read_text()) if tok_cfg_path.is_file() else {}
        name = served_model_name or cfg.get("model", {}).get("name") or engine_dir.name
        return cls(grpc_url, served_model_name=name, chat_template=tok_cfg.get("chat_template"),
                   max_seq_len=int(cfg["limits"]["max_seq_len"]), **kwargs)

    # --- the gRPC side ----------------------------------------------------------------------
    def _grpc(self):
        if self._client is None:
            import tritonclient.grpc.aio as grpcaio
            self._client = grpcaio.InferenceServerClient(self.grpc_url)
        return self._client

    async def close(self):
        if self._client is not None:
            await self._client.close()
            self._client = None

    async def _stream(self, g: GenRequest, rid: str):
        """Yield (delta, n_in, n_out, finish_reason or None) from tritonserver; APIError on an
        error response. The stream is cancelled if the consumer stops early."""
        from sawtrt.serving.client import make_inputs
        inputs = make_inputs(g.prompt, g.max_tokens, temperature=g.temperature, top_k=g.top_k,
                             top_p=g.top_p, seed=g.seed, stop=g.stop, stream=True,
                             ignore_eos=g.ignore_eos, cap_max_tokens=g.cap_max_tokens or None)

        async def one_request():
            yield {"model_name": self.triton_model, "inputs": inputs, "request_id": rid}

        import grpc
        try:
            it = self._grpc().stream_infer(one_request())
        except Exception as e:              # noqa: BLE001
            raise APIError(503, f"inference server unavailable: {e}") from None
        done = False
        try:
            async for result, error in it:
                if error is not None:
                    done = True
                    raise _map_backend_error(error.message() if hasattr(error, "message")
                                             else str(error))
                delta = result.as_numpy("text_output")
                delta = b"" if delta is None else delta.reshape(-1)[0]
                delta = delta.decode("utf-8") if isinstance(delta, bytes) else str(delta)
                n_in = int(result.as_numpy("num_input_tokens").reshape(-1)[0])
                n_out = int(result.as_numpy("num_output_tokens").reshape(-1)[0])
                reason = result.as_numpy("finish_reason").reshape(-1)[0]
                reason = (reason.decode() if isinstance(reason, bytes) else str(reason)) or None
                if reason is not None:
                    done = True
                yield delta, n_in, n_out, reason
                if done:
                    return
        except grpc.aio.AioRpcError as e:
            done = True
            code = e.code()
            if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
                raise APIError(503, f"inference server unavailable ({code.name}): "
                                    f"{e.details()}") from None
            raise APIError(500, f"inference server error ({code.name}): {e.details()}") from None
        finally:
            if not done:
                it.cancel()           # the client went away: Triton cancels, the engine aborts
        if not done:
            raise APIError(500, "the inference server closed the stream without a final response")

    # --- accounting -------------------------------------------------------------------------
    def _on_tokens(self, st: _Generation, n_out: int, now: float) -> None:
        new = n_out - st.n_out
        if new <= 0:
            return
        m = self.metrics
        if st.n_out == 0:
            m.ttft.observe(now - st.t0)
        elif st.t_last is not None:
            per = (now - st.t_last) / new
            for _ in range(new):
                m.itl.observe(per)
        m.generation_tokens.inc(new)
        st.n_out, st.t_last = n_out, now

    def _finish(self, st: _Generation, outcome: str, reason: str | None = None) -> None:
        m = self.metrics
        m.requests.labels(outcome).inc()
        if outcome == "completed":
            m.e2e.observe(time.perf_counter() - st.t0)
            m.prompt_tokens.inc(st.n_in)
            m.success.labels(reason or "stop").inc()

    @staticmethod
    def _outcome_of(e: APIError) -> str:
        return {400: "rejected", 404: "rejected", 503: "unavailable"}.get(e.status, "failed")

    # --- the app ----------------------------------------------------------------------------
    def _make_app(self):
        from fastapi import FastAPI, Request
        from fastapi.exceptions import RequestValidationError
        from fastapi.responses import JSONResponse, Response, StreamingResponse
        from starlette.exceptions import HTTPException as StarletteHTTPException

        front = self

        @contextlib.asynccontextmanager
        async def lifespan(_app):
            yield
            await front.close()           # the gRPC channel to tritonserver, in this loop

        app = FastAPI(title="sawtrt OpenAI-compatible API", docs_url=None, redoc_url=None,
                      lifespan=lifespan)

        @app.exception_handler(APIError)
        async def _api_error(_req, e: APIError):
            return JSONResponse(e.body(), status_code=e.status)

        @app.exception_handler(StarletteHTTPException)
        async def _http_error(_req, e):
            err = APIError(e.status_code, str(e.detail),
                           type_="not_found_error" if e.status_code == 404 else None)
            return JSONResponse(err.body(), status_code=e.status_code)

        @app.exception_handler(RequestValidationError)
        async def _validation(_req, e):
            return JSONResponse(_bad(f"invalid request: {e.errors()}").body(), status_code=400)

        @app.get("/health")
        async def health():
            if front.draining:
                raise APIError(503, "server is shutting down")
            return Response(status_code=200)

        @app.get("/v1/models")
        async def models():
            return {"object": "list", "data": [front._model_card()]}

        @app.get("/v1/models/{model_id:path}")
        async def model(model_id: str):
            if model_id != front.served_model_name:
                raise APIError(404, f"model {model_id!r} not found", code="model_not_found")
            return front._model_card()

        @app.get("/metrics")
        async def metrics():
            from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
            text = generate_latest(front.metrics.registry).decode()
            if front.triton_metrics_url:
                text += await asyncio.to_thread(_fetch_text, front.triton_metrics_url)
            return Response(text, media_type=CONTENT_TYPE_LATEST)

        @app.post("/v1/completions")
        async def completions(request: Request):
            return await front._handle(request, chat=False)

        @app.post("/v1/chat/completions")
        async def chat_completions(request: Request):
            return await front._handle(request, chat=True)

        self._json_response, self._streaming_response = JSONResponse, StreamingResponse
        return app

    def _model_card(self) -> dict:
        return {"id": self.served_model_name, "object": "model", "created": self.created,
                "owned_by": "sawtrt", "max_model_len": self.max_seq_len}

    async def _body(self, request) -> dict:
        raw = await request.body()
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise _bad(f"the body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise _bad("the body must be a JSON object")
        try:            # JSON may escape half of a UTF-16 pair (\ud83d alone): not text
            json.dumps(body, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError as e:
            raise _bad(f"the body holds a lone UTF-16 surrogate ({e.object[e.start:e.end]!r}), "
                       "which is not Unicode text") from None
        return body

    async def _handle(self, request, *, chat: bool):
        st = _Generation(time.perf_counter())
        if self.draining:
            self._finish(st, "unavailable")
            raise APIError(503, "server is shutting down")
        try:
            body = await self._body(request)
            model = body.get("model")
            if not isinstance(model, str) or not model:
                raise _bad("'model' is required (GET /v1/models lists it)", "model")
            if model != self.served_model_name:
                raise APIError(404, f"model {model!r} not found; this server serves "
                                    f"{self.served_model_name!r}", code="model_not_found",
                               param="model")
            g = (parse_chat(body, self.chat_template, self.max_seq_len) if chat
                 else parse_completion(body, self.max_seq_len))
        except APIError as e:
            self._finish(st, self._outcome_of(e))
            raise
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        self.in_flight += 1
        self.metrics.in_flight.inc()
        stream = self._stream(g, rid)
        if g.stream:
            # the first response decides the status code: errors before any token are a
            # plain HTTP error, later ones an error event in the stream
            try:
                first = await stream.__anext__()
            except APIError as e:
                self._release()
                self._finish(st, self._outcome_of(e))
                raise
            except Exception as e:         # a bug of ours: an OpenAI error, counted as failed
                self._release()
                self._finish(st, "failed")
                raise _internal(e) from e
            except BaseException:          # the client disconnected (task cancelled)
                self._release()
                self._finish(st, "cancelled")
                raise
            return self._streaming_response(self._sse(stream, first, st, rid, chat, g, body),
                                            media_type="text/event-stream",
                                            headers={"Cache-Control": "no-cache"})
        text, reason = [], None

        async def collect():
            nonlocal reason
            async for delta, n_in, n_out, r in stream:
                st.n_in = n_in
                self._on_tokens(st, n_out, time.perf_counter())
                text.append(delta)
                reason = r or reason

        try:
            # The server does not cancel a handler whose client left, and a request without a
            # stream has nothing to write that would notice: ask the connection meanwhile,
            # and cancel the generation (and the engine's work) once it is gone.
            completed = await _until_disconnected(collect(), request, self.disconnect_poll_s)
        except APIError as e:
            self._finish(st, self._outcome_of(e))
            raise
        except Exception as e:             # a bug of ours: an OpenAI error, counted as failed
            self._finish(st, "failed")
            raise _internal(e) from e
        except BaseException:              # the client disconnected (task cancelled)
            self._finish(st, "cancelled")
            raise
        finally:
            await stream.aclose()
            self._release()
        if not completed:
            self._finish(st, "cancelled")
            return self._json_response(APIError(499, "the client disconnected").body(),
                                       status_code=499)
        self._finish(st, "completed", reason)
        content = "".join(text)
        choice = ({"index": 0, "message": {"role": "assistant", "content": content},
                   "logprobs": None, "finish_reason": _finish_reason(reason)} if chat else
                  {"index": 0, "text": content, "logprobs": None,
                   "finish_reason": _finish_reason(reason)})
        return {"id": rid, "object": "chat.completion" if chat else "text_completion",
                "created": int(time.time()), "model": self.served_model_name,
                "choices": [choice], "usage": _usage(st)}

    def _release(self):
        self.in_flight -= 1
        self.metrics.in_flight.dec()

    async def _sse(self, stream, first, st: _Generation, rid: str, chat: bool, g: GenRequest,
                   body: dict):
        created = int(time.time())
        obj = "chat.completion.chunk" if chat else "text_completion"
        model = self.served_model_name

        def chunk(delta: str | None, reason: str | None, role: bool = False) -> str:
            if chat:
                d = {}
                if role:
                    d["role"] = "assistant"
                if delta is not None:
                    d["content"] = delta
                choice = {"index": 0, "delta": d, "logprobs": None, "finish_reason": reason}
            else:
                choice = {"index": 0, "text": delta or "", "logprobs": None,
                          "finish_reason": reason}
            rec = {"id": rid, "object": obj, "created": created, "model": model,
                   "choices": [choice]}
            if g.include_usage:
                rec["usage"] = None
            return f"data: {json.dumps(rec, ensure_ascii=False)}\n\n"

        outcome, reason = "failed", None
        try:
            if chat:
                yield chunk("", None, role=True)
            item = first
            while True:
                delta, n_in, n_out, r = item
                st.n_in = n_in
                self._on_tokens(st, n_out, time.perf_counter())
                if r is not None:
                    reason = r
                    yield chunk(delta, _finish_reason(r))
                    break
                if delta:
                    yield chunk(delta, None)
                item = await stream.__anext__()
            if g.include_usage:
                rec = {"id": rid, "object": obj, "created": created, "model": model,
                       "choices": [], "usage": _usage(st)}
                yield f"data: {json.dumps(rec)}\n\n"
            yield "data: [DONE]\n\n"
            outcome = "completed"
        except Exception as e:                # APIError, or a bug of ours: an error event
            err = e if isinstance(e, APIError) else _internal(e)
            outcome = self._outcome_of(err)
            yield f"data: {json.dumps(err.body())}\n\n"
            yield "data: [DONE]\n\n"
        except BaseException:                 # the client disconnected
            outcome = "cancelled"
            raise
        finally:
            await stream.aclose()
            self._release()
            self._finish(st, outcome, reason)


async def _until_disconnected(work, request, poll_s: float) -> bool:
    """Await the coroutine `work`, asking every poll_s seconds whether `request`'s client is
    still connected: True once `work` is done (its exception raised), False when the client
    left first (`work` cancelled and awaited)."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=poll_s)
            if done:
                task.result()
                return True
            if await request.is_disconnected():
                return False
    finally:                      # the client left, or this handler was cancelled
        if not task.done():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task


def _internal(e: Exception) -> APIError:
    log.error("internal error: %s", e, exc_info=e)
    return APIError(500, f"internal error: {type(e).__name__}: {e}")


def _finish_reason(r: str | None) -> str | None:
    return {"stop": "stop", "length": "length"}.get(r, r)


def _usage(st: _Generation) -> dict:
    return {"prompt_tokens": st.n_in, "completion_tokens": st.n_out,
            "total_tokens": st.n_in + st.n_out}


def _fetch_text(url: str) -> str:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.read().decode()
    except OSError as e:
        return f"# tritonserver metrics unavailable: {e}\n"


# ---------------------------------------------------------------------------------------------
# Running it in a thread of the launcher
# ---------------------------------------------------------------------------------------------

class FrontendServer:
    """uvicorn serving an OpenAIFrontend in a background thread (the launcher's main thread
    keeps the signals and the tritonserver process)."""

    def __init__(self, frontend: OpenAIFrontend, host: str, port: int, log_level: str = "warning"):
        import uvicorn
        self.frontend = frontend
        self.config = uvicorn.Config(frontend.app, host=host, port=port, log_level=log_level,
                                     timeout_graceful_shutdown=5, lifespan="on")
        self.server = uvicorn.Server(self.config)
        self._thread = None
        self.port = port

    def start(self, timeout: float = 30.0) -> "FrontendServer":
        import threading
        self._thread = threading.Thread(target=self.server.run, name="sawtrt-openai", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self._thread.is_alive():
                raise RuntimeError(f"the OpenAI API server did not start on port {self.port}")
            if time.monotonic() > deadline:
                raise RuntimeError("the OpenAI API server did not start in time")
            time.sleep(0.05)
        if self.port == 0:
            self.port = self.server.servers[0].sockets[0].getsockname()[1]
        return self

    def stop(self, timeout: float = 15.0) -> None:
        self.server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)

