"""Which GPU architectures `sawtrt build` compiles the kernel library for, and the one-line reason.

    archs, note = kernel_archs(requested=("90",), enabled=True, have_nvcc=True, have_script=True)

Only what will run: the architectures asked for (--gpu-arch), else the local GPUs'. A machine
without a GPU compiles nothing unless asked: the CPU runtime never loads the library, and the
five-architecture build (build_scripts/build.py's default) took 2 min on 2 idle cores and 9.5 min
on busy ones for a library nothing would use.
"""
from __future__ import annotations

# Hopper and Blackwell datacenter parts get their 'a' variants: the kernels use wgmma / TMA there
_ARCH_SPECIFIC = ((9, 0), (10, 0))


def normalize(arch: str) -> str:
    """"90", "sm_90", "sm_90a" -> build_scripts/build.py's sm_XY[a|f] form; ValueError if not."""
    a = str(arch).strip().lower()
    num = a.removeprefix("sm_").removeprefix("sm")
    digits = num.rstrip("af")
    if not digits.isdigit() or not 50 <= int(digits) <= 130 or len(num) - len(digits) > 1:
        raise ValueError(f"--gpu-arch {arch!r}: expected a compute capability like 90, sm_90 or "
                         "sm_90a")
    return f"sm_{num}"


def local_archs() -> tuple[str, ...] | None:
    """The local GPUs' architectures, None when torch sees no CUDA GPU."""
    import torch
    if not torch.cuda.is_available():
        return None
    caps = {torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())}
    return tuple(sorted(f"sm_{a}{b}" + ("a" if (a, b) in _ARCH_SPECIFIC else "")
                        for a, b in caps))


def kernel_archs(requested=None, enabled: bool = True, have_nvcc: bool = True,
                 have_script: bool = True, local=local_archs) -> tuple[tuple[str, ...] | None, str]:
    """(architectures to compile, or None for no kernel build; the reason, one line).

    requested: --gpu-arch values (validated even when nothing is compiled, so a typo is caught
    on any machine); local: returns the local GPUs' architectures or None."""
    archs = tuple(dict.fromkeys(normalize(a) for a in requested or ()))
    if not enabled:
        return None, "kernel library: not compiled (--no-kernels)"
    if not have_nvcc:
        return None, ("kernel library: nvcc not found, not compiled (CPU engines use the PyTorch "
                      "reference)")
    if not have_script:
        return None, "kernel library: build_scripts/build.py not in this checkout, not compiled"
    if archs:
        return archs, f"kernel library: compiling for {', '.join(archs)} (--gpu-arch)"
    found = local()
    if found:
        return found, f"kernel library: compiling for the local GPU ({', '.join(found)})"
    return None, ("kernel library: not compiled, no GPU here (the CPU runtime does not use it); "
                  "pass --gpu-arch 90 (repeatable) to compile it for the GPUs you will run on")
