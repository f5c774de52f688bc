// Skinny GEMM for decode steps: launcher for saw/linear.cuh (see saw/launchers.h).
#include <algorithm>

#include <cuda_runtime.h>

#include "saw/c_api.h"
#include "saw/dispatch.cuh"
#include "saw/launch.cuh"
#include "saw/launchers.h"
#include "saw/linear.cuh"

namespace saw {
namespace {

constexpr int kThreads = kLinearWarps * 32;

int SmemPerSm() {
  int dev = 0, n = 0;
  if (cudaGetDevice(&dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&n, cudaDevAttrMaxSharedMemoryPerMultiprocessor, dev) !=
          cudaSuccess) {
    cudaGetLastError();
    n = 0;
  }
  return n;
}

template <typename T, int M, bool kGlu>
struct LinearInstance {
  static constexpr auto kernel = LinearKernel<T, M, kGlu>;

  // The opt-in shared-memory maximum, once (not a stream operation: capture-safe).
  static cudaError_t Configure() {
    static cudaError_t status = [] {
      int dev = 0, optin = 0;
      cudaError_t e = cudaGetDevice(&dev);
      if (e == cudaSuccess)
        e = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
      if (e == cudaSuccess)
        e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, optin);
      return e;
    }();
    return status;
  }
  // CTAs per SM the registers and threads allow (shared memory is accounted per call)
  static int CtasPerSm() {
    static int n = [] {
      int blocks = 0;
      if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, kThreads, 0) !=
          cudaSuccess) {
        cudaGetLastError();
        blocks = 2;
      }
      return std::max(blocks, 1);
    }();
    return n;
  }
  static cudaError_t Launch(const void* x, int64_t x_stride, const void* w, const void* bias,
                            void* y, int64_t y_stride, int n, int k, cudaStream_t stream) {
    cudaError_t e = Configure();
    if (e != cudaSuccess) return e;
    const size_t smem = size_t(M) * k * sizeof(T);
    static const int smem_sm = SmemPerSm();
    int per_sm = CtasPerSm();
    if (smem_sm > 0) per_sm = std::min<int>(per_sm, std::max<size_t>(1, smem_sm / (smem + 1024)));
    // every CTA stages x once: no more CTAs than fit at once (warps loop over the rows)
    const int grid = std::max(1, std::min((n + kLinearWarps - 1) / kLinearWarps,
                                          SmCount() * per_sm));
    // the first weight loads overlap the previous kernel's tail (saw/launch.cuh)
    return LaunchProgrammatic(kernel, dim3(grid), dim3(kThreads), smem, stream,
                              static_cast<const T*>(x), x_stride, static_cast<const T*>(w),
                              static_cast<const T*>(bias), static_cast<T*>(y), y_stride, n, k);
  }
};

template <typename T, int M>
cudaError_t LaunchM(int m, const void* x, int64_t x_stride, const void* w, const void* bias,
                    void* y, int64_t y_stride, int n, int k, bool glu, cudaStream_t stream) {
  if constexpr (M > kLinearMaxM) {
    return SetError(SAW_ERR_UNSUPPORTED, "linear: m %d > %d", m, kLinearMaxM);
  } else {
    if (m == M)
      return glu ? LinearInstance<T, M, true>::Launch(x, x_stride, w, bias, y, y_stride, n, k,
                                                      stream)
                 : LinearInstance<T, M, false>::Launch(x, x_stride, w, bias, y, y_stride, n, k,
                                                       stream);
    return LaunchM<T, M + 1>(m, x, x_stride, w, bias, y, y_stride, n, k, glu, stream);
  }
}

}  // namespace

cudaError_t LaunchLinear(int32_t dtype, const void* x, int64_t x_stride, const void* w,
                         const void* bias, void* y, int64_t y_stride, int32_t m, int32_t n,
                         int32_t k, bool glu, cudaStream_t stream) {
  SAW_DISPATCH_DTYPE(dtype, T,
                     return LaunchM<T, 1>(m, x, x_stride, w, bias, y, y_stride, n, k, glu,
                                          stream));
  return cudaSuccess;
}

}  // namespace saw
