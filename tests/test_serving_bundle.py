"""How sawtrt finds tritonserver ($SAWTRT_TRITONSERVER, the wheel layout) and the Python
environment it gives the Python backend stub; engine options through config.pbtxt and the CLI.
No server is started here (test_serving_triton.py does that)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from sawtrt.serving import server as srv

PYV = f"{sys.version_info.major}.{sys.version_info.minor}"


def _exe(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n")
    path.chmod(0o755)
    return path


def _wheel_layout(root: Path, stub_version: str = PYV) -> Path:
    """root/pytriton/tritonserver/{bin,backends/python,python_backend_stubs/X.Y} and
    root/nvidia_pytriton.libs, as in the nvidia-pytriton wheel and the carry bundle."""
    dist = root / "pytriton" / "tritonserver"
    _exe(dist / "bin" / "tritonserver")
    _exe(dist / "python_backend_stubs" / stub_version / "triton_python_backend_stub")
    (dist / "backends" / "python").mkdir(parents=True)
    (root / "nvidia_pytriton.libs").mkdir()
    return dist


def test_env_var_names_a_wheel_layout(tmp_path, monkeypatch):
    dist = _wheel_layout(tmp_path)
    other = _exe(tmp_path / "elsewhere" / "tritonserver")
    monkeypatch.setenv("PATH", f"{other.parent}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv(srv.TRITONSERVER_ENV, str(dist / "bin" / "tritonserver"))
    d = srv.find_tritonserver()                          # the variable wins over PATH
    assert d.binary == dist / "bin" / "tritonserver"
    assert d.backend_dir == dist / "backends"
    assert d.libs_dir == tmp_path / "nvidia_pytriton.libs"
    # without the variable, PATH's binary is used as a container's (its own backends)
    monkeypatch.delenv(srv.TRITONSERVER_ENV)
    assert srv.find_tritonserver() == srv.TritonDist(other, None, None)


def test_env_var_names_a_plain_binary(tmp_path, monkeypatch):
    binary = _exe(tmp_path / "opt" / "tritonserver" / "bin" / "tritonserver")
    monkeypatch.setenv(srv.TRITONSERVER_ENV, str(binary))
    assert srv.find_tritonserver() == srv.TritonDist(binary, None, None)


@pytest.mark.parametrize("make", ["missing", "not-executable", "no-stub"])
def test_env_var_errors_are_clear(tmp_path, monkeypatch, make):
    if make == "missing":
        target, needle = tmp_path / "nope", "is not an executable file"
    elif make == "not-executable":
        target, needle = tmp_path / "tritonserver", "is not an executable file"
        target.write_text("")
    else:
        dist = _wheel_layout(tmp_path, stub_version="2.7")
        target, needle = dist / "bin" / "tritonserver", f"no Python {PYV} stub"
    monkeypatch.setenv(srv.TRITONSERVER_ENV, str(target))
    with pytest.raises(srv.TritonNotFound, match=needle):
        srv.find_tritonserver()


def test_backend_dir_holds_this_pythons_stub(tmp_path, monkeypatch):
    dist = _wheel_layout(tmp_path / "w")
    monkeypatch.setenv(srv.TRITONSERVER_ENV, str(dist / "bin" / "tritonserver"))
    out = srv.prepare_backend_dir(srv.find_tritonserver(), tmp_path / "work")
    stub = out / "python" / "triton_python_backend_stub"
    assert stub.resolve() == (dist / "python_backend_stubs" / PYV / "triton_python_backend_stub")


def test_stub_python_env_gives_the_stub_this_sys_path(tmp_path, monkeypatch):
    """The stub ignores PYTHONPATH and takes sys.prefix from the python3 on PATH: the directory
    made here must give an isolated interpreter (-I: no PYTHONPATH, as the stub) the stub-only
    paths first, then this process's sys.path (PYTHONPATH entries included)."""
    first, later = tmp_path / "stub-only", tmp_path / "from-pythonpath"
    for d, text in ((first, "first"), (later, "later")):
        d.mkdir()
        (d / "bundle_probe.py").write_text(f"WHERE = {text!r}\n")
        (d / f"only_{text}.py").write_text("")
    monkeypatch.setattr(sys, "path", [*sys.path, str(later)])
    monkeypatch.setenv(srv.STUB_PATH_ENV, str(first))
    bin_dir = srv.stub_python_env(tmp_path / "work")
    assert (bin_dir.parent / "pyvenv.cfg").is_file()
    env = srv.server_env(srv.TritonDist(Path("/x/tritonserver"), tmp_path, tmp_path),
                         base={"PATH": "/usr/bin:/bin"}, stub_bin=bin_dir)
    assert env["PATH"].split(os.pathsep)[0] == str(bin_dir)
    code = ("import sys, bundle_probe, only_first, only_later, sawtrt.serving.backend; "
            "print(sys.prefix); print(bundle_probe.WHERE)")
    r = subprocess.run([str(bin_dir / "python3"), "-I", "-c", code], capture_output=True,
                       text=True, cwd=tmp_path, env={"PATH": env["PATH"]}, timeout=60)
    assert r.returncode == 0, r.stderr
    prefix, where = r.stdout.split()
    assert Path(prefix) == bin_dir.parent and where == "first"
    # idempotent (the server may prepare it again in the same workdir)
    assert srv.stub_python_env(tmp_path / "work") == bin_dir


def test_engine_options_round_trip_through_config():
    from sawtrt.engine.options import EngineOptions
    from sawtrt.serving.triton_repo import render_config
    o = EngineOptions(kv_policy="int4-bdr:h=32", kv_memory_gib=1.5, max_num_seqs=16,
                      async_scheduling=False)
    params = o.to_params()
    assert EngineOptions.from_params(params) == o
    assert EngineOptions.from_params({}) == EngineOptions()
    assert o.engine_kwargs() == {"kv_policy": "int4-bdr:h=32", "kv_memory_bytes": 3 << 29,
                                 "max_num_seqs": 16, "async_scheduling": False}
    cfg = render_config("/e", options=o)
    assert 'key: "kv_policy" value: { string_value: "int4-bdr:h=32" }' in cfg
    assert 'key: "kv_memory_gib" value: { string_value: "1.5" }' in cfg
    assert 'key: "max_num_batched_tokens" value: { string_value: "" }' in cfg
    assert 'key: "async_scheduling" value: { string_value: "False" }' in cfg
    assert "kv_policy" not in render_config("/e")          # the template stays as it was
    with pytest.raises(ValueError, match="kv_memory_gib"):
        EngineOptions.from_params({"kv_memory_gib": "lots"})
    with pytest.raises(ValueError, match="must be > 0"):
        EngineOptions(kv_memory_gib=0)


def test_serve_commands_share_the_engine_options(tmp_path, monkeypatch):
    from sawtrt.cli import main
    for cmd in (["serve"], ["bench", "serve"]):
        out = CliRunner().invoke(main, [*cmd, "--help"]).output
        for opt in ("--kv-cache", "--kv-memory-gib", "--max-num-batched-tokens", "--max-num-seqs",
                    "--scheduling"):
            assert opt in out, (cmd, opt)
    r = CliRunner().invoke(main, ["bench", "serve", "--engine", str(tmp_path), "--kv-cache",
                                  "int5"])
    assert r.exit_code == 2 and "--kv-cache" in r.output, r.output
    # the options reach the model repository the server is started with
    seen = {}

    def no_server(self):
        seen["cfg"] = (Path(self.model_repository) / "sawtrt" / "config.pbtxt").read_text()
        raise srv.TritonNotFound("stop here")
    monkeypatch.setattr(srv.TritonServer, "start", no_server)
    r = CliRunner().invoke(main, ["bench", "serve", "--engine", str(tmp_path), "--kv-cache",
                                  "int4", "--kv-memory-gib", "2", "--scheduling", "sync"])
    assert r.exit_code == 1 and "stop here" in r.output, r.output
    assert 'string_value: "int4"' in seen["cfg"] and 'string_value: "2.0"' in seen["cfg"]
    assert 'key: "async_scheduling" value: { string_value: "False" }' in seen["cfg"]


def test_prompts_sized_in_tokens():
    from sawtrt.models.tokenizer import ByteTokenizer
    from sawtrt.bench.serve import make_prompt
    tok = ByteTokenizer(512)
    for n in (1, 9, 300):
        assert len(tok.encode(make_prompt(n, seed=n, tokenizer=tok))) == n
    assert len(make_prompt(7, seed=0).split()) == 7
