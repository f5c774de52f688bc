"""The launcher's line to the backend stub (a grandchild process): files in a control directory.

The launcher (`sawtrt serve`, server.TritonServer) makes the directory, passes it to tritonserver
as $SAWTRT_CONTROL_DIR (the Python stub inherits the environment) and writes `drain` holding the
drain timeout in seconds; the backend answers with `drained` once nothing is left in flight.
A file, not a signal: Triton owns the stub's signal handlers. No heavy imports here: the
launcher imports this module too.
"""
from __future__ import annotations

import os
import threading

CONTROL_DIR_ENV = "SAWTRT_CONTROL_DIR"
DRAIN_FILE, DRAINED_FILE = "drain", "drained"


def watch_control_dir(loop, control_dir, poll_s: float = 0.1,
                      stop: threading.Event | None = None) -> threading.Thread:
    """A thread that waits for `<control_dir>/drain`, calls loop.drain(timeout) (a
    backend.EngineLoop) and writes `<control_dir>/drained` once the loop is drained."""
    drain_path = os.path.join(control_dir, DRAIN_FILE)
    drained_path = os.path.join(control_dir, DRAINED_FILE)
    stop = stop or threading.Event()

    def run():
        order = None
        while not stop.wait(poll_s):
            try:
                with open(drain_path) as f:
                    text = f.read().strip()
            except OSError:
                text = None
            if text is not None and text != order:   # a new order may shorten the deadline
                order = text
                try:
                    timeout = float(text)
                except ValueError:
                    timeout = 0.0
                loop.drain(timeout)
            if loop.draining and loop.drained:
                tmp = drained_path + ".tmp"
                with open(tmp, "w") as f:
                    f.write(f"{loop.stats.completed}\n")
                os.replace(tmp, drained_path)
                return

    t = threading.Thread(target=run, name="sawtrt-control", daemon=True)
    t.start()
    return t
