"""What `sawtrt serve` runs: tritonserver + the OpenAI-compatible API, ready line, drain, stop.

    start      refuse ports something listens on; tritonserver (its own session, parent-death
               signal); wait until the model is ready; the OpenAI API (uvicorn, a thread here)
    run        until SIGINT/SIGTERM; a tritonserver that dies is started again with `restart`
               (said on stderr), otherwise the launcher exits with an error
    drain      first signal: the API answers new requests 503 "server is shutting down", the
               backend refuses new gRPC requests the same way; requests in flight run for up to
               `drain_timeout` s, then end with a final error; a second signal ends them at once
    stop       the API, then tritonserver (SIGTERM, nothing left in flight: a clean exit 0);
               shared-memory segments removed whatever happened
"""
from __future__ import annotations

import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from sawtrt.serving.server import ServerError, TritonServer, check_ports_free, url_host


def say(msg: str) -> None:
    print(f"sawtrt serve: {msg}", file=sys.stderr, flush=True)


@dataclass
class ServeConfig:
    engine_dir: Path
    model_repository: Path
    host: str = "127.0.0.1"
    grpc_port: int = 8001
    http_port: int = 8000
    metrics_port: int = 8002
    openai_port: int | None = 9000       # None: no OpenAI API
    served_model_name: str | None = None
    log_file: str = "-"
    log_verbose: int = 0
    ready_timeout_s: float = 600.0
    drain_timeout_s: float = 30.0
    restart: bool = False
    max_restarts: int = 5


@dataclass
class Launcher:
    cfg: ServeConfig
    stop_event: threading.Event = field(default_factory=threading.Event)
    signals_seen: int = 0
    server: TritonServer | None = None
    frontend: object = None              # openai_api.FrontendServer

    def on_signal(self, signum, _frame) -> None:
        self.signals_seen += 1
        self.stop_event.set()
        if self.signals_seen == 2:
            say(f"{signal.Signals(signum).name} again: ending the requests in flight now")

    def _new_server(self) -> TritonServer:
        c = self.cfg
        return TritonServer(c.model_repository, grpc_port=c.grpc_port, http_port=c.http_port,
                            metrics_port=c.metrics_port, host=c.host, log_file=c.log_file,
                            log_verbose=c.log_verbose)

    def _start_triton(self) -> bool:
        from sawtrt.serving.triton_repo import MODEL_NAME
        self.server = self._new_server()
        self.server.start()
        say(f"starting tritonserver pid {self.server.proc.pid} "
            f"(model repository {self.cfg.model_repository})")
        return self.server.wait_ready(self.cfg.ready_timeout_s, model=MODEL_NAME,
                                      cancel=self.stop_event)

    def run(self) -> int:
        c = self.cfg
        ports = {"gRPC": c.grpc_port, "HTTP": c.http_port, "metrics": c.metrics_port}
        if c.openai_port:
            ports["OpenAI API"] = c.openai_port
        check_ports_free(c.host, ports)
        old = {s: signal.signal(s, self.on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            ready = self._start_triton()
            if ready and c.openai_port is not None:
                self._start_frontend()
            if ready:
                # the ports are known only now (0 = picked free)
                s = self.server
                c.grpc_port, c.http_port, c.metrics_port = s.grpc_port, s.http_port, s.metrics_port
                api = (f"  openai http://{url_host(c.host)}:{self.frontend.port}/v1"
                       if self.frontend is not None else "")
                say(f"ready  grpc {s.grpc_url}  http {s.http_url}  metrics {s.metrics_url}{api}"
                    "  (Ctrl-C drains and stops)")
                self._watch()
            if ready and self.stop_event.is_set():
                self._drain()
        finally:
            code = self._stop()
            for s_, h in old.items():
                signal.signal(s_, h)
        say(f"tritonserver exited with code {code}")
        return code if code is not None else 1

    def _start_frontend(self) -> None:
        from sawtrt.serving.openai_api import FrontendServer, OpenAIFrontend
        c = self.cfg
        front = OpenAIFrontend.for_engine(c.engine_dir, self.server.grpc_url,
                                          served_model_name=c.served_model_name,
                                          triton_metrics_url=self.server.metrics_url)
        self.frontend = FrontendServer(front, c.host, c.openai_port).start()

    def _watch(self) -> None:
        restarts = 0
        while not self.stop_event.wait(0.5):
            proc = self.server.proc
            if proc is not None and proc.poll() is None:
                continue
            code = None if proc is None else proc.returncode
            if not self.cfg.restart or restarts >= self.cfg.max_restarts:
                self.server.stop()
                raise ServerError(f"tritonserver exited unexpectedly (code {code})"
                                  + ("" if not self.cfg.restart else
                                     f"; gave up after {restarts} restarts"))
            restarts += 1
            say(f"tritonserver exited unexpectedly (code {code}); restarting "
                f"({restarts}/{self.cfg.max_restarts})")
            self.server.stop()
            self._wait_ports_free()
            if self._start_triton():
                say(f"restarted: tritonserver pid {self.server.proc.pid} ready")

    def _wait_ports_free(self, timeout: float = 30.0) -> None:
        c = self.cfg
        deadline = time.monotonic() + timeout
        while True:
            try:
                check_ports_free(c.host, {"gRPC": c.grpc_port, "HTTP": c.http_port,
                                          "metrics": c.metrics_port})
                return
            except ServerError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def _drain(self) -> None:
        c = self.cfg
        server = self.server
        if server is None or server.proc is None or server.proc.poll() is not None:
            return
        front = None if self.frontend is None else self.frontend.frontend
        if front is not None:
            front.draining = True
        timeout = 0.0 if self.signals_seen >= 2 else c.drain_timeout_s
        server.request_drain(timeout)
        say(f"draining: new requests get 503 / UNAVAILABLE; requests in flight have "
            f"{timeout:g} s to finish (a second signal ends them now)")
        t0 = time.monotonic()
        hard = t0 + timeout + 15         # the backend ends its requests at t0 + timeout
        asked_now = timeout == 0
        while time.monotonic() < hard:
            if server.proc.poll() is not None:
                return
            if server.drained() and (front is None or front.in_flight == 0):
                say(f"drained in {time.monotonic() - t0:.1f} s")
                return
            if self.signals_seen >= 2 and not asked_now:
                server.request_drain(0.0)       # a new order: the backend ends them now
                asked_now = True
                hard = min(hard, time.monotonic() + 15)
            time.sleep(0.1)
        say("drain did not complete in time; stopping anyway")

    def _stop(self) -> int | None:
        if self.frontend is not None:
            self.frontend.stop()
            self.frontend = None
        code = None
        if self.server is not None:
            code = self.server.stop()
        return code
