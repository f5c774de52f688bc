"""Build step: the compiled kernel library (build_scripts/build.py), copied into <engine>/lib/."""
from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from ..models import hub
from .state import BuildState, sha256_file

REPO_ROOT = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = REPO_ROOT / "build_scripts" / "build.py"


def norm_arch(a: str) -> str:
    """"90", "sm_90", "sm_90a" -> the build script's sm_XY[a] form."""
    a = a.strip().lower()
    num = a.removeprefix("sm_").removeprefix("sm")
    if not num.rstrip("af").isdigit() or not 50 <= int(num.rstrip("af")) <= 130:
        raise ValueError(f"--gpu-arch {a!r}: expected a compute capability like 90, sm_90 or "
                         "sm_90a")
    return f"sm_{num}"


def local_archs() -> tuple[str, ...] | None:
    """The local GPUs' archs; Hopper/Blackwell datacenter parts get their 'a' variants (the
    kernels use wgmma / TMA there)."""
    if torch.cuda.is_available():
        caps = {torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())}
        return tuple(sorted(f"sm_{a}{b}" + ("a" if (a, b) in ((9, 0), (10, 0)) else "")
                            for a, b in caps))
    return None


def script_default_archs() -> tuple[str, ...]:
    """Architectures compiled when there is no local GPU to ask: build_scripts/build.py's own
    default set, read from the script so the two never disagree (the script is a file of the
    source tree, not a module of the package)."""
    spec = importlib.util.spec_from_file_location("_sawtrt_build_script", BUILD_SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return tuple(mod.DEFAULT_ARCHS)


def choose_archs(compile_kernels: bool, gpu_arch) -> tuple[tuple[str, ...] | None, str]:
    """(archs to compile, or None when the step is skipped; the reason). ValueError for a bad
    --gpu-arch."""
    if not compile_kernels:
        return None, "kernel compilation disabled (--no-kernels)"
    if shutil.which("nvcc") is None:
        return None, ("nvcc not found: skipping the kernel library (CPU engines use the "
                      "PyTorch reference)")
    if not BUILD_SCRIPT.is_file():
        return None, f"{BUILD_SCRIPT} not present in this checkout: skipping the kernel library"
    if gpu_arch:
        return tuple(norm_arch(a) for a in gpu_arch), "archs from --gpu-arch"
    archs = local_archs()
    if archs:
        return archs, "archs of the local GPU"
    archs = script_default_archs()
    return archs, f"no local GPU: build_scripts/build.py's default archs {','.join(archs)}"


def run(plan, out: Path, state: BuildState, log) -> dict:
    """The config's "kernels" entry. Compiles into a per-arch-set cache shared by all engines
    (the build script keeps its own stamp of sources, flags and nvcc and skips the work while it
    matches), then copies the library into the engine's lib/ unless that copy is up to date."""
    if not plan.gpu_archs:
        log(plan.kernel_note)
        return {"library": None, "archs": None, "note": plan.kernel_note}
    cache = hub.cache_dir() / "kernels" / "-".join(plan.gpu_archs)
    cmd = [sys.executable, str(BUILD_SCRIPT), "--arch", ",".join(plan.gpu_archs), "--out",
           str(cache)]
    log(f"kernels: {' '.join(cmd)} ({plan.kernel_note})")
    r = subprocess.run(cmd, cwd=REPO_ROOT, stdout=subprocess.DEVNULL)
    if r.returncode != 0:
        raise RuntimeError(f"kernel build failed (exit {r.returncode}): {' '.join(cmd)}")
    built = sorted(cache.glob("*.so"))
    if not built:
        raise RuntimeError(f"kernel build left no library in {cache}")
    inputs = {"archs": list(plan.gpu_archs), "note": plan.kernel_note,
              "libraries": {so.name: sha256_file(so) for so in built}}
    done = state.current("kernels", inputs)
    if done is not None:
        log(f"kernels: up to date ({out / done['library']})")
        return done
    lib = out / "lib"
    lib.mkdir(exist_ok=True)
    names = []
    for so in built:
        shutil.copyfile(so, lib / so.name)
        names.append(f"lib/{so.name}")
    log(f"kernels: {', '.join(str(out / n) for n in names)}")
    result = {"library": names[0], "archs": list(plan.gpu_archs), "note": plan.kernel_note,
              "sha256": {n: inputs["libraries"][n.removeprefix('lib/')] for n in names}}
    state.record("kernels", inputs, names, result)
    return result
