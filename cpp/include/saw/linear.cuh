// Skinny GEMM for decode steps: y[M, N] = x[M, K] W[N, K]^T (+ bias), M <= kLinearMaxM.
//
// A decode step of a 4B model reads 8 GB of weights for a handful of rows: the GEMMs are pure
// weight streams. At one row cuBLAS runs a tensor-core tile with split-K and reaches 33-62 % of
// the copy bandwidth on Qwen3-4B's layer shapes (H200: qkv 17.5 us for 31 MB). Here every warp
// streams whole weight rows with 16-byte loads, sixteen in flight per lane (the next row's go
// out before a row's reduction), and the M dot products run on the CUDA cores in fp32 from x in
// shared memory. That wins at M = 1 (1.13-1.17x on qkv, o, gate_up); each extra row adds its
// shared-memory reads and conversions per weight chunk, and at M = 8 the kernel is 1.7-2.5x
// slower than cuBLAS (sawtrt.bench.linear), so the runtime routes one row here.
//
// Layout: W row-major [N, K] (torch's Linear weight), K % 8 == 0 and 16-byte aligned rows;
// x rows with stride x_stride elements (16-byte aligned), staged once per CTA in shared memory
// (M * K elements); y rows with stride y_stride. Rows of W are spread over all warps of the
// grid (warp w takes rows w, w + W, ...), so every launch fills the machine whatever N is.
#pragma once
#include <cstdint>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "saw/c_api.h"
#include "saw/codec.cuh"
#include "saw/launch.cuh"

namespace saw {

constexpr int kLinearMaxM = SAW_LINEAR_MAX_M;
constexpr int kLinearWarps = 8;   // per CTA
constexpr int kLinearUnroll = 16;  // 16-byte weight loads in flight per lane (a whole row at
                                   // K <= 4096)

// Weights are read once per step: no L1 allocation, so x in shared memory and the L1 lines of
// other kernels are not evicted for them.
__device__ __forceinline__ uint4 LdgStream(const void* p) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
  return v;
}

// The two 16-bit values of a 32-bit word as floats (element 2i in the low half).
template <typename T> __device__ __forceinline__ float2 Unpack2(uint32_t w);
template <> __device__ __forceinline__ float2 Unpack2<__nv_bfloat16>(uint32_t w) {
  return make_float2(__uint_as_float(w << 16), __uint_as_float(w & 0xffff0000u));
}
template <> __device__ __forceinline__ float2 Unpack2<__half>(uint32_t w) {
  return Half2ToFloat2(w);
}

// acc[m] += <8 weights of `wv`, 8 elements of x row m at chunk c>
template <typename T, int M>
__device__ __forceinline__ void Dot8(const uint4& wv, const uint4* xs, int chunks, int c,
                                     float (&acc)[M]) {
  const float2 w0 = Unpack2<T>(wv.x), w1 = Unpack2<T>(wv.y);
  const float2 w2 = Unpack2<T>(wv.z), w3 = Unpack2<T>(wv.w);
#pragma unroll
  for (int m = 0; m < M; ++m) {
    const uint4 xv = xs[m * chunks + c];
    const float2 x0 = Unpack2<T>(xv.x), x1 = Unpack2<T>(xv.y);
    const float2 x2 = Unpack2<T>(xv.z), x3 = Unpack2<T>(xv.w);
    float a = acc[m];
    a = fmaf(w0.x, x0.x, a); a = fmaf(w0.y, x0.y, a);
    a = fmaf(w1.x, x1.x, a); a = fmaf(w1.y, x1.y, a);
    a = fmaf(w2.x, x2.x, a); a = fmaf(w2.y, x2.y, a);
    a = fmaf(w3.x, x3.x, a); a = fmaf(w3.y, x3.y, a);
    acc[m] = a;
  }
}

// silu(g) * u of 8 elements each, in fp32, rounded once (the gated MLP's down-projection input).
template <typename T>
__device__ __forceinline__ uint4 SiluMul8(const uint4& g, const uint4& u) {
  const uint32_t gw[4] = {g.x, g.y, g.z, g.w}, uw[4] = {u.x, u.y, u.z, u.w};
  uint32_t out[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 a = Unpack2<T>(gw[i]), b = Unpack2<T>(uw[i]);
    out[i] = PackFloat2<T>(a.x / (1.f + __expf(-a.x)) * b.x, a.y / (1.f + __expf(-a.y)) * b.y);
  }
  return make_uint4(out[0], out[1], out[2], out[3]);
}

// One batch of a lane's weight chunks of `row`: chunks c0, c0 + 32, ... (zero past the row end).
__device__ __forceinline__ void LoadBatch(const uint4* wr, int c0, int chunks,
                                          uint4 (&wv)[kLinearUnroll]) {
#pragma unroll
  for (int u = 0; u < kLinearUnroll; ++u) {
    const int c = c0 + 32 * u;
    wv[u] = c < chunks ? LdgStream(wr + c) : make_uint4(0, 0, 0, 0);
  }
}

// kGlu: x holds [gate | up] (2k columns) and the kernel stages silu(gate) * up.
template <typename T, int M, bool kGlu>
__global__ void __launch_bounds__(kLinearWarps * 32)
LinearKernel(const T* __restrict__ x, int64_t x_stride, const T* __restrict__ w,
             const T* __restrict__ bias, T* __restrict__ y, int64_t y_stride, int n, int k) {
  extern __shared__ __align__(16) uint8_t smem[];
  uint4* xs = reinterpret_cast<uint4*>(smem);  // [M][K / 8] chunks of 8 elements
  const int chunks = k / 8;
  const int lane = threadIdx.x & 31;
  const int warps = gridDim.x * kLinearWarps;
  int row = blockIdx.x * kLinearWarps + (threadIdx.x >> 5);
  auto row_ptr = [&](int r) { return reinterpret_cast<const uint4*>(w + int64_t(r) * k); };

  // The first batch of weights does not depend on the kernel before (which writes x): its loads
  // go out before griddepcontrol.wait, overlapping that kernel's tail under programmatic
  // dependent launch (a no-op wait otherwise). x is read after it.
  uint4 wv[kLinearUnroll];
  if (row < n) LoadBatch(row_ptr(row), lane, chunks, wv);
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  // A programmatic launch after this one (the next GEMM) may get its CTAs scheduled as these
  // retire and start its own weight loads; it waits for this grid before it reads y.
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
  GridDependencyWait();
  for (int i = threadIdx.x; i < M * chunks; i += blockDim.x) {
    const int m = i / chunks, c = i % chunks;
    const T* xr = x + m * x_stride + 8 * int64_t(c);
    if constexpr (kGlu)
      xs[i] = SiluMul8<T>(*reinterpret_cast<const uint4*>(xr),
                          *reinterpret_cast<const uint4*>(xr + k));
    else
      xs[i] = *reinterpret_cast<const uint4*>(xr);
  }
  __syncthreads();

  for (; row < n; row += warps) {
    const uint4* wr = row_ptr(row);
    float acc[M];
#pragma unroll
    for (int m = 0; m < M; ++m) acc[m] = 0.f;
    for (int c0 = lane; c0 < chunks; c0 += 32 * kLinearUnroll) {
      if (c0 != lane) LoadBatch(wr, c0, chunks, wv);  // the first batch is already loaded
#pragma unroll
      for (int u = 0; u < kLinearUnroll; ++u) {
        const int c = c0 + 32 * u;
        if (c < chunks) Dot8<T, M>(wv[u], xs, chunks, c, acc);
      }
    }
    // the next row's first batch goes out before this row's reduction and store
    if (row + warps < n) LoadBatch(row_ptr(row + warps), lane, chunks, wv);
#pragma unroll
    for (int m = 0; m < M; ++m) {
#pragma unroll
      for (int s = 16; s > 0; s >>= 1) acc[m] += __shfl_xor_sync(0xffffffffu, acc[m], s);
    }
    if (lane < M) {  // lane m writes row m's element (acc is warp-uniform after the reduction)
      float v = 0.f;
#pragma unroll
      for (int m = 0; m < M; ++m) v = lane == m ? acc[m] : v;
      if (bias != nullptr) v += ToFloat<T>(bias[row]);
      y[lane * y_stride + row] = FromFloat<T>(v);
    }
  }
}

}  // namespace saw
