"""Build step: the compiled kernel library (build_scripts/build.py), copied into <engine>/lib/."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from ..kernels.archs import kernel_archs
from ..models import hub
from .state import BuildState, sha256_file

REPO_ROOT = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = REPO_ROOT / "build_scripts" / "build.py"


def choose_archs(compile_kernels: bool, gpu_arch) -> tuple[tuple[str, ...] | None, str]:
    """(archs to compile, or None when the step is skipped; the one-line reason). ValueError for
    a bad --gpu-arch (see sawtrt.kernels.archs: only what will run is compiled)."""
    return kernel_archs(gpu_arch, compile_kernels, shutil.which("nvcc") is not None,
                        BUILD_SCRIPT.is_file())


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
    log(f"{plan.kernel_note}: {' '.join(cmd)}")
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
