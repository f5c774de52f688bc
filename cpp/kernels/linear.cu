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

// Warps per row (1, 2, 4 or 8) that minimize the most chunks any warp streams, over `warps`
// warps in all; a warp keeps at least kMinSliceChunks of a row (8 loads per lane), or too few
// bytes are in flight per SM. Ties go to fewer slices (no partial-sum exchange).
constexpr int kMinSliceChunks = 256;

int PickSlices(int n, int chunks, int warps) {
  int best = 1;
  long best_cost = long((n + warps - 1) / warps) * chunks;
  for (int s = 2; s <= kLinearWarps; s *= 2) {
    const int seg = (chunks + s - 1) / s;
    if (seg < kMinSliceChunks) break;
    const int groups = warps / s;
    const long cost = long((n + groups - 1) / groups) * seg;
    if (cost < best_cost) best = s, best_cost = cost;
  }
  return best;
}

template <typename T, int M, bool kGlu>
struct LinearInstance {
  static constexpr auto kernel = LinearKernel<T, M, kGlu>;

  // The opt-in shared-memory maximum, once (not a stream operation: capture-safe).
  static cudaError_t Configure() {
    static cudaError_t status = [] {
      int dev = 0, optin = 0;
      cudaFuncAttributes attr{};
      cudaError_t e = cudaGetDevice(&dev);
      if (e == cudaSuccess)
        e = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
      if (e == cudaSuccess) e = cudaFuncGetAttributes(&attr, kernel);
      if (e == cudaSuccess)  // the static partial-sum buffers count against the same maximum
        e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                 optin - int(attr.sharedSizeBytes));
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
  static cudaError_t Launch(LinearParams p, cudaStream_t stream) {
    cudaError_t e = Configure();
    if (e != cudaSuccess) return e;
    const size_t smem = size_t(M) * p.k * sizeof(T);
    static const int smem_sm = SmemPerSm();
    int per_sm = CtasPerSm();
    if (smem_sm > 0) per_sm = std::min<int>(per_sm, std::max<size_t>(1, smem_sm / (smem + 1024)));
    // every CTA stages x once: no more CTAs than fit at once (warps loop over the rows)
    const int ctas = SmCount() * per_sm;
    p.slices = PickSlices(p.n, p.k / 8, ctas * kLinearWarps);
    const int rows_per_cta = kLinearWarps / p.slices;
    const int grid = std::max(1, std::min((p.n + rows_per_cta - 1) / rows_per_cta, ctas));
    // the first weight loads overlap the previous kernel's tail (saw/launch.cuh)
    return LaunchProgrammatic(kernel, dim3(grid), dim3(kThreads), smem, stream, p);
  }
};

template <typename T, int M>
cudaError_t LaunchM(int m, const LinearParams& p, bool glu, cudaStream_t stream) {
  if constexpr (M > kLinearMaxM) {
    return SetError(SAW_ERR_UNSUPPORTED, "linear: m %d > %d", m, kLinearMaxM);
  } else {
    if (m == M)
      return glu ? LinearInstance<T, M, true>::Launch(p, stream)
                 : LinearInstance<T, M, false>::Launch(p, stream);
    return LaunchM<T, M + 1>(m, p, glu, stream);
  }
}

}  // namespace

cudaError_t LaunchLinear(int32_t dtype, const void* x, int64_t x_stride, const void* w,
                         const void* bias, void* y, int64_t y_stride, int32_t m, int32_t n,
                         int32_t k, bool glu, const SawLinearFusion* fusion,
                         cudaStream_t stream) {
  LinearParams p{};
  p.x = x, p.x_stride = x_stride, p.w = w, p.bias = bias, p.y = y, p.y_stride = y_stride;
  p.n = n, p.k = k, p.slices = 1;
  if (fusion != nullptr) {
    p.norm_w = fusion->norm_weight, p.norm_eps = fusion->norm_eps;
    p.residual = fusion->residual, p.residual_stride = fusion->residual_stride;
  }
  SAW_DISPATCH_DTYPE(dtype, T, return LaunchM<T, 1>(m, p, glu, stream));
  return cudaSuccess;
}

}  // namespace saw
