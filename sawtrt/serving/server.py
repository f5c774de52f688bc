"""Find and launch a real `tritonserver` for a model repository.

Where the binary comes from: a `tritonserver` on PATH (a Triton container, with its own
backends), else the one inside the `nvidia-pytriton` wheel (Triton 2.51 with the Python backend).
The wheel's layout needs three things to run outside PyTriton, all done here:

- a backend directory whose `python/` holds `libtriton_python.so`, `triton_python_backend_utils.py`
  and the stub built for *this* interpreter's Python version (the wheel ships one per version);
- `LD_LIBRARY_PATH` with the wheel's `nvidia_pytriton.libs` (libtritonserver and friends) and, first,
  this interpreter's own `libpython` directory, so the stub embeds the same Python build;
- a `python3` first on `PATH` that gives the stub this process's packages: the stub ignores
  PYTHONPATH and derives `sys.prefix` from the `python3` it finds on PATH. `stub_python_env`
  makes a venv-shaped directory (pyvenv.cfg, bin/python3 -> this interpreter) whose
  site-packages holds one .pth listing this process's `sys.path` (so PYTHONPATH entries and
  venv packages reach the stub alike), preceded by `$SAWTRT_TRITON_STUB_PATH` (e.g. numpy 1.26:
  the 2.51 stub breaks with numpy 2.x).

Process life: the server runs in its own session (a terminal's Ctrl-C reaches only the launcher,
which then drains and stops it) with a parent-death signal (SIGTERM when the launching thread
dies, even by SIGKILL); its Python backend's shared-memory segments carry a per-server prefix
and are removed after it exits, along with those of launchers that died without cleaning up.
`start()` refuses ports something else is listening on, so `wait_ready` can never see another
process's server.

`$SAWTRT_TRITONSERVER` names the `tritonserver` binary to use before anything else: one inside
a copy of the wheel's layout (`.../pytriton/tritonserver/bin/tritonserver`, e.g. the bundle made by
benchmarks/make_triton_bundle.sh) is run as above; any other binary brings its own backends.
"""
from __future__ import annotations

import contextlib
import functools
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from sawtrt.serving.control import CONTROL_DIR_ENV, DRAIN_FILE, DRAINED_FILE


class TritonNotFound(RuntimeError):
    pass


class ServerError(RuntimeError):
    pass


@dataclass(frozen=True)
class TritonDist:
    binary: Path
    backend_dir: Path | None   # None: the binary's own default (/opt/tritonserver/backends)
    libs_dir: Path | None      # extra shared libraries the binary needs


TRITONSERVER_ENV = "SAWTRT_TRITONSERVER"        # path of the tritonserver binary to use
STUB_PATH_ENV = "SAWTRT_TRITON_STUB_PATH"        # dirs put first on the Python stub's sys.path


def _py_version() -> str:
    return f"{sys.version_info.major}.{sys.version_info.minor}"


def find_tritonserver() -> TritonDist:
    explicit = os.environ.get(TRITONSERVER_ENV)
    if explicit:
        binary = Path(explicit)
        if not binary.is_file() or not os.access(binary, os.X_OK):
            raise TritonNotFound(f"${TRITONSERVER_ENV}={explicit} is not an executable file")
        dist = binary.resolve().parent.parent
        if (dist / "python_backend_stubs").is_dir():          # the wheel's layout
            return _wheel_dist(dist)
        return TritonDist(binary, None, None)
    on_path = shutil.which("tritonserver")
    if on_path:
        return TritonDist(Path(on_path), None, None)
    try:
        import pytriton  # noqa: F401  (the nvidia-pytriton wheel)
    except ImportError as e:
        raise TritonNotFound(
            "no `tritonserver` on PATH and the nvidia-pytriton wheel is not installed; "
            f"install the serving extra (pip install -e '.[serving]') or set ${TRITONSERVER_ENV}"
            ) from e
    return _wheel_dist(Path(pytriton.__file__).resolve().parent / "tritonserver")


def _wheel_dist(dist: Path) -> TritonDist:
    """The nvidia-pytriton layout: DIST = .../pytriton/tritonserver, libraries in
    .../nvidia_pytriton.libs (the binaries' RPATHs point there)."""
    binary = dist / "bin" / "tritonserver"
    stub = dist / "python_backend_stubs" / _py_version() / "triton_python_backend_stub"
    if not binary.exists() or not stub.exists():
        raise TritonNotFound(f"{dist} has no tritonserver or no Python {_py_version()} stub")
    _check_libpython()
    return TritonDist(binary, dist / "backends", dist.parent.parent / "nvidia_pytriton.libs")


def _check_libpython() -> None:
    """The stub links libpythonX.Y.so; a statically linked interpreter has none to give it."""
    if sysconfig.get_config_var("Py_ENABLE_SHARED"):
        return
    import ctypes.util
    if ctypes.util.find_library(f"python{_py_version()}") is None:
        raise TritonNotFound(
            f"the Python backend stub needs libpython{_py_version()}.so and this interpreter "
            f"({sys.executable}) is statically linked; none is on the loader path either")


def prepare_backend_dir(dist: TritonDist, workdir: Path) -> Path | None:
    """A backend directory for the wheel's server: python/ with the stub for this Python."""
    if dist.backend_dir is None:
        return None
    out = Path(workdir) / "backends"
    py = out / "python"
    py.mkdir(parents=True, exist_ok=True)
    stub = dist.backend_dir.parent / "python_backend_stubs" / _py_version() / \
        "triton_python_backend_stub"
    for src, name in ((dist.backend_dir / "python" / "libtriton_python.so", "libtriton_python.so"),
                      (dist.backend_dir / "python" / "triton_python_backend_utils.py",
                       "triton_python_backend_utils.py"),
                      (stub, "triton_python_backend_stub")):
        dst = py / name
        if dst.is_symlink() or dst.exists():
            dst.unlink()
        dst.symlink_to(src)
    return out


# the directory holding the `sawtrt` package (a namespace package: no __init__.py to ask)
PACKAGE_ROOT = Path(__file__).resolve().parents[2]


def stub_python_env(workdir: Path, extra_paths=None) -> Path:
    """A venv-shaped directory for the Python backend stub; returns its `bin/` (put it first on
    the server's PATH). Its site-packages has one `sawtrt_stub.pth`: `extra_paths` (default
    `$SAWTRT_TRITON_STUB_PATH`), then every directory on this process's `sys.path`, so the stub
    imports what this process imports (sawtrt from PYTHONPATH, torch from site-packages), with the
    stub-only packages first."""
    if extra_paths is None:
        extra_paths = [p for p in os.environ.get(STUB_PATH_ENV, "").split(os.pathsep) if p]
    root = Path(workdir) / "stub-python"
    bin_dir = root / "bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    base = Path(getattr(sys, "_base_executable", None) or sys.executable)
    for name in ("python3", f"python{_py_version()}", "python"):
        link = bin_dir / name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(base)
    (root / "pyvenv.cfg").write_text(
        f"home = {base.parent}\ninclude-system-site-packages = false\n"
        f"version = {'.'.join(map(str, sys.version_info[:3]))}\n")
    site = root / "lib" / f"python{_py_version()}" / "site-packages"
    site.mkdir(parents=True, exist_ok=True)
    entries = []
    # this process's sawtrt first: an editable install's import hook does not reach the stub,
    # and a cwd-relative sys.path entry ('') would depend on where tritonserver was started
    for p in [*extra_paths, os.fspath(PACKAGE_ROOT), *sys.path]:
        if p and os.path.isabs(p) and os.path.isdir(p) and p not in entries:
            entries.append(p)
    (site / "sawtrt_stub.pth").write_text("".join(e + "\n" for e in entries))
    return bin_dir


def server_env(dist: TritonDist, base: dict | None = None, stub_bin: Path | None = None) -> dict:
    env = dict(os.environ if base is None else base)
    lib_dirs = []
    if sysconfig.get_config_var("Py_ENABLE_SHARED"):
        lib_dirs.append(sysconfig.get_config_var("LIBDIR"))
    if dist.libs_dir is not None:
        lib_dirs.append(os.fspath(dist.libs_dir))
    if env.get("LD_LIBRARY_PATH"):
        lib_dirs.append(env["LD_LIBRARY_PATH"])
    env["LD_LIBRARY_PATH"] = ":".join(lib_dirs)
    first = os.fspath(stub_bin) if stub_bin is not None else os.path.dirname(sys.executable)
    env["PATH"] = first + os.pathsep + env.get("PATH", "")
    env.setdefault("OMP_NUM_THREADS", str(max(1, os.cpu_count() or 1)))
    return env


def url_host(host: str) -> str:
    """host as it goes into a URL: an IPv6 literal in brackets."""
    return f"[{host}]" if ":" in host else host


def _family(host: str) -> int:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def port_in_use(host: str, port: int) -> bool:
    """Whether something listens on (host, port): a bind with SO_REUSEADDR fails only then
    (a port in TIME_WAIT is not "in use")."""
    with socket.socket(_family(host), socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def check_ports_free(host: str, ports: dict) -> None:
    """ServerError naming every port (name -> number, 0 = pick later) that is already taken."""
    taken = [f"{name} port {port}" for name, port in ports.items() if port and port_in_use(host, port)]
    if taken:
        raise ServerError(f"{', '.join(taken)} on {host} already in use (another server? "
                          "stop it, or pick other ports; 0 picks a free one)")


SHM_DIR = Path("/dev/shm")
SHM_PREFIX = "sawtrt"


def _remove_shm_where(doomed) -> int:
    """Unlink every /dev/shm entry whose name doomed(name) accepts; returns how many."""
    try:
        names = os.listdir(SHM_DIR)
    except OSError:
        return 0
    n = 0
    for name in names:
        if doomed(name):
            with contextlib.suppress(OSError):
                os.unlink(SHM_DIR / name)
                n += 1
    return n


def remove_shm(prefix: str) -> int:
    """Remove /dev/shm/<prefix>*; returns how many."""
    return _remove_shm_where(lambda name: name.startswith(prefix))


def remove_stale_shm() -> int:
    """Remove segments of servers whose launcher (the pid in `sawtrt<pid>_...`) is gone."""
    def stale(name: str) -> bool:
        if not name.startswith(SHM_PREFIX):
            return False
        pid = name[len(SHM_PREFIX):].split("_", 1)[0]
        return pid.isdigit() and not _pid_alive(int(pid))
    return _remove_shm_where(stale)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _child_setup(parent_pid: int) -> None:
    """In the forked child, before exec: a session of its own, SIGTERM when the parent (the
    thread that forked) dies; exit at once if it already has."""
    os.setsid()
    import ctypes
    PR_SET_PDEATHSIG = 1
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent_pid:
        os._exit(1)


def free_port(host: str = "127.0.0.1") -> int:
    """A port the OS says is free now (bind port 0). Racy by nature; fine for tests."""
    with socket.socket(_family(host), socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _http_ok(url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return False


@dataclass
class TritonServer:
    """One `tritonserver` process serving `model_repository` on 127.0.0.1 (or `host`).

    Ports left at 0 are picked free. Use as a context manager, or start()/wait_ready()/stop().
    """
    model_repository: Path
    grpc_port: int = 0
    http_port: int = 0
    metrics_port: int = 0
    host: str = "127.0.0.1"
    log_file: Path | str | None = None    # None: discard the server's output; "-": inherit it
    log_verbose: int = 0
    exit_timeout_s: int = 10
    extra_args: tuple = ()
    proc: subprocess.Popen | None = field(default=None, init=False, repr=False)
    _workdir: tempfile.TemporaryDirectory | None = field(default=None, init=False, repr=False)
    _log: object = field(default=None, init=False, repr=False)

    @property
    def shm_prefix(self) -> str:
        return f"{SHM_PREFIX}{os.getpid()}_{id(self)}_"

    @property
    def control_dir(self) -> Path | None:
        """Where a drain order for the backend goes (see backend.watch_control_dir)."""
        return None if self._workdir is None else Path(self._workdir.name) / "control"

    @property
    def grpc_url(self) -> str:
        return f"{url_host(self.host)}:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"http://{url_host(self.host)}:{self.http_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{url_host(self.host)}:{self.metrics_port}/metrics"

    def command(self, dist: TritonDist, backend_dir: Path | None) -> list[str]:
        cmd = [os.fspath(dist.binary),
               f"--model-repository={self.model_repository}",
               f"--grpc-address={self.host}", f"--grpc-port={self.grpc_port}",
               f"--http-address={self.host}", f"--http-port={self.http_port}",
               "--allow-metrics=true", "--allow-gpu-metrics=false", "--allow-cpu-metrics=false",
               f"--metrics-address={self.host}", f"--metrics-port={self.metrics_port}",
               f"--exit-timeout-secs={self.exit_timeout_s}",
               f"--log-verbose={self.log_verbose}",
               # a unique shared-memory prefix: several servers may run on one machine
               f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}"]
        if backend_dir is not None:
            cmd.append(f"--backend-directory={backend_dir}")
        return cmd + list(self.extra_args)

    def start(self) -> "TritonServer":
        if self.proc is not None:
            raise ServerError("server already started")
        dist = find_tritonserver()
        check_ports_free(self.host, {"gRPC": self.grpc_port, "HTTP": self.http_port,
                                     "metrics": self.metrics_port})
        remove_stale_shm()
        self.grpc_port = self.grpc_port or free_port(self.host)
        self.http_port = self.http_port or free_port(self.host)
        self.metrics_port = self.metrics_port or free_port(self.host)
        self._workdir = tempfile.TemporaryDirectory(prefix="sawtrt-triton-")
        try:
            backend_dir = prepare_backend_dir(dist, Path(self._workdir.name))
            # the wheel's stub runs this interpreter: give it this process's sys.path
            stub_bin = None if backend_dir is None else stub_python_env(Path(self._workdir.name))
            out = subprocess.DEVNULL
            if self.log_file == "-":
                out = None
            elif self.log_file is not None:
                self._log = open(self.log_file, "ab")
                out = self._log
            env = server_env(dist, stub_bin=stub_bin)
            self.control_dir.mkdir()
            env[CONTROL_DIR_ENV] = os.fspath(self.control_dir)
            parent = os.getpid()
            self.proc = subprocess.Popen(self.command(dist, backend_dir), env=env,
                                         stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=subprocess.STDOUT,
                                         preexec_fn=functools.partial(_child_setup, parent))
        except BaseException:
            self.stop()          # no process yet: closes the log file, removes the workdir
            raise
        return self

    def request_drain(self, timeout_s: float) -> None:
        """Tell the backend to stop admitting and finish its requests within `timeout_s`."""
        d = self.control_dir
        if d is None:
            return
        tmp = d / "drain.tmp"
        tmp.write_text(f"{timeout_s}\n")
        os.replace(tmp, d / DRAIN_FILE)

    def drained(self) -> bool:
        d = self.control_dir
        return d is not None and (d / DRAINED_FILE).exists()

    def is_ready(self) -> bool:
        return _http_ok(f"{self.http_url}/v2/health/ready")

    def wait_ready(self, timeout: float = 300.0, model: str | None = None,
                   cancel: threading.Event | None = None) -> bool:
        """Wait until the server (and `model`, if given) is ready; raise if it exits or times out.
        Returns False when `cancel` was set first (e.g. by a signal handler)."""
        deadline = time.monotonic() + timeout
        url = f"{self.http_url}/v2/models/{model}/ready" if model else f"{self.http_url}/v2/health/ready"
        while time.monotonic() < deadline:
            if cancel is not None and cancel.is_set():
                return False
            if self.proc is None or self.proc.poll() is not None:
                code = None if self.proc is None else self.proc.returncode
                raise ServerError(f"tritonserver exited (code {code}) before it was ready"
                                  + self._log_hint())
            if _http_ok(url):
                return True
            time.sleep(0.25)
        raise ServerError(f"tritonserver not ready after {timeout:.0f} s" + self._log_hint())

    def _log_hint(self) -> str:
        if self.log_file is None or self.log_file == "-":
            return ""
        try:
            tail = Path(self.log_file).read_text(errors="replace")[-3000:]
        except OSError:
            return ""
        return f"; log tail ({self.log_file}):\n{tail}"

    def stop(self, timeout: float | None = None) -> int | None:
        """SIGTERM (Triton drains in-flight requests for exit_timeout_s), then SIGKILL the group."""
        proc, self.proc = self.proc, None
        code = None
        if proc is not None:
            timeout = self.exit_timeout_s + 20 if timeout is None else timeout
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(timeout=30)
            code = proc.returncode
            # The Python stubs are children in the server's session; make sure none outlives it.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            remove_shm(self.shm_prefix)         # a clean exit removed them; a killed one did not
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._workdir is not None:
            self._workdir.cleanup()
            self._workdir = None
        return code

    def __enter__(self) -> "TritonServer":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
