"""A real tritonserver (the one in the nvidia-pytriton wheel) serving the SmolLM2-135M engine.

One server for the module, started with `sawtrt serve --engine DIR --*-port 0` exactly as a user
would (from a temporary directory); the clean-stop test starts its own. Every wait has a
timeout; the teardown kills whatever is left.

CPU budget (2 cores): build ~25 s, server start ~15 s, 32 streams ~60 s, local generate ~60 s.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tritonclient.grpc", reason="serving extra not installed")  # dev includes it

from serving_helpers import served_divergence, start_serve  # noqa: E402

from sawtrt.serving.client import generate, make_inputs, stream_infer  # noqa: E402

pytestmark = pytest.mark.slow

MAX_SEQ_LEN = 256
N_TOKENS = 8
PROMPTS = [f"Question {i}: what is {i} plus {i + 1}? Answer:" for i in range(32)]


@pytest.fixture(scope="module")
def engine_dir(smollm2_serving_engine):
    return smollm2_serving_engine


@pytest.fixture(scope="module")
def served(engine_dir, tmp_path_factory):
    s = start_serve(engine_dir, tmp_path_factory.mktemp("serve"), "--no-openai")
    yield s
    s.kill_all()


def metrics(url: str) -> dict[str, float]:
    """Our sawtrt_* samples, keyed by name plus outcome label where there is one."""
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    vals = {}
    for line in text.splitlines():
        m = re.match(r'(sawtrt_\w+)\{([^}]*)\} (\S+)', line)
        if m:
            outcome = re.search(r'outcome="(\w+)"', m.group(2))
            vals[m.group(1) + (f".{outcome.group(1)}" if outcome else "")] = float(m.group(3))
    return vals


def wait_metric(url, name, pred, timeout=30.0):
    deadline = time.monotonic() + timeout
    while True:
        v = metrics(url).get(name)
        if v is not None and pred(v):
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"metric {name} = {v} after {timeout} s")
        time.sleep(0.2)


def test_32_concurrent_streams_match_local_generate(served, engine_dir):
    """Each stream is what the engine gives locally for its prompt, but for a greedy pick at a
    near-tie that the batch decided otherwise (serving_helpers.served_divergence)."""
    results = [None] * len(PROMPTS)

    def user(i):
        results[i] = generate(served.grpc, PROMPTS[i], N_TOKENS, timeout=400, stream=True)

    threads = [threading.Thread(target=user, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(450)
    assert not any(t.is_alive() for t in threads), "some streams never finished"
    errors = [(i, r.error) for i, r in enumerate(results) if r.error]
    assert not errors, f"{errors}\n{served.log()}"
    assert all(r.finish_reason in ("length", "stop") for r in results)
    # it really streamed: an 8-token answer comes in several responses
    assert max(len(r.chunk_times) for r in results) >= 4

    from sawtrt.engine.llm import LLM
    from sawtrt.engine.sampling import SamplingParams
    llm = LLM(engine_dir, device="cpu")
    local = llm.generate(PROMPTS, SamplingParams(max_tokens=N_TOKENS))
    mismatches = [(i, r.text, g) for i, (r, g) in enumerate(zip(results, local))
                  if (r.text, r.finish_reason, r.num_output_tokens)
                  != (g.text, g.finish_reason, len(g.token_ids))]
    unexplained = [(PROMPTS[i], text, g.text,
                    served_divergence(llm, PROMPTS[i], g.token_ids, text))
                   for i, text, g in mismatches]
    unexplained = [m for m in unexplained if m[3] is not None]
    assert not unexplained, unexplained
    assert any(r.text.strip() for r in results)


def _error_of(url, inputs) -> str | None:
    r = stream_infer(url, inputs, timeout=60)
    return r.error


def _raw(name, arr, dtype):
    import tritonclient.grpc as grpcclient
    t = grpcclient.InferInput(name, list(arr.shape), dtype)
    t.set_data_from_numpy(arr)
    return t


def _text(s):
    return _raw("text_input", np.array([[s.encode()]], dtype=np.object_), "BYTES")


def _max_tokens(n, dtype=np.int32, tt="INT32"):
    return _raw("max_tokens", np.array([[n]], dtype=dtype), tt)


BAD_REQUESTS = {
    "missing text_input": (lambda: [_max_tokens(4)], "text_input"),
    "missing max_tokens": (lambda: [_text("hi")], "max_tokens"),
    "empty prompt": (lambda: make_inputs("", 4), "the prompt is empty"),
    "prompt too long": (lambda: make_inputs("hello " * 400, 4), f"max_seq_len is {MAX_SEQ_LEN}"),
    "negative max_tokens": (lambda: make_inputs("hi", -5), "max_tokens: must be >= 1, got -5"),
    "zero max_tokens": (lambda: make_inputs("hi", 0), "max_tokens: must be >= 1, got 0"),
    "max_tokens as FP32": (lambda: [_text("hi"), _max_tokens(4.0, np.float32, "FP32")],
                           "expects 'INT32'"),
    "text_input as INT32": (lambda: [_raw("text_input", np.array([[1]], dtype=np.int32), "INT32"),
                                     _max_tokens(4)], "expects 'BYTES'"),
    "NaN temperature": (lambda: make_inputs("hi", 4, temperature=float("nan")), "temperature"),
    "negative temperature": (lambda: make_inputs("hi", 4, temperature=-1.0),
                             "temperature must be >= 0"),
    "huge temperature": (lambda: make_inputs("hi", 4, temperature=1e30), "absurd"),
    "top_p 7": (lambda: make_inputs("hi", 4, top_p=7.0), "top_p must be in (0, 1]"),
    "top_k -1": (lambda: make_inputs("hi", 4, top_k=-1), "top_k must be >= 0"),
    "huge max_tokens": (lambda: make_inputs("hi", 2**31 - 1), "absurd"),
    "batch of 2": (lambda: [_raw("text_input", np.array([[b"a"], [b"b"]], dtype=np.object_), "BYTES"),
                            _raw("max_tokens", np.array([[1], [1]], dtype=np.int32), "INT32")],
                   "batch size 2 is not supported"),
    "unknown input": (lambda: make_inputs("hi", 4) + [_raw("bogus", np.array([[1]], np.int32),
                                                           "INT32")], "bogus"),
    "invalid UTF-8": (lambda: [_raw("text_input", np.array([[b"\xff\xfe"]], dtype=np.object_),
                                    "BYTES"), _max_tokens(4)], "not valid UTF-8"),
}


def test_bad_requests_get_clear_errors_and_server_keeps_serving(served):
    before = metrics(served.metrics)
    got = {name: _error_of(served.grpc, make()) for name, (make, _) in BAD_REQUESTS.items()}
    wrong = {name: got[name] for name, (_, needle) in BAD_REQUESTS.items()
             if got[name] is None or needle not in got[name]}
    assert not wrong, wrong
    # still serving, and the model never went down
    r = generate(served.grpc, PROMPTS[1], 3, timeout=120).check()
    assert r.num_output_tokens >= 1 and r.finish_reason in ("length", "stop")
    ready = urllib.request.urlopen(f"{served.http}/v2/models/sawtrt/ready", timeout=10)
    assert ready.status == 200
    # the requests our backend saw (not those Triton refused itself) are counted as rejected
    ours = sum(1 for name, (_, needle) in BAD_REQUESTS.items()
               if not needle.startswith("expects") and name not in
               ("missing text_input", "missing max_tokens", "unknown input"))
    wait_metric(served.metrics, "sawtrt_requests.rejected",
                lambda v: v - before.get("sawtrt_requests.rejected", 0) == ours)


def test_cancelled_stream_frees_its_pages(served):
    before = metrics(served.metrics)
    assert before["sawtrt_kv_cache_used_pages"] == 0
    seen = {}

    def on_delta(_):                # while the request runs, it holds pages
        used = metrics(served.metrics)["sawtrt_kv_cache_used_pages"]
        seen["used"] = max(seen.get("used", 0), used)

    # 240 tokens would take far longer than the wait below if the request were not aborted
    r = generate(served.grpc, PROMPTS[2], MAX_SEQ_LEN - 16, ignore_eos=True, timeout=120,
                 on_delta=on_delta, cancel_after=2)
    assert r.cancelled_by_client and r.error is None and r.num_output_tokens < 20
    assert seen["used"] >= 1
    wait_metric(served.metrics, "sawtrt_requests.cancelled",
                lambda v: v == before.get("sawtrt_requests.cancelled", 0) + 1, timeout=20)
    wait_metric(served.metrics, "sawtrt_kv_cache_used_pages", lambda v: v == 0, timeout=10)
    assert metrics(served.metrics)["sawtrt_active_requests"] == 0
    assert "sawtrt_requests.completed" in before


def test_http_generate_endpoint(served):
    """Triton's generate extension (what curl users of TensorRT-LLM models call) works too."""
    import json

    def post(body):
        req = urllib.request.Request(f"{served.http}/v2/models/sawtrt/generate",
                                     data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    code, rec = post({"text_input": PROMPTS[4], "max_tokens": 3})
    assert code == 200 and rec["num_output_tokens"] >= 1 and rec["finish_reason"], rec
    assert rec["text_output"] == generate(served.grpc, PROMPTS[4], 3, timeout=120).check().text
    # the body of TensorRT-LLM's documented curl example
    code, rec2 = post({"text_input": PROMPTS[4], "max_tokens": 3, "bad_words": "",
                       "stop_words": ""})
    assert code == 200 and rec2["text_output"] == rec["text_output"], rec2
    code, rec = post({"text_input": PROMPTS[4], "max_tokens": -4})
    assert code == 400 and "max_tokens: must be >= 1, got -4" in rec["error"]


def test_cli_client_and_bench_serve(served):
    import json
    exe = str(Path(sys.executable).parent / "sawtrt")
    r = subprocess.run([exe, "client", "--url", served.grpc, "--max-tokens", "3", "--json",
                        PROMPTS[3]], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    rec = json.loads(r.stdout)
    assert rec["error"] is None and rec["num_output_tokens"] >= 1 and rec["finish_reason"]
    r = subprocess.run([exe, "client", "--url", served.grpc, "--max-tokens", "3", "--top-p",
                        "7", "hi"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "top_p must be in (0, 1]" in r.stderr
    r = subprocess.run([exe, "bench", "serve", "--url", served.grpc, "--concurrency", "1,2",
                        "--num-requests", "2", "--prompt-len", "8", "--output-len", "3",
                        "--warmup", "0", "--json", "-"], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    levels = json.loads(r.stdout)["levels"]
    assert [lv["concurrency"] for lv in levels] == [1, 2]
    for lv in levels:
        assert lv["completed"] == 2 and lv["lost"] == 0 and lv["output_tokens_total"] == 6
        assert lv["ttft_s"]["p50"] > 0 and lv["itl_s"]["p50"] > 0 and lv["output_tok_s"] > 0


def test_server_stops_cleanly(engine_dir, tmp_path):
    s = start_serve(engine_dir, tmp_path / "serve")
    try:
        s.signal(signal.SIGTERM)
        code = s.wait(90)
        out = s.out()
        assert code == 0, out
        assert "tritonserver exited with code 0" in out
        with pytest.raises(ProcessLookupError):        # nothing left of the server's process group
            os.killpg(s.triton_pid, 0)
        with pytest.raises(OSError):
            urllib.request.urlopen(f"{s.http}/v2/health/live", timeout=5)
        assert not [p for p in os.listdir("/dev/shm") if p.startswith(f"sawtrt{s.proc.pid}_")]
    finally:
        s.kill_all()
