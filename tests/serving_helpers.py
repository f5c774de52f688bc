"""Start `sawtrt serve` as a user would, from a directory that is not the repository, and read
its ready line; stop it with a signal. Shared by the tests that run a real tritonserver."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import sawtrt.serving.server as _server
from sawtrt.engine.sampling import SamplingParams

REPO_ROOT = _server.PACKAGE_ROOT
READY = re.compile(r"ready  grpc (\S+)  http (\S+)  metrics (\S+)(?:  openai (\S+))?")


def serve_env() -> dict:
    """The environment for `python -m sawtrt` run outside the repository: PYTHONPATH only when
    a plain interpreter there would import another sawtrt (a worktree next to an editable
    install); otherwise the installed package's own import path is what gets tested."""
    env = dict(os.environ)
    probe = subprocess.run([sys.executable, "-c",
                            "import sawtrt.serving.server as s; print(s.PACKAGE_ROOT)"],
                           capture_output=True, text=True, cwd="/", env=env)
    if probe.returncode != 0 or Path(probe.stdout.strip()) != REPO_ROOT:
        env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")]).rstrip(
            os.pathsep)
    return env


class Served:
    def __init__(self, proc, workdir: Path, out_path: Path):
        self.proc, self.workdir, self.out_path = proc, workdir, out_path
        self.grpc = self.http = self.metrics = self.openai = None
        self.triton_pid = None

    @property
    def log_path(self) -> Path:
        return self.workdir / "triton.log"

    def out(self) -> str:
        return self.out_path.read_text(errors="replace")

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def triton_pids(self) -> list[int]:
        return [int(p) for p in re.findall(r"tritonserver pid (\d+)", self.out())]

    def wait_for(self, pattern: str, timeout: float = 300.0, count: int = 1) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = list(re.finditer(pattern, self.out()))
            if len(found) >= count:
                return found[count - 1]
            if self.proc.poll() is not None:
                break
            time.sleep(0.2)
        raise AssertionError(f"no {pattern!r} in the output of sawtrt serve:\n{self.out()}"
                             f"\n--- triton log ---\n{self.log()}")

    def signal(self, sig=signal.SIGTERM) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 120.0) -> int:
        return self.proc.wait(timeout)

    def kill_all(self) -> None:
        """Teardown: whatever is left of the launcher and its servers."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(90)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        for pid in self.triton_pids():      # each server has its own session (pgid = pid)
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


def start_serve(engine_dir, workdir: Path, *args: str, timeout: float = 300.0) -> Served:
    """`python -m sawtrt serve --engine ENGINE` with every port 0, cwd `workdir`, the CPU device;
    returns once it printed its ready line."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    out_path = workdir / "serve.out"
    out = open(out_path, "wb")
    cmd = [sys.executable, "-m", "sawtrt", "serve", "--engine", str(engine_dir),
           "--grpc-port", "0", "--http-port", "0", "--metrics-port", "0", "--openai-port", "0",
           "--device", "cpu", "--log-file", str(workdir / "triton.log"), *args]
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            cwd=workdir, env=serve_env())
    out.close()
    s = Served(proc, workdir, out_path)
    try:
        m = s.wait_for(READY.pattern, timeout)
    except BaseException:
        s.kill_all()
        raise
    s.grpc, s.http, s.metrics, s.openai = m.groups()
    s.triton_pid = s.triton_pids()[-1]
    return s


def scrape(url: str, prefix: str = "sawtrt_") -> dict[str, float]:
    """Prometheus samples whose name starts with `prefix`, keyed `name{labels}` as printed."""
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    vals = {}
    for line in text.splitlines():
        if line.startswith(prefix):
            key, _, value = line.rpartition(" ")
            vals[key] = float(value)
    return vals


def wait_until(pred, timeout: float = 30.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached after {timeout} s")
        time.sleep(0.2)


# Greedy outputs of a batched engine depend on the batch at near-ties: the fp32 GEMMs' op order
# follows the step's row count, which can move one INT4 code of the cache, which moves this
# model's logits by a few hundredths. Seen: " 32." locally against " 32\n\nThe answer is" served,
# '.' and '\n' 0.041 apart (logits ~24).
NEAR_TIE = 0.1


def served_divergence(llm, prompt: str, ids: list[int], served: str) -> str | None:
    """None when `served` follows the local greedy `ids` up to a position where the local top
    two logits are within NEAR_TIE and takes the runner-up there; else what is wrong."""
    tok = llm.tokenizer
    k = 0
    while k < len(ids) and served.startswith(tok.decode(ids[:k + 1])):
        k += 1
    if k == len(ids):
        return "the served text extends the local one"
    rows = []
    runner = llm.engine.runner
    forward = runner.forward

    def recording(batch):
        logits = forward(batch)
        rows.append(logits[-1].clone())
        return logits
    runner.forward = recording
    try:
        llm.generate([tok.encode(prompt) + ids[:k]], SamplingParams(max_tokens=1))
    finally:
        runner.forward = forward
    top = rows[-1].topk(2)
    (first, second), (a, b) = top.values.tolist(), top.indices.tolist()
    rest = served[len(tok.decode(ids[:k])):]
    if a != ids[k] or first - second > NEAR_TIE or not tok.decode([b]) \
            or not rest.startswith(tok.decode([b])):
        return (f"diverges at token {k}: local top two {tok.decode([a])!r} {first:.3f}, "
                f"{tok.decode([b])!r} {second:.3f}; served continues {rest!r}")
    return None
