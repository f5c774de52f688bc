#!/usr/bin/env python3
"""Compile trt_plugin/src into libsawtrt_trt_plugin.so, the SawAttention TensorRT plugin library.

    python build_scripts/build_trt_plugin.py                         # headers from the usual places
    python build_scripts/build_trt_plugin.py --trt-include DIR --out build/dev

Plain C++ (g++, or $CXX): the plugin compiles no CUDA code. Its enqueue reaches the kernels
through dlopen of libsawtrt_kernels.so (build_scripts/build.py), so the build takes seconds and
needs only TensorRT's public headers, CUDA's runtime headers and libcudart_static.a (the
per-instance signs buffer). No link to libnvinfer: TensorRT finds the creator through the
exported getCreators. TensorRT headers are looked for in --trt-include, $TENSORRT_ROOT/include,
then the usual install paths; without them the build is skipped and says so.
Usable as a module: `build(out, trt_include) -> Path`; `find_trt_include()`.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from build import BuildError, cli_result, is_current, publish, run_checked  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "trt_plugin" / "src"
LIB_NAME = "libsawtrt_trt_plugin.so"
EXPORTS = ("getCreators", "setLoggerFinder", "sawtrt_plugin_signs")
SYSTEM_TRT_INCLUDES = ("/usr/include/x86_64-linux-gnu", "/usr/include/aarch64-linux-gnu",
                       "/usr/include", "/usr/local/tensorrt/include", "/opt/tensorrt/include",
                       "/usr/local/include")
CXX_FLAGS = ["-std=c++17", "-O2", "-fPIC", "-fvisibility=hidden", "-Wall", "-Wextra"]


class HeadersNotFound(BuildError):
    """No TensorRT headers: the plugin build is skipped (not an error of the kernels build)."""


def _has_trt(d: Path) -> bool:
    return (d / "NvInferRuntime.h").is_file() and (d / "NvInferVersion.h").is_file()


def trt_include_candidates(explicit: str | os.PathLike | None = None) -> list[Path]:
    out = []
    if explicit:
        out.append(Path(explicit))
    if os.environ.get("TENSORRT_ROOT"):
        out.append(Path(os.environ["TENSORRT_ROOT"]) / "include")
    out += [Path(p) for p in SYSTEM_TRT_INCLUDES]
    return out


def find_trt_include(explicit: str | os.PathLike | None = None) -> Path:
    """The TensorRT include folder; HeadersNotFound lists where it looked. An explicit folder
    without the headers is an error, not a fall-through."""
    if explicit and not _has_trt(Path(explicit)):
        raise HeadersNotFound(f"--trt-include {explicit} has no NvInferRuntime.h")
    tried = trt_include_candidates(explicit)
    for d in tried:
        if _has_trt(d):
            return d.resolve()
    raise HeadersNotFound("TensorRT headers (NvInferRuntime.h) not found in "
                          + ", ".join(map(str, tried))
                          + " (pass --trt-include DIR or set TENSORRT_ROOT)")


def trt_version(include: Path) -> str:
    text = (include / "NvInferVersion.h").read_text(errors="replace")
    parts = []
    for key in ("MAJOR", "MINOR", "PATCH"):
        for line in text.splitlines():
            bits = line.split()
            if len(bits) >= 3 and bits[0] == "#define" and bits[1] in (
                    f"TRT_{key}_ENTERPRISE", f"NV_TENSORRT_{key}"):
                parts.append(bits[2])
                break
    return ".".join(parts) or "unknown"


def find_cuda() -> Path:
    """The CUDA toolkit root (runtime headers and libcudart_static.a)."""
    cands = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    for nvcc in (os.environ.get("NVCC"), shutil.which("nvcc")):   # the kernels' nvcc first
        if nvcc:
            cands.append(str(Path(nvcc).resolve().parent.parent))
    cands += ["/usr/local/cuda", "/usr/local/cuda-13.0"]
    for c in filter(None, cands):
        if (Path(c) / "include" / "cuda_runtime_api.h").is_file():
            return Path(c)
    raise BuildError("CUDA runtime headers not found (set CUDA_HOME)")


def _cudart_static(cuda: Path) -> Path:
    for sub in ("lib64", "lib", "targets/x86_64-linux/lib", "targets/sbsa-linux/lib"):
        p = cuda / sub / "libcudart_static.a"
        if p.is_file():
            return p
    raise BuildError(f"libcudart_static.a not found under {cuda}")


def sources() -> list[Path]:
    return sorted(SRC.glob("*.cpp"))


def _digest(cxx: str, flags: list[str], include: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(SRC.glob("*")) + [ROOT / "cpp/include/saw/c_api.h",
                                      ROOT / "cpp/include/saw/layout.cuh", Path(__file__)]:
        h.update(p.name.encode())
        h.update(p.read_bytes())
    h.update(" ".join([cxx, *flags, str(include), trt_version(include)]).encode())
    return h.hexdigest()


def build(out: str | os.PathLike = ROOT / "build", trt_include: str | os.PathLike | None = None,
          force: bool = False, verbose: bool = False) -> Path:
    """Build (or reuse) out/libsawtrt_trt_plugin.so; HeadersNotFound when TensorRT's headers
    are missing, BuildError when the compile fails."""
    include = find_trt_include(trt_include)
    cuda = find_cuda()
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if not cxx:
        raise BuildError("no C++ compiler (set CXX)")
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    lib, stamp = out / LIB_NAME, out / "trt_plugin.stamp"
    flags = CXX_FLAGS + [f"-isystem{include}", f"-isystem{cuda / 'include'}",
                         f"-I{ROOT / 'cpp' / 'include'}"]
    digest = _digest(cxx, flags, include)
    if is_current(lib, stamp, digest, force):
        return lib
    script = out / "trt_plugin.exports.map"
    script.write_text("{ global: " + "; ".join(EXPORTS) + "; local: *; };\n")
    tmp = out / (LIB_NAME + ".tmp")
    # One command: five small files compile in a few seconds, and the link sees them all.
    cmd = [cxx, *flags, "-shared", "-o", str(tmp), *map(str, sources()), str(_cudart_static(cuda)),
           "-ldl", "-lpthread", "-lrt", f"-Wl,--version-script={script}", "-Wl,--no-undefined",
           "-Wl,-soname," + LIB_NAME]
    run_checked(cmd, verbose, "plugin compile")
    return publish(tmp, lib, stamp, digest)


def build_or_skip(out, trt_include=None, force=False, verbose=False, log=print) -> Path | None:
    """build(), but a missing TensorRT is a logged skip (None) instead of an error."""
    try:
        lib = build(out, trt_include, force, verbose)
    except HeadersNotFound as e:
        log(f"TensorRT plugin: skipped ({e})")
        return None
    log(f"TensorRT plugin: {lib} (TensorRT {trt_version(find_trt_include(trt_include))} headers)")
    return lib


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "build"), help="output folder (default build/)")
    ap.add_argument("--trt-include", help="TensorRT include folder (NvInferRuntime.h)")
    ap.add_argument("--force", action="store_true", help="rebuild even if the stamp matches")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    return cli_result(lambda: build_or_skip(args.out, args.trt_include, args.force,
                                            args.verbose, log=lambda m: print(m, file=sys.stderr)))


if __name__ == "__main__":
    sys.exit(main())
