"""Process life of `sawtrt serve`: drain on SIGINT/SIGTERM under load, the drain timeout,
busy ports, --restart after a crash, tritonserver dying with its launcher, /dev/shm cleanup.

Each test that stops a server starts its own (a stop ends it). Clients read the raw SSE stream,
so "an explicit error" means an error event followed by `data: [DONE]`, and "its full answer"
means every token and a finish_reason, never a connection that just ends.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="serving extra not installed")
pytest.importorskip("tritonclient.grpc", reason="serving extra not installed")
httpx = pytest.importorskip("httpx")

from serving_helpers import scrape, serve_env, start_serve, wait_until  # noqa: E402

from sawtrt.serving.client import generate  # noqa: E402

pytestmark = pytest.mark.slow

MODEL = "smollm2-135m"


def sse_request(url: str, body: dict, timeout: float = 300.0) -> dict:
    """POST and read the answer as a client would: status, events, [DONE] seen, error body."""
    rec = {"status": None, "text": "", "finish_reason": None, "done": False, "error": None,
           "chunks": 0, "broken": None}
    try:
        with httpx.Client(timeout=timeout) as h:
            with h.stream("POST", url, json=body) as resp:
                rec["status"] = resp.status_code
                if resp.status_code != 200 or not body.get("stream"):
                    payload = json.loads(resp.read())
                    if resp.status_code != 200:
                        rec["error"] = payload["error"]
                    else:
                        ch = payload["choices"][0]
                        rec["text"], rec["finish_reason"] = ch["text"], ch["finish_reason"]
                        rec["done"] = True
                    return rec
                for line in resp.iter_lines():
                    if not line.startswith("data: "):
                        continue
                    data = line[len("data: "):]
                    if data == "[DONE]":
                        rec["done"] = True
                        break
                    ev = json.loads(data)
                    if "error" in ev:
                        rec["error"] = ev["error"]
                        continue
                    ch = ev["choices"][0]
                    rec["text"] += ch["text"]
                    rec["chunks"] += 1
                    rec["finish_reason"] = ch["finish_reason"] or rec["finish_reason"]
    except httpx.HTTPError as e:              # a bare disconnect: what must never happen
        rec["broken"] = f"{type(e).__name__}: {e}"
    return rec


def completion(prompt, max_tokens, stream=True, **kw):
    return {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "stream": stream, "ignore_eos": True, **kw}


def run_users(fns):
    out = [None] * len(fns)

    def run(i):
        out[i] = fns[i]()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(fns))]
    for t in threads:
        t.start()
    return threads, out


def wait_in_engine(served, n, timeout=120):
    key_r = 'sawtrt_num_requests_running{model="sawtrt"}'
    key_w = 'sawtrt_num_requests_waiting{model="sawtrt"}'
    wait_until(lambda: (lambda m: m.get(key_r, 0) + m.get(key_w, 0) >= n)(scrape(served.metrics)),
               timeout, f"{n} requests in the engine")


def assert_gone(served):
    for pid in served.triton_pids():
        with pytest.raises(ProcessLookupError):
            os.killpg(pid, 0)
    left = [p for p in os.listdir("/dev/shm") if p.startswith(f"sawtrt{served.proc.pid}_")]
    assert not left, left


@pytest.mark.parametrize("sig", [signal.SIGINT], ids=["SIGINT"])
def test_drain_lets_every_stream_finish(smollm2_serving_engine, tmp_path, sig):
    s = start_serve(smollm2_serving_engine, tmp_path / "serve", "--drain-timeout", "120")
    try:
        url = f"{s.openai}/completions"
        n_tok = 8
        fns = [lambda i=i: sse_request(url, completion(f"Story {i}:", n_tok)) for i in range(5)]
        fns.append(lambda: sse_request(url, completion("Story 9:", n_tok, stream=False)))
        fns += [lambda i=i: generate(s.grpc, f"Tale {i}:", n_tok, ignore_eos=True, timeout=300)
                for i in range(2)]
        threads, out = run_users(fns)
        wait_in_engine(s, len(fns))
        s.signal(sig)
        s.wait_for("draining")
        late = sse_request(url, completion("Too late:", 2))
        time.sleep(0.5)                  # the backend reads the drain order every 0.1 s
        late_grpc = generate(s.grpc, "Too late:", 2, timeout=60)
        for t in threads:
            t.join(300)
        code = s.wait(120)
        out_text = s.out()
        assert code == 0, out_text
        assert "tritonserver exited with code 0" in out_text
        for i, r in enumerate(out[:6]):
            assert r["broken"] is None and r["error"] is None and r["done"], (i, r)
            assert r["status"] == 200 and r["finish_reason"] == "length", (i, r)
        for r in out[6:]:
            assert r.error is None and r.num_output_tokens == n_tok and r.finish_reason == "length"
        assert late["status"] == 503 and "shutting down" in late["error"]["message"], late
        assert late_grpc.error is not None and "shutting down" in late_grpc.error, late_grpc
        assert_gone(s)
    finally:
        s.kill_all()


def test_drain_timeout_ends_the_rest_with_an_error(smollm2_serving_engine, tmp_path):
    s = start_serve(smollm2_serving_engine, tmp_path / "serve", "--drain-timeout", "2")
    try:
        url = f"{s.openai}/completions"
        long = 200                           # far more than 2 s on a CPU
        fns = [lambda i=i: sse_request(url, completion(f"Epic {i}:", long)) for i in range(3)]
        fns.append(lambda: sse_request(url, completion("Epic 8:", long, stream=False)))
        fns.append(lambda: generate(s.grpc, "Saga:", long, ignore_eos=True, timeout=300))
        threads, out = run_users(fns)
        wait_in_engine(s, len(fns))
        t0 = time.monotonic()
        s.signal(signal.SIGTERM)
        for t in threads:
            t.join(120)
        code = s.wait(120)
        assert code == 0, s.out()
        assert time.monotonic() - t0 < 60
        for i, r in enumerate(out[:3]):         # streams: an error event, then [DONE]
            assert r["broken"] is None and r["done"], (i, r)
            assert r["error"] is not None and "drain timeout" in r["error"]["message"], (i, r)
            assert r["error"]["code"] == 503 and r["chunks"] < long, (i, r)
        assert out[3]["status"] == 503 and "drain timeout" in out[3]["error"]["message"], out[3]
        assert out[4].error is not None and "drain timeout" in out[4].error, out[4]
        assert_gone(s)
    finally:
        s.kill_all()


def test_busy_ports_are_refused(smollm2_serving_engine, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = subprocess.run([sys.executable, "-m", "sawtrt", "serve", "--engine",
                            str(smollm2_serving_engine), "--grpc-port", str(port),
                            "--http-port", "0", "--metrics-port", "0", "--openai-port", "0",
                            "--device", "cpu"], capture_output=True, text=True, timeout=120,
                           cwd=tmp_path, env=serve_env())
    assert r.returncode != 0
    assert f"gRPC port {port} on 127.0.0.1 already in use" in r.stderr, r.stderr
    assert "serve: ready" not in r.stderr and "starting tritonserver" not in r.stderr


def test_restart_after_crash_and_death_with_the_launcher(smollm2_serving_engine, tmp_path):
    s = start_serve(smollm2_serving_engine, tmp_path / "serve", "--restart")
    try:
        first = s.triton_pid
        os.killpg(first, signal.SIGKILL)             # a crash
        s.wait_for(r"restarted: tritonserver pid (\d+) ready", 300)
        second = s.triton_pids()[-1]
        assert second != first and "exited unexpectedly (code -9); restarting" in s.out()
        r = sse_request(f"{s.openai}/completions", completion("After the crash:", 3))
        assert r["done"] and r["error"] is None and r["finish_reason"] == "length", r
        # the launcher dies without a word: its tritonserver follows (parent-death signal)
        s.proc.kill()
        s.proc.wait(30)
        wait_until(lambda: _gone(second), 60, "tritonserver exiting after its launcher")
        # the crashed server's segments were removed by the launcher, the second server
        # removed its own on the way out
        wait_until(lambda: not [p for p in os.listdir("/dev/shm")
                                if p.startswith(f"sawtrt{s.proc.pid}_")], 30, "shm removed")
    finally:
        s.kill_all()


def _gone(pid: int) -> bool:
    try:
        os.killpg(pid, 0)
    except ProcessLookupError:
        return True
    # a zombie child of a dead launcher is reaped by init; count it as gone when not running
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()[0] == "Z"
    except OSError:
        return True
