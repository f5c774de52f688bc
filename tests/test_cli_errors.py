"""A new user's mistakes get one line of error, never a traceback; `sawtrt --help` is instant."""
from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from runtime_helpers import build_tiny, tiny_spec
from sawtrt.cli import COMMANDS, main as cli
from sawtrt.kernels import archs

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny(tmp_path_factory.mktemp("tiny"), tiny_spec("llama"), kv_cache="int4-bdr",
                      max_seq_len=64, max_batch=4)


def one_line_error(r, code: int, *words: str) -> None:
    assert r.exit_code == code, r.output
    assert "Traceback" not in r.output and r.exception is None or isinstance(r.exception,
                                                                              SystemExit)
    err = [line for line in r.output.splitlines() if line.startswith("Error")]
    assert len(err) == 1, r.output
    for w in words:
        assert w in err[0], r.output


def test_help_imports_no_torch():
    code = ("import sys, runpy; sys.argv = ['sawtrt', '--help']\n"
            "try:\n    runpy.run_module('sawtrt', run_name='__main__')\n"
            "except SystemExit:\n    pass\n"
            "assert 'torch' not in sys.modules, 'sawtrt --help imported torch'\n"
            "print('NO-TORCH')")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0 and "NO-TORCH" in r.stdout, r.stderr
    assert "generate" in r.stdout and "build" in r.stdout


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_help_lines_match_commands(name):
    module, attr = COMMANDS[name][0].split(":")
    cmd = getattr(importlib.import_module(f"sawtrt.cli.{module}"), attr)
    assert cmd.get_short_help_str(limit=200) == COMMANDS[name][1], \
        f"update sawtrt/cli/__init__.py COMMANDS[{name!r}] to the command's docstring"


def test_generate_not_an_engine_dir(tmp_path):
    r = CliRunner().invoke(cli, ["generate", "--engine", str(tmp_path), "hi"])
    one_line_error(r, 2, "--engine", "not an engine directory")


def test_generate_broken_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"format": "something else"}))
    r = CliRunner().invoke(cli, ["generate", "--engine", str(tmp_path), "hi"])
    one_line_error(r, 2, "--engine", "not a sawtrt engine config")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
def test_generate_cuda_without_gpu(tiny_dir):
    r = CliRunner().invoke(cli, ["generate", "--engine", str(tiny_dir), "--device", "cuda", "hi"])
    one_line_error(r, 2, "--device", "no CUDA GPU")


@pytest.mark.parametrize("device", ["tpu", "cuda:x", "meta"])
def test_generate_bad_device(tiny_dir, device):
    r = CliRunner().invoke(cli, ["generate", "--engine", str(tiny_dir), "--device", device, "hi"])
    one_line_error(r, 2, "--device")


def test_generate_negative_max_tokens(tiny_dir):
    r = CliRunner().invoke(cli, ["generate", "--engine", str(tiny_dir), "--max-tokens", "-1",
                                 "hi"])
    one_line_error(r, 2, "--max-tokens")


def test_generate_streams_one_prompt(tiny_dir):
    r = CliRunner().invoke(cli, ["generate", "--engine", str(tiny_dir), "--device", "cpu",
                                 "--max-tokens", "4", "--ignore-eos", "hello"])
    assert r.exit_code == 0, r.output
    assert "4 tokens" in r.output and "finish: length" in r.output


def test_generate_prompt_too_long(tiny_dir):
    r = CliRunner().invoke(cli, ["generate", "--engine", str(tiny_dir), "--device", "cpu",
                                 "x" * 200])
    one_line_error(r, 2, "max_seq_len")


@pytest.mark.parametrize("args,words", [
    ([], ["--model"]),
    (["--model", "nope-1b", "--random-weights"], ["unknown model"]),
    (["--model", "smollm2-135m", "--random-weights", "--kv-cache", "int5"], ["KV policy"]),
    (["--model", "smollm2-135m", "--random-weights", "--kv-cache", "int4-bdr:h=7"], []),
    (["--model", "smollm2-135m", "--random-weights", "--gpu-arch", "hopper"], ["--gpu-arch"]),
])
def test_build_mistakes(tmp_path, args, words):
    r = CliRunner().invoke(cli, ["build", *args, "--output", str(tmp_path / "e")])
    one_line_error(r, 2, *words)
    assert not (tmp_path / "e").exists()


def test_kernel_archs_without_gpu():
    none = lambda: None          # noqa: E731
    archs_, note = archs.kernel_archs(None, local=none)
    assert archs_ is None and "no GPU" in note and "--gpu-arch" in note and "\n" not in note
    archs_, note = archs.kernel_archs(("90", "sm_80", "sm_90"), local=none)
    assert archs_ == ("sm_90", "sm_80") and "--gpu-arch" in note
    assert archs.kernel_archs(None, local=lambda: ("sm_90a",))[0] == ("sm_90a",)
    assert archs.kernel_archs(("90",), enabled=False)[0] is None
    assert archs.kernel_archs(("90",), have_nvcc=False, local=none)[0] is None
    with pytest.raises(ValueError, match="gpu-arch"):
        archs.kernel_archs(("sm_9x",), have_nvcc=False)
    for bad in ("sm_90aa", "30", "sm", "131"):
        with pytest.raises(ValueError):
            archs.normalize(bad)
    assert archs.normalize("SM_90A") == "sm_90a" and archs.normalize("100a") == "sm_100a"


def test_build_logs_tensorrt_skip_in_one_line(tmp_path):
    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("TensorRT is installed here")
    from sawtrt.build import BuildOptions, build_engine
    logs = []
    build_engine(BuildOptions(model="tiny", spec=tiny_spec("llama"), random_weights=True,
                              kv_cache="int4", page_size=16, max_seq_len=64,
                              compile_kernels=False, output=str(tmp_path / "e")),
                 log=logs.append, progress=False)
    assert "TensorRT not installed: skipping model.plan" in logs
    assert not any("ModuleNotFoundError" in line for line in logs), logs


def test_generate_threads(tiny_dir):
    r = CliRunner().invoke(cli, ["generate", "--engine", str(tiny_dir), "--threads", "0", "hi"])
    one_line_error(r, 2, "--threads")
    n = torch.get_num_threads()
    try:
        r = CliRunner().invoke(cli, ["generate", "--engine", str(tiny_dir), "--device", "cpu",
                                     "--threads", "1", "--max-tokens", "2", "hi"])
        assert r.exit_code == 0, r.output
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(n)
