"""sawtrt.serving without Triton: request parsing and the background engine loop.

The engine here is a small fake that keeps the LLMEngine contract (pages per request, abort frees
them, step() returns StepOutputs); the real engine behind a real tritonserver is in
test_serving_triton.py.
"""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from sawtrt.engine.llm_engine import StepOutput
from sawtrt.serving.backend import EngineLoop, ParsedRequest, RequestError, parse_request
from sawtrt.engine.sampling import SamplingParams


def req(prompt=b"hello", max_tokens=4, **extra):
    d = {"text_input": np.array([[prompt]], dtype=object),
         "max_tokens": np.array([[max_tokens]], dtype=np.int32)}
    d.update(extra)
    return d


def one(value, dtype):
    return np.array([[value]], dtype=dtype)


# ---------------------------------------------------------------------------------------------
# parse_request
# ---------------------------------------------------------------------------------------------

def test_parse_defaults_and_options():
    p = parse_request(req())
    assert p.prompt == "hello" and p.params.max_tokens == 4 and not p.stream
    assert p.params.temperature == 0.0 and p.params.stop == ()
    p = parse_request(req("héllo".encode(), 7, temperature=one(0.5, np.float32),
                          top_k=one(5, np.int32), top_p=one(0.9, np.float32),
                          seed=one(123, np.uint64), stream=one(True, bool),
                          stop_words=np.array([[b"\n", b"", b"END"]], dtype=object)))
    assert p.prompt == "héllo" and p.stream
    assert p.params.max_tokens == 7 and p.params.top_k == 5 and p.params.seed == 123
    assert p.params.temperature == pytest.approx(0.5) and p.params.top_p == pytest.approx(0.9)
    assert p.params.stop == ("\n", "END")        # TRT-LLM clients send "" for none
    # what TensorRT-LLM clients send by default
    p = parse_request(req(bad_words=np.array([[b""]], dtype=object), beam_width=one(1, np.int32),
                          random_seed=one(9, np.uint64),
                          stop_words=np.array([[b""]], dtype=object)))
    assert p.params.seed == 9 and p.params.stop == ()
    # shape [1] (no batch dim) is accepted too
    p = parse_request({"text_input": np.array([b"x"], dtype=object),
                       "max_tokens": np.array([2], dtype=np.int32)})
    assert p.prompt == "x" and p.params.max_tokens == 2


@pytest.mark.parametrize("inputs, needle", [
    ({"max_tokens": one(4, np.int32)}, "missing required input 'text_input'"),
    ({"text_input": one(b"hi", object)}, "missing required input 'max_tokens'"),
    (req(b""), "prompt is empty"),
    (req(max_tokens=-1), "max_tokens: must be >= 1, got -1"),
    (req(max_tokens=0), "max_tokens: must be >= 1, got 0"),
    (req(max_tokens=np.iinfo(np.int32).max), "absurd"),
    ({"text_input": one(b"hi", object), "max_tokens": one(4.0, np.float32)},
     "max_tokens: expected an integer"),
    ({"text_input": one(3, np.int32), "max_tokens": one(4, np.int32)},
     "text_input: expected BYTES"),
    (req(b"\xff\xfe"), "not valid UTF-8"),
    (req(temperature=one(np.nan, np.float32)), "temperature: must be finite"),
    (req(temperature=one(np.inf, np.float32)), "temperature: must be finite"),
    (req(temperature=one(-1.0, np.float32)), "temperature must be >= 0"),
    (req(temperature=one(1e9, np.float32)), "absurd"),
    (req(top_p=one(0.0, np.float32)), "top_p must be in (0, 1]"),
    (req(top_p=one(1.5, np.float32)), "top_p must be in (0, 1]"),
    (req(top_k=one(-3, np.int32)), "top_k must be >= 0"),
    (req(seed=one(2**64 - 1, np.uint64)), "seed must be"),
    (req(stream=one(1, np.int32)), "stream: expected BOOL"),
    ({"text_input": np.array([[b"a"], [b"b"]], dtype=object),
      "max_tokens": np.array([[1], [1]], dtype=np.int32)}, "batch size 2 is not supported"),
    ({**req(), "bogus": one(1, np.int32)}, "unknown input(s) ['bogus']"),
    (req(stop_words=np.array([[b"x"] * 17], dtype=object)), "at most 16 stop strings"),
    (req(bad_words=np.array([[b"", b"damn"]], dtype=object)), "bad_words: not supported"),
    (req(beam_width=one(4, np.int32)), "beam_width: only 1 is supported"),
    (req(seed=one(1, np.uint64), random_seed=one(2, np.uint64)), "disagree"),
])
def test_parse_rejects_with_clear_message(inputs, needle):
    with pytest.raises(RequestError) as e:
        parse_request(inputs)
    assert needle in str(e.value)


# ---------------------------------------------------------------------------------------------
# EngineLoop over a fake engine
# ---------------------------------------------------------------------------------------------

class FakeEngine:
    """LLMEngine contract in miniature: output token i of a request is chr(ord('a') + i % 26),
    one page per 4 tokens, prompts over `max_prompt` characters are refused."""

    def __init__(self, total_pages=64, page_size=4, max_prompt=32):
        self.total_pages, self.page_size, self.max_prompt = total_pages, page_size, max_prompt
        self.seqs = {}           # rid -> [prompt_len, n_out, max_tokens, pages]
        self.pending = []
        self.fail_next_step = False
        self.step_delay = 0.0
        self.blank_text = False  # tokens that decode to no text (random-weight engines)
        self.lock = threading.Lock()
        self.calls_from = set()

    def _used(self):
        return sum(s[3] for s in self.seqs.values())

    def add_request(self, rid, prompt, params):
        self.calls_from.add(threading.current_thread().name)
        params.validate()
        if not prompt:
            raise ValueError("empty prompt")
        if len(prompt) > self.max_prompt:
            raise ValueError(f"prompt has {len(prompt)} tokens; at most {self.max_prompt}")
        if rid in self.seqs:
            raise ValueError(f"duplicate request id {rid!r}")
        pages = -(-len(prompt) // self.page_size)
        self.seqs[rid] = [len(prompt), 0, params.max_tokens, pages]

    def abort_request(self, rid):
        self.calls_from.add(threading.current_thread().name)
        s = self.seqs.pop(rid, None)
        if s is None:
            return False
        self.pending.append(StepOutput(rid, [], "", True, "abort", s[0], s[1]))
        return True

    def has_unfinished(self):
        return bool(self.seqs or self.pending)

    def kv_cache_usage(self):
        return {"used_pages": self._used(), "total_pages": self.total_pages,
                "page_size": self.page_size}

    def step(self):
        self.calls_from.add(threading.current_thread().name)
        if self.step_delay:
            time.sleep(self.step_delay)
        if self.fail_next_step:
            self.fail_next_step = False
            raise RuntimeError("boom")
        outs, self.pending = self.pending, []
        for rid, s in list(self.seqs.items()):
            s[1] += 1
            s[3] = -(-(s[0] + s[1]) // self.page_size)
            done = s[1] >= s[2]
            text = "" if self.blank_text else chr(ord("a") + (s[1] - 1) % 26)
            outs.append(StepOutput(rid, [s[1]], text, done,
                                   "length" if done else None, s[0], s[1]))
            if done:
                del self.seqs[rid]
        return outs


class ListSink:
    def __init__(self, cancel_after=None):
        self.events = []           # ("send", text, n_in, n_out, reason, final) | ("error", msg)
        self.kinds = []            # the error kind of each ("error", msg) event
        self.done = threading.Event()
        self.cancel_after = cancel_after
        self.fail_send = False

    def send(self, text, n_in, n_out, reason, final):
        if self.fail_send:
            raise RuntimeError("client gone")
        self.events.append(("send", text, n_in, n_out, reason, final))
        if final:
            self.done.set()

    def error(self, message, kind="internal"):
        self.events.append(("error", message))
        self.kinds.append(kind)
        self.done.set()

    def is_cancelled(self):
        sends = sum(1 for e in self.events if e[0] == "send")
        return self.cancel_after is not None and sends >= self.cancel_after

    @property
    def text(self):
        return "".join(e[1] for e in self.events if e[0] == "send")


def parsed(prompt="hello", max_tokens=5, stream=True):
    return ParsedRequest(prompt, SamplingParams(max_tokens=max_tokens), stream)


@pytest.fixture
def loop():
    engine = FakeEngine()
    lp = EngineLoop(engine, cancel_check_interval_s=0.0, idle_wait_s=0.05).start()
    yield lp
    lp.stop(timeout=10)


def wait_stats(loop, timeout=5, **want):
    """Counters are updated by the loop after the response thread reports; poll for them."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(getattr(loop.stats, k) == v for k, v in want.items()):
            return
        time.sleep(0.01)
    got = {k: getattr(loop.stats, k) for k in want}
    raise AssertionError(f"stats {got} != {want}")


def wait_all(sinks, timeout=10):
    for s in sinks:
        assert s.done.wait(timeout), f"request did not finish: {s.events}"


def test_streaming_and_non_streaming_agree(loop):
    streamed, whole = ListSink(), ListSink()
    loop.submit(parsed(max_tokens=30, stream=True), streamed)
    loop.submit(parsed(max_tokens=30, stream=False), whole)
    wait_all([streamed, whole])
    expect = "".join(chr(ord("a") + i % 26) for i in range(30))
    assert streamed.text == expect and whole.text == expect
    assert len([e for e in streamed.events if e[0] == "send"]) == 30
    assert len(whole.events) == 1 and whole.events[0][-1] is True
    last = streamed.events[-1]
    assert last[0] == "send" and last[-1] is True and last[4] == "length" and last[3] == 30
    assert all(e[-1] is False for e in streamed.events[:-1])
    wait_stats(loop, completed=2)
    assert loop.engine.kv_cache_usage()["used_pages"] == 0
    assert loop.engine.calls_from == {"sawtrt-engine-loop"}   # engine touched by one thread


def test_streaming_reports_tokens_without_text(loop):
    """A step whose tokens decode to no text still sends a response (clients time tokens by
    num_output_tokens); a non-streaming request still gets one."""
    loop.engine.blank_text = True
    streamed, whole = ListSink(), ListSink()
    loop.submit(parsed(max_tokens=6, stream=True), streamed)
    loop.submit(parsed(max_tokens=6, stream=False), whole)
    wait_all([streamed, whole])
    sends = [e for e in streamed.events if e[0] == "send"]
    assert [e[3] for e in sends] == [1, 2, 3, 4, 5, 6] and streamed.text == ""
    assert sends[-1][-1] is True and sends[-1][4] == "length"
    assert len(whole.events) == 1 and whole.events[0][3] == 6


def test_many_concurrent_submitters(loop):
    sinks = [ListSink() for _ in range(40)]
    threads = [threading.Thread(target=loop.submit, args=(parsed(max_tokens=3 + i % 5), s))
               for i, s in enumerate(sinks)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wait_all(sinks)
    for i, s in enumerate(sinks):
        assert s.text == "abcdefg"[:3 + i % 5]
    wait_stats(loop, completed=40)
    assert loop.num_active == 0


def test_engine_rejection_is_an_error_response_and_loop_survives(loop):
    too_long, dup_ok = ListSink(), ListSink()
    loop.submit(parsed(prompt="x" * 100), too_long)
    loop.submit(parsed(), dup_ok)
    wait_all([too_long, dup_ok])
    assert too_long.events == [("error", "bad request: prompt has 100 tokens; at most 32")]
    assert too_long.kinds == ["invalid_argument"]
    assert dup_ok.text == "abcde"
    assert loop.stats.rejected == 1


def test_cancel_aborts_and_frees_pages(loop):
    loop.engine.step_delay = 0.01
    sink = ListSink(cancel_after=3)
    other = ListSink()
    loop.submit(parsed(max_tokens=10_000), sink)
    loop.submit(parsed(max_tokens=40), other)
    wait_all([sink, other])
    assert sink.events[-1] == ("error", "request cancelled") and sink.kinds == ["cancelled"]
    assert 3 <= len(sink.events) - 1 < 10
    assert other.text == "".join(chr(ord("a") + i % 26) for i in range(40))
    deadline = time.monotonic() + 5
    while loop.engine.kv_cache_usage()["used_pages"] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert loop.engine.kv_cache_usage()["used_pages"] == 0
    wait_stats(loop, cancelled=1, completed=1)


def test_broken_client_is_aborted(loop):
    sink = ListSink()
    sink.fail_send = True
    ok = ListSink()
    loop.submit(parsed(max_tokens=1000), sink)
    loop.submit(parsed(max_tokens=3), ok)
    wait_all([ok])
    deadline = time.monotonic() + 5
    while loop.stats.failed == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert loop.stats.failed == 1 and "0" not in loop.engine.seqs
    deadline = time.monotonic() + 5        # the response thread forgets the broken client
    while loop._outbox._broken and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not loop._outbox._broken


class GatedSink(ListSink):
    """send blocks until `gate` is set (a client whose responses are slow to hand over)."""

    def __init__(self):
        super().__init__()
        self.gate = threading.Event()

    def send(self, *args):
        assert self.gate.wait(10), "gate never opened"
        super().send(*args)


def test_responses_do_not_hold_up_the_engine(loop):
    """Sends run on their own thread: the engine finishes all 20 steps of a request while its
    first response is still being handed over, and the responses then arrive complete, in
    order."""
    sink = GatedSink()
    loop.submit(parsed(max_tokens=20), sink)
    deadline = time.monotonic() + 5
    while (loop.stats.steps < 20 or loop.engine.has_unfinished()) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not loop.engine.has_unfinished() and sink.events == []
    assert loop.stats.completed == 0            # counted when its final response is delivered
    sink.gate.set()
    wait_all([sink])
    assert [e[3] for e in sink.events] == list(range(1, 21))
    assert sink.text == "".join(chr(ord("a") + i) for i in range(20))
    wait_stats(loop, completed=1)


def test_failed_final_response_counts_as_failed_not_completed(loop):
    class FinalFails(ListSink):
        def send(self, text, n_in, n_out, reason, final):
            if final:
                raise RuntimeError("client gone")
            super().send(text, n_in, n_out, reason, final)

    bad, ok = FinalFails(), ListSink()
    loop.submit(parsed(max_tokens=4), bad)
    loop.submit(parsed(max_tokens=6), ok)
    wait_all([ok])
    wait_stats(loop, completed=1, failed=1)
    assert len(bad.events) == 3          # the three non-final tokens


def test_a_failed_send_after_the_final_was_queued_counts_once(loop):
    """The engine finishes a request while an earlier chunk is still queued; that chunk's send
    fails: the request is failed (not also completed), its later responses are dropped."""
    class FirstFails(GatedSink):
        def send(self, text, n_in, n_out, reason, final):
            assert self.gate.wait(10)
            if n_out == 1:
                raise RuntimeError("client gone")
            super().send(text, n_in, n_out, reason, final)

    bad = FirstFails()
    loop.submit(parsed(max_tokens=5), bad)
    deadline = time.monotonic() + 5
    while loop.engine.has_unfinished() and time.monotonic() < deadline:
        time.sleep(0.01)
    bad.gate.set()
    wait_stats(loop, failed=1)
    time.sleep(0.1)
    assert loop.stats.completed == 0 and loop.stats.failed == 1 and bad.events == []


def test_cancelled_request_with_a_failing_send_counts_once(loop):
    class Flaky(ListSink):
        def send(self, *args):
            if self.cancel_after is not None and len(self.events) >= 2:
                raise RuntimeError("client gone")
            super().send(*args)

    sink = Flaky(cancel_after=2)
    loop.engine.step_delay = 0.01
    loop.submit(parsed(max_tokens=1000), sink)
    wait_stats(loop, cancelled=1)
    time.sleep(0.2)
    assert loop.stats.failed == 0 and loop.stats.cancelled == 1 and loop.stats.completed == 0
    assert loop.engine.kv_cache_usage()["used_pages"] == 0


def test_stop_without_start_leaves_no_thread():
    before = threading.active_count()
    for _ in range(3):
        EngineLoop(FakeEngine()).stop()
    assert threading.active_count() == before


def test_engine_step_failure_fails_active_requests_only(loop):
    loop.engine.step_delay = 0.01
    a = ListSink()
    loop.submit(parsed(max_tokens=1000), a)
    time.sleep(0.1)
    loop.engine.fail_next_step = True
    wait_all([a])
    assert a.events[-1][0] == "error" and "RuntimeError: boom" in a.events[-1][1]
    assert loop.engine.kv_cache_usage()["used_pages"] == 0
    b = ListSink()
    loop.submit(parsed(max_tokens=4), b)
    wait_all([b])
    assert b.text == "abcd"


def test_stop_fails_pending_requests():
    engine = FakeEngine()
    engine.step_delay = 0.01
    lp = EngineLoop(engine, idle_wait_s=0.05).start()
    s = ListSink()
    lp.submit(parsed(max_tokens=100_000), s)
    time.sleep(0.1)
    lp.stop(timeout=10)
    assert s.events[-1] == ("error", "server is shutting down")
    assert engine.kv_cache_usage()["used_pages"] == 0
    late = ListSink()
    lp.submit(parsed(), late)
    assert late.events == [("error", "server is shutting down")] and late.kinds == ["unavailable"]


@pytest.mark.parametrize("fails", [False, True])
def test_loop_warms_the_engine_on_its_own_thread(fails):
    """The engine's per-thread state (cuDNN plans) is built on the thread that steps, before
    the first request; a warm-up that raises leaves the loop serving."""
    engine = FakeEngine()
    warmed = []

    def warm_up():
        warmed.append(threading.current_thread().name)
        if fails:
            raise RuntimeError("no plans")
        return "warm"
    engine.warm_up = warm_up
    lp = EngineLoop(engine, idle_wait_s=0.05).start()
    try:
        s = ListSink()
        lp.submit(parsed(max_tokens=3), s)
        wait_all([s])
        assert s.text == "abc"
        assert warmed == ["sawtrt-engine-loop"] and engine.calls_from == {"sawtrt-engine-loop"}
    finally:
        lp.stop()


def test_on_step_metrics_errors_do_not_stop_serving():
    calls = []

    def on_step(lp):
        calls.append(lp.kv_cache_usage()["used_pages"])
        raise RuntimeError("metrics broke")

    lp = EngineLoop(FakeEngine(), on_step=on_step, idle_wait_s=0.05).start()
    try:
        s = ListSink()
        lp.submit(parsed(max_tokens=6), s)
        wait_all([s])
        assert s.text == "abcdef" and len(calls) >= 6
    finally:
        lp.stop()


# ---------------------------------------------------------------------------------------------
# The model repository
# ---------------------------------------------------------------------------------------------

def test_checked_in_template_matches_the_writer(tmp_path):
    from pathlib import Path

    from sawtrt.serving.triton_repo import write_template
    repo = Path(__file__).resolve().parent.parent / "triton_server_repo"
    fresh = write_template(tmp_path)
    for rel in ("sawtrt/config.pbtxt", "sawtrt/1/model.py"):
        assert (repo / rel).read_text() == (fresh / rel).read_text(), \
            f"triton_server_repo/{rel} is stale: regenerate with write_template('triton_server_repo')"


def test_write_model_repository(tmp_path):
    from sawtrt.serving.triton_repo import INPUTS, OUTPUTS, write_model_repository
    engine = tmp_path / "my engine"
    engine.mkdir()
    root = write_model_repository(engine, device="cpu")
    assert root == engine.resolve() / "triton_model_repo"
    cfg = (root / "sawtrt" / "config.pbtxt").read_text()
    assert f'string_value: "{engine.resolve()}"' in cfg and 'string_value: "cpu"' in cfg
    assert "decoupled: true" in cfg and 'backend: "python"' in cfg
    for name, *_ in INPUTS + OUTPUTS:
        assert f'name: "{name}"' in cfg
    assert "TritonPythonModel" in (root / "sawtrt" / "1" / "model.py").read_text()
    # rewriting replaces, and a custom location works
    other = write_model_repository(engine, tmp_path / "repo", model_name="m2")
    assert (other / "m2" / "config.pbtxt").read_text().startswith('name: "m2"')
    assert write_model_repository(engine) == root


# ---------------------------------------------------------------------------------------------
# The server wrapper
# ---------------------------------------------------------------------------------------------

def test_server_start_failure_leaves_nothing_behind(tmp_path, monkeypatch):
    """A tritonserver that cannot be launched raises, and the log file and workdir are released."""
    from pathlib import Path

    from sawtrt.serving import server as srv
    monkeypatch.setattr(srv, "find_tritonserver",
                        lambda: srv.TritonDist(tmp_path / "no-such-tritonserver", None, None))
    s = srv.TritonServer(tmp_path, log_file=tmp_path / "server.log")
    made = []
    real_tempdir = srv.tempfile.TemporaryDirectory
    monkeypatch.setattr(srv.tempfile, "TemporaryDirectory",
                        lambda **kw: made.append(real_tempdir(**kw)) or made[-1])
    with pytest.raises(FileNotFoundError):
        s.start()
    assert s.proc is None and s._log is None and s._workdir is None
    assert made and not Path(made[0].name).exists()


# --- drain, context check, control directory, OpenAI request parsing (no server) -----------

def test_drain_finishes_active_refuses_new_and_reports_drained(loop):
    loop.engine.step_delay = 0.01
    sinks = [ListSink() for _ in range(3)]
    for s in sinks:
        loop.submit(parsed(max_tokens=6), s)
    wait_stats(loop, submitted=3)
    loop.drain(30.0)
    late = ListSink()
    loop.submit(parsed(), late)
    assert late.events == [("error", "server is shutting down")] and late.kinds == ["unavailable"]
    wait_all(sinks)
    assert all(s.events[-1][0] == "send" and s.events[-1][5] and s.text == "abcdef" for s in sinks)
    deadline = time.monotonic() + 5
    while not loop.drained and time.monotonic() < deadline:
        time.sleep(0.01)
    assert loop.drained and loop.stats.completed == 3 and loop.stats.unavailable == 1


def test_drain_timeout_ends_the_rest_with_an_error(loop):
    loop.engine.step_delay = 0.01
    s = ListSink()
    loop.submit(parsed(max_tokens=100000), s)
    wait_stats(loop, submitted=1)
    loop.drain(0.2)
    assert s.done.wait(5)
    assert s.events[-1][0] == "error" and "drain timeout (0.2 s)" in s.events[-1][1]
    assert s.kinds == ["unavailable"] and loop.engine.seqs == {}        # aborted: pages freed
    loop.drain(10.0)                      # a later order cannot push the deadline back
    assert loop._drain_timeout_s == 0.2


def test_control_dir_drain_order(loop, tmp_path):
    from sawtrt.serving.control import DRAIN_FILE, DRAINED_FILE, watch_control_dir
    stop = threading.Event()
    t = watch_control_dir(loop, str(tmp_path), poll_s=0.01, stop=stop)
    try:
        time.sleep(0.05)
        assert not loop.draining                   # no order yet
        (tmp_path / DRAIN_FILE).write_text("5\n")
        deadline = time.monotonic() + 5
        while not (tmp_path / DRAINED_FILE).exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert loop.draining and (tmp_path / DRAINED_FILE).exists()
    finally:
        stop.set()
        t.join(5)


class _Tok:
    def encode(self, text):
        return list(text.encode())


def test_check_context_names_both_numbers_or_caps_on_request():
    from sawtrt.serving.backend import check_context
    p = check_context(parsed("abcd", max_tokens=12), _Tok(), 16)
    assert p.prompt_ids == [97, 98, 99, 100] and p.params.max_tokens == 12
    with pytest.raises(RequestError, match=r"prompt \(4 tokens\) \+ max_tokens \(13\) = 17 is "
                                           r"over this engine's max_seq_len \(16\); ask for at "
                                           r"most 12"):
        check_context(parsed("abcd", max_tokens=13), _Tok(), 16)
    capped = parsed("abcd", max_tokens=13)
    capped.cap_max_tokens = True
    assert check_context(capped, _Tok(), 16).params.max_tokens == 12
    with pytest.raises(RequestError, match="prompt has 16 tokens; this engine's max_seq_len is 16"):
        check_context(parsed("a" * 16, max_tokens=1), _Tok(), 16)


def test_parse_cap_max_tokens_input():
    assert parse_request(req(cap_max_tokens=one(True, bool))).cap_max_tokens
    assert not parse_request(req()).cap_max_tokens


def test_openai_request_parsing():
    pytest.importorskip("jinja2")
    from sawtrt.serving.openai_api import APIError, parse_chat, parse_completion, render_chat
    g = parse_completion({"model": "m", "prompt": ["hi"], "max_tokens": 3, "stop": "x",
                          "seed": 5, "top_p": 0.5, "stream": True,
                          "stream_options": {"include_usage": True}}, 64)
    assert (g.prompt, g.max_tokens, g.stop, g.seed, g.top_p, g.stream, g.include_usage,
            g.cap_max_tokens, g.temperature) == ("hi", 3, ("x",), 5, 0.5, True, True, False, 1.0)
    assert parse_completion({"prompt": "hi"}, 64).max_tokens == 16       # OpenAI's default
    tmpl = ("{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}")
    c = parse_chat({"messages": [{"role": "developer", "content": "be brief"},
                                 {"role": "user", "content": [{"type": "text", "text": "hi"}]}],
                    "max_completion_tokens": 4}, tmpl, 64)
    assert c.prompt == "<system>be brief<user>hi<assistant>" and c.max_tokens == 4
    d = parse_chat({"messages": [{"role": "user", "content": "hi"}]}, tmpl, 64)
    assert d.max_tokens == 64 and d.cap_max_tokens          # no max_tokens: up to the context
    bad = [({"prompt": "hi", "n": 2}, "only n=1"), ({"prompt": "hi", "logprobs": 1}, "logprobs"),
           ({"prompt": ["a", "b"]}, "one prompt per request"), ({"prompt": [1, 2]}, "string"),
           ({"prompt": "hi", "stop": ["a"] * 5}, "at most 4"), ({"prompt": "hi", "bogus": 1}, "bogus"),
           ({"prompt": "hi", "max_tokens": 0}, "must be in [1, 2147483647]"),
           ({"prompt": "hi", "max_tokens": 2**32 + 3}, "must be in [1, 2147483647]"),
           ({"prompt": "hi", "top_k": 2**32 + 1}, "top_k"),
           ({"prompt": "hi", "temperature": 1e300}, "finite 32-bit float"),
           ({"prompt": "hi", "top_p": float("nan")}, "top_p"),
           ({"prompt": "hi", "logprobs": 0}, "logprobs"),      # 0 asks for logprobs too
           ({"prompt": "hi", "best_of": True}, "best_of"),
           ({"prompt": "hi", "max_tokens": "3"}, "an integer"),
           ({"prompt": "hi", "temperature": True}, "a number"),
           ({"prompt": "hi", "stream_options": {"include_usage": True}}, "stream=true"),
           ({"prompt": "hi", "presence_penalty": 0.5}, "presence_penalty")]
    for body, needle in bad:
        with pytest.raises(APIError) as e:
            parse_completion(body, 64)
        assert e.value.status == 400 and needle in e.value.message, (body, e.value.message)
    with pytest.raises(APIError, match="image_url"):
        render_chat(tmpl, [{"role": "user", "content": [{"type": "image_url"}]}])
    with pytest.raises(APIError, match="role"):
        render_chat(tmpl, [{"role": "wizard", "content": "x"}])
    with pytest.raises(APIError, match="no chat template"):
        parse_chat({"messages": [{"role": "user", "content": "x"}]}, None, 64)


def test_client_inputs_refuse_what_their_types_cannot_hold():
    """numpy would wrap 2^32 + 3 into an int32 of 3: make_inputs raises instead."""
    pytest.importorskip("tritonclient.grpc")
    from sawtrt.serving.client import make_inputs
    assert len(make_inputs("hi", 2**31 - 1, top_k=5, seed=2**64 - 1)) == 5
    for kw, needle in [(dict(max_tokens=2**32 + 3), "max_tokens"),
                       (dict(max_tokens=4, top_k=-2**31 - 1), "top_k"),
                       (dict(max_tokens=4, seed=-1), "seed")]:
        with pytest.raises(ValueError, match=needle):
            make_inputs("hi", **kw)


def test_generation_without_a_stream_stops_when_its_client_leaves():
    """The OpenAI front end's non-streaming path: the generation is cancelled once the HTTP
    client is gone (asked every poll), and runs to its end while the client stays."""
    import asyncio
    from sawtrt.serving.openai_api import _until_disconnected

    class Request:
        def __init__(self, leave_after: float):
            self.t_leave = time.monotonic() + leave_after

        async def is_disconnected(self):
            return time.monotonic() >= self.t_leave

    async def scenario(work_s, leave_after):
        state = {"cancelled": False, "done": False}

        async def work():
            try:
                await asyncio.sleep(work_s)
                state["done"] = True
            except asyncio.CancelledError:
                state["cancelled"] = True
                raise
        completed = await _until_disconnected(work(), Request(leave_after), 0.01)
        return completed, state

    completed, state = asyncio.run(scenario(30.0, 0.05))
    assert not completed and state == {"cancelled": True, "done": False}
    completed, state = asyncio.run(scenario(0.05, 30.0))
    assert completed and state == {"cancelled": False, "done": True}

    async def failing():
        raise RuntimeError("boom")
    with pytest.raises(RuntimeError, match="boom"):
        asyncio.run(_until_disconnected(failing(), Request(30.0), 0.01))


def test_ports_and_urls_of_an_ipv6_host():
    """`--host ::1`: ports are probed with an IPv6 socket (an IPv4 one called every port
    taken) and URLs bracket the address."""
    import socket
    from pathlib import Path
    from sawtrt.serving.server import TritonServer, free_port, port_in_use, url_host
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback here")
    port = free_port("::1")
    assert not port_in_use("::1", port)
    with socket.socket(socket.AF_INET6) as taken:
        taken.bind(("::1", port))
        taken.listen()
        assert port_in_use("::1", port)
    s = TritonServer(Path("repo"), grpc_port=8001, http_port=8000, metrics_port=8002, host="::1")
    assert (s.grpc_url, s.http_url, s.metrics_url) == \
        ("[::1]:8001", "http://[::1]:8000", "http://[::1]:8002/metrics")
    assert url_host("127.0.0.1") == "127.0.0.1"
