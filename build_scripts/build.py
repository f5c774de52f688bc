#!/usr/bin/env python3
"""Compile cpp/ into one shared library, libsawtrt_kernels.so (plain C ABI, cudart linked
statically, so ctypes loads it without torch and the TensorRT plugin dlopens it as is).

    python build_scripts/build.py                       # default architectures, into build/
    python build_scripts/build.py --dev                 # sm_90a only: the fast path for the H200
    python build_scripts/build.py --arch sm_80,sm_90a --out build/ci
    python build_scripts/build.py --dev --trt-include ../shared/third_party/tensorrt/include

After the kernels, the command line also builds the TensorRT plugin library
(libsawtrt_trt_plugin.so, build_trt_plugin.py) into the same folder when TensorRT's headers are
found (--trt-include, $TENSORRT_ROOT/include, the usual paths), and says so when it skips.

Every cpp/kernels/*.cu and cpp/c_api.cu is compiled per file in parallel, then linked with a
version script that exports only the saw_* symbols. The result is cached: build/<...>/
build.stamp holds a hash of the sources, flags and nvcc version, and nothing is rebuilt while
it matches. Usable as a module too: `build(archs, out) -> Path`.
"""
from __future__ import annotations

import argparse
import concurrent.futures as futures
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CPP = ROOT / "cpp"
LIB_NAME = "libsawtrt_kernels.so"
# sm_100a/sm_120a: the newest families nvcc 13.0 targets; older GPUs are covered by sm_80.
DEFAULT_ARCHS = ("sm_80", "sm_89", "sm_90a", "sm_100a", "sm_120a")
DEV_ARCHS = ("sm_90a",)
# Symbol visibility is left to the link's version script (exports saw_* only): c_api.h carries
# no export attribute, so -fvisibility=hidden would hide the ABI itself.
CXX_FLAGS = ["-O3", "-std=c++17", "--expt-relaxed-constexpr", "-Xcompiler", "-fPIC"]


class BuildError(RuntimeError):
    pass


def find_nvcc() -> str | None:
    for cand in (os.environ.get("NVCC"), shutil.which("nvcc"),
                 os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc")):
        if cand and os.path.isfile(cand) and os.access(cand, os.X_OK):
            return cand
    return None


def gencode(arch: str) -> str:
    """sm_90a -> -gencode=arch=compute_90a,code=sm_90a (the -arch shorthand also runs a plain
    sm_90 pass that rejects sm_90a-only instructions)."""
    if not arch.startswith("sm_") or not arch[3:].rstrip("af").isdigit():
        raise BuildError(f"architecture {arch!r} is not of the form sm_XY[a|f]")
    return f"-gencode=arch=compute_{arch[3:]},code={arch}"


def sources() -> list[Path]:
    return [CPP / "c_api.cu"] + sorted((CPP / "kernels").glob("*.cu"))


def source_hash(archs, nvcc: str, extra: list[str]) -> str:
    h = hashlib.sha256()
    for path in sorted(CPP.rglob("*")):
        if path.is_file() and path.suffix in (".cu", ".cuh", ".h", ".hpp"):
            h.update(str(path.relative_to(CPP)).encode())
            h.update(path.read_bytes())
    h.update(Path(__file__).read_bytes())
    h.update(" ".join(list(archs) + extra).encode())
    h.update(subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.encode())
    return h.hexdigest()


def run_checked(cmd: list[str], verbose: bool, what: str = "command") -> None:
    """Run one compiler command; BuildError with its output when it fails."""
    if verbose:
        print(" ".join(cmd), flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise BuildError(f"{what} failed ({proc.returncode}): {' '.join(cmd)}\n"
                         f"{proc.stdout}{proc.stderr}")
    if verbose and (proc.stdout or proc.stderr):
        print(proc.stdout + proc.stderr, flush=True)


def is_current(lib: Path, stamp: Path, digest: str, force: bool = False) -> bool:
    """The library exists and its stamp records `digest`: nothing to rebuild."""
    return (not force and lib.is_file() and stamp.is_file()
            and stamp.read_text().strip() == digest)


def publish(tmp: Path, lib: Path, stamp: Path, digest: str) -> Path:
    """Move a finished build into place, then stamp it."""
    os.replace(tmp, lib)  # atomic: a concurrent loader never sees half a library
    stamp.write_text(digest + "\n")
    return lib


def cli_result(make) -> int:
    """Exit status of a command line build: print the library made by `make()` (None: a
    skip the builder already reported), or the BuildError."""
    try:
        lib = make()
    except BuildError as e:
        print(f"build failed: {e}", file=sys.stderr)
        return 1
    if lib is not None:
        print(lib)
    return 0


def build(archs=DEFAULT_ARCHS, out: str | os.PathLike = ROOT / "build", jobs: int | None = None,
          force: bool = False, verbose: bool = False, extra_flags: list[str] | None = None) -> Path:
    """Build (or reuse) the library for `archs` under `out`; returns the .so path."""
    nvcc = find_nvcc()
    if nvcc is None:
        raise BuildError("nvcc not found (set NVCC or CUDA_HOME, or put nvcc on PATH)")
    archs = tuple(archs)
    flags = CXX_FLAGS + [gencode(a) for a in archs] + list(extra_flags or [])
    out = Path(out).resolve()
    lib, stamp = out / LIB_NAME, out / "build.stamp"
    digest = source_hash(archs, nvcc, flags)
    if is_current(lib, stamp, digest, force):
        return lib
    obj_dir = out / "obj"
    obj_dir.mkdir(parents=True, exist_ok=True)
    srcs = sources()
    objs = [obj_dir / (s.stem + ".o") for s in srcs]
    jobs = jobs or max(1, min(len(srcs), os.cpu_count() or 1))
    with futures.ThreadPoolExecutor(jobs) as pool:
        todo = [pool.submit(run_checked, [nvcc, *flags, f"-I{CPP / 'include'}", "-c", str(s),
                                          "-o", str(o)], verbose) for s, o in zip(srcs, objs)]
        for f in futures.as_completed(todo):
            f.result()
    script = obj_dir / "exports.map"
    script.write_text("{ global: saw_*; local: *; };\n")
    tmp = out / (LIB_NAME + ".tmp")
    run_checked([nvcc, "-shared", *[gencode(a) for a in archs], "-cudart", "static", "-o",
                 str(tmp), *map(str, objs), f"-Xlinker=--version-script={script}"], verbose)
    return publish(tmp, lib, stamp, digest)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", help=f"comma-separated list (default {','.join(DEFAULT_ARCHS)})")
    ap.add_argument("--out", default=str(ROOT / "build"), help="output folder (default build/)")
    ap.add_argument("--dev", action="store_true", help="sm_90a only (fast H200 iteration)")
    ap.add_argument("-j", "--jobs", type=int, help="parallel compiles (default: CPU count)")
    ap.add_argument("--force", action="store_true", help="rebuild even if the stamp matches")
    ap.add_argument("-v", "--verbose", action="store_true")
    ap.add_argument("--lineinfo", action="store_true", help="-lineinfo, for Nsight Compute")
    ap.add_argument("--trt-include", help="TensorRT include folder for the plugin library")
    ap.add_argument("--no-trt-plugin", action="store_true", help="kernels only")
    args = ap.parse_args(argv)
    archs = DEV_ARCHS if args.dev else tuple(a.strip() for a in (args.arch or "").split(",")
                                             if a.strip()) or DEFAULT_ARCHS
    status = cli_result(lambda: build(archs, args.out, args.jobs, args.force, args.verbose,
                                      ["-lineinfo"] if args.lineinfo else None))
    if status or args.no_trt_plugin:
        return status
    # the plugin builder shares this module's helpers: let it import this very module
    sys.modules.setdefault("build", sys.modules[__name__])
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import build_trt_plugin
    return cli_result(lambda: build_trt_plugin.build_or_skip(
        args.out, args.trt_include, args.force, args.verbose,
        log=lambda m: print(m, file=sys.stderr)))


if __name__ == "__main__":
    sys.exit(main())
