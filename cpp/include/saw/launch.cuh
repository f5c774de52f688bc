// Kernel launch with programmatic dependent launch (PDL, sm_90+): the kernel's CTAs may be
// scheduled while the previous kernel on the stream drains, so its launch latency and any work
// that does not read that kernel's output overlap the tail. The kernel must execute
// `griddepcontrol.wait` before it reads what the previous kernel wrote. CUDA graphs capture the
// launch as a programmatic edge.
#pragma once
#include <utility>

#include <cuda_runtime.h>

namespace saw {

// Waits until the grids this one depends on programmatically have completed and their writes
// are visible (returns at once for a kernel launched without the attribute).
__device__ __forceinline__ void GridDependencyWait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}

// Lets the programmatic launch after this grid get its CTAs scheduled once every CTA of this one
// has called it (or exited); that grid still waits in GridDependencyWait for this one to finish.
__device__ __forceinline__ void LaunchDependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

template <typename... KernelArgs, typename... Args>
cudaError_t LaunchProgrammatic(void (*kernel)(KernelArgs...), dim3 grid, dim3 block,
                               size_t smem_bytes, cudaStream_t stream, Args&&... args) {
  cudaLaunchConfig_t cfg{};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem_bytes;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  const cudaError_t e = cudaLaunchKernelEx(&cfg, kernel, std::forward<Args>(args)...);
  if (e != cudaSuccess) cudaGetLastError();  // reported here, not again by a later launch
  return e;
}

}  // namespace saw
