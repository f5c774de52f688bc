// Skinny GEMM for decode steps: y[M, N] = x[M, K] W[N, K]^T (+ bias), M <= kLinearMaxM.
//
// A decode step of a 4B model reads 8 GB of weights for a handful of rows: the GEMMs are pure
// weight streams. At one row cuBLAS runs a tensor-core tile with split-K and reaches 33-62 % of
// the copy bandwidth on Qwen3-4B's layer shapes (H200: qkv 17.5 us for 31 MB). Here every warp
// streams whole weight rows with 16-byte loads, twelve in flight per lane (the next row's go
// out before a row's reduction), and the M dot products run on the CUDA cores in fp32 from x in
// shared memory. That wins at M = 1 (1.13-1.17x on qkv, o, gate_up); each extra row adds its
// shared-memory reads and conversions per weight chunk, and at M = 8 the kernel is 1.7-2.5x
// slower than cuBLAS (sawtrt.bench.linear), so the runtime routes one row here.
//
// Layout: W row-major [N, K] (torch's Linear weight), K % 8 == 0 and 16-byte aligned rows;
// x rows with stride x_stride elements (16-byte aligned), staged once per CTA in shared memory
// (M * K elements); y rows with stride y_stride. Rows of W are spread over all warps of the
// grid, so every launch fills the machine whatever N is.
//
// What a decoder layer does around its GEMMs at one row rides along, so that the layer is a
// chain of these kernels with nothing between them: RMSNorm of x while staging it (each CTA
// reduces its own copy: K elements), the residual add in the store, and for the MLP's down
// projection silu(gate) * up while staging.
#pragma once
#include <cstdint>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "saw/c_api.h"
#include "saw/codec.cuh"
#include "saw/launch.cuh"

namespace saw {

// Tuning knobs (-D at compile time; the library is built with these defaults). Twelve loads
// per lane fit 80 registers, so three CTAs share an SM: 1.5x the warps in flight of sixteen
// loads at two CTAs, a Qwen3-4B decode step 2 % faster at one row (H200, sawtrt.bench
// decode_step; eight loads at four CTAs gained nothing).
#ifndef SAW_LINEAR_UNROLL
#define SAW_LINEAR_UNROLL 12
#endif
#ifndef SAW_LINEAR_MIN_BLOCKS
#define SAW_LINEAR_MIN_BLOCKS 3
#endif

constexpr int kLinearMaxM = SAW_LINEAR_MAX_M;
constexpr int kLinearWarps = 8;   // per CTA
constexpr int kLinearUnroll = SAW_LINEAR_UNROLL;  // 16-byte weight loads in flight per lane
                                                  // (12: a whole row at K <= 3072)

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

// One batch of a lane's weight chunks of `row`: chunks c0, c0 + 32, ... below `end` (zero past
// it).
__device__ __forceinline__ void LoadBatch(const uint4* wr, int c0, int end,
                                          uint4 (&wv)[kLinearUnroll]) {
#pragma unroll
  for (int u = 0; u < kLinearUnroll; ++u) {
    const int c = c0 + 32 * u;
    wv[u] = c < end ? LdgStream(wr + c) : make_uint4(0, 0, 0, 0);
  }
}

// 8 elements of x RMS-normalized: dtype(w * dtype(x * inv_rms)), the rounding of the eager
// RMSNorm (and of inductor's, which keeps the cast between the two products).
template <typename T>
__device__ __forceinline__ uint4 NormScale8(const uint4& x, const uint4& w, float inv_rms) {
  const uint32_t xw[4] = {x.x, x.y, x.z, x.w}, ww[4] = {w.x, w.y, w.z, w.w};
  uint32_t out[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 a = Unpack2<T>(PackFloat2<T>(Unpack2<T>(xw[i]).x * inv_rms,
                                              Unpack2<T>(xw[i]).y * inv_rms));
    const float2 g = Unpack2<T>(ww[i]);
    out[i] = PackFloat2<T>(g.x * a.x, g.y * a.y);
  }
  return make_uint4(out[0], out[1], out[2], out[3]);
}

__device__ __forceinline__ void NamedBarrier(int id, int threads) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}

struct LinearParams {
  const void* x;             // [M, x_stride]; kGlu: [gate | up], 2k columns
  int64_t x_stride;
  const void* w;             // [n, k]
  const void* bias;          // [n] or null
  const void* norm_w;        // [k]: RMSNorm of the staged x rows (null: none)
  float norm_eps;
  const void* residual;      // [M, residual_stride]: y = residual + x w^T (null: none)
  int64_t residual_stride;
  void* y;                   // [M, y_stride]
  int64_t y_stride;
  int n, k;
  int slices;                // warps sharing one row, each over a contiguous run of k: 1, 2, 4, 8
};

// kGlu: x holds [gate | up] (2k columns) and the kernel stages silu(gate) * up.
//
// Work split: a group of `slices` warps of one CTA takes a row at a time (rows g, g + G, ...
// over the G groups of the grid), each warp a contiguous run of the row's chunks, and the
// group's first warp adds the partial sums (shared memory, a named barrier per group). A row per
// warp leaves a ragged last round where n is just above a multiple of the grid's warps; the
// launcher shares rows where that lowers the most bytes any warp streams (linear.cu
// PickSlices). On the H200 at two CTAs per SM (2112 warps) Qwen3-4B's down projection (2560
// rows) took four warps a row, 23.1 -> 21.9 us; at three (3168 warps, the one-row default)
// none of its one-row shapes shares a row. The register cap of SAW_LINEAR_MIN_BLOCKS CTAs per
// SM applies at one row: more rows' accumulators spill.
template <typename T, int M, bool kGlu>
__global__ void __launch_bounds__(kLinearWarps * 32, M == 1 ? SAW_LINEAR_MIN_BLOCKS : 1)
LinearKernel(const LinearParams p) {
  extern __shared__ __align__(16) uint8_t smem[];
  uint4* xs = reinterpret_cast<uint4*>(smem);  // [M][K / 8] chunks of 8 elements
  __shared__ float part[2][kLinearWarps][M];    // a group's partial sums, by row parity
  __shared__ float inv_rms[M];
  const T* w = static_cast<const T*>(p.w);
  const int k = p.k, n = p.n, chunks = k / 8, slices = p.slices;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int per_cta = kLinearWarps / slices, slice = warp % slices;
  const int seg = (chunks + slices - 1) / slices;
  const int c_begin = slice * seg, c_end = min(chunks, c_begin + seg);
  const int groups = gridDim.x * per_cta;
  int row = blockIdx.x * per_cta + warp / slices;
  auto row_ptr = [&](int r) { return reinterpret_cast<const uint4*>(w + int64_t(r) * k); };

  // The first batch of weights does not depend on the kernel before (which writes x): its loads
  // go out before griddepcontrol.wait, overlapping that kernel's tail under programmatic
  // dependent launch (a no-op wait otherwise). x, bias and residual are read after it.
  uint4 wv[kLinearUnroll];
  if (row < n) LoadBatch(row_ptr(row), c_begin + lane, c_end, wv);
  // A programmatic launch after this one (the next GEMM) may get its CTAs scheduled as these
  // retire and start its own weight loads; it waits for this grid before it reads y.
  LaunchDependents();
  GridDependencyWait();
  const T* x = static_cast<const T*>(p.x);
  for (int i = threadIdx.x; i < M * chunks; i += blockDim.x) {
    const int m = i / chunks, c = i % chunks;
    const T* xr = x + m * p.x_stride + 8 * int64_t(c);
    if constexpr (kGlu)
      xs[i] = SiluMul8<T>(*reinterpret_cast<const uint4*>(xr),
                          *reinterpret_cast<const uint4*>(xr + k));
    else
      xs[i] = *reinterpret_cast<const uint4*>(xr);
  }
  __syncthreads();
  if (p.norm_w != nullptr) {  // warp m reduces row m (M <= kLinearWarps), then all rescale
    static_assert(M <= kLinearWarps, "one warp per staged row");
    if (warp < M) {
      float ss = 0.f;
      for (int c = lane; c < chunks; c += 32) {
        const uint4 v = xs[warp * chunks + c];
        const uint32_t vw[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const float2 f = Unpack2<T>(vw[i]);
          ss = fmaf(f.x, f.x, fmaf(f.y, f.y, ss));
        }
      }
#pragma unroll
      for (int s = 16; s > 0; s >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, s);
      if (lane == 0) inv_rms[warp] = rsqrtf(ss / float(k) + p.norm_eps);
    }
    __syncthreads();
    const uint4* nw = static_cast<const uint4*>(p.norm_w);
    for (int i = threadIdx.x; i < M * chunks; i += blockDim.x)
      xs[i] = NormScale8<T>(xs[i], nw[i % chunks], inv_rms[i / chunks]);
    __syncthreads();
  }

  for (int r = 0; row < n; row += groups, ++r) {
    const uint4* wr = row_ptr(row);
    float acc[M];
#pragma unroll
    for (int m = 0; m < M; ++m) acc[m] = 0.f;
    for (int c0 = c_begin + lane; c0 < c_end; c0 += 32 * kLinearUnroll) {
      if (c0 != c_begin + lane) LoadBatch(wr, c0, c_end, wv);  // the first batch is loaded
#pragma unroll
      for (int u = 0; u < kLinearUnroll; ++u) {
        const int c = c0 + 32 * u;
        if (c < c_end) Dot8<T, M>(wv[u], xs, chunks, c, acc);
      }
    }
    // the next row's first batch goes out before this row's reduction and store
    if (row + groups < n) LoadBatch(row_ptr(row + groups), c_begin + lane, c_end, wv);
#pragma unroll
    for (int m = 0; m < M; ++m) {
#pragma unroll
      for (int s = 16; s > 0; s >>= 1) acc[m] += __shfl_xor_sync(0xffffffffu, acc[m], s);
    }
    if (slices > 1) {
      // parity buffers: a warp writes row r + 2's partials only after the barrier of row r + 1,
      // which the group's first warp reaches after it has read row r's
      if (lane == 0) {
#pragma unroll
        for (int m = 0; m < M; ++m) part[r & 1][warp][m] = acc[m];
      }
      NamedBarrier(1 + warp / slices, 32 * slices);
      if (slice != 0) continue;
#pragma unroll
      for (int m = 0; m < M; ++m) {
        float v = 0.f;
        for (int s = 0; s < slices; ++s) v += part[r & 1][warp + s][m];
        acc[m] = v;
      }
    }
    if (lane < M) {  // lane m writes row m's element (acc is warp-uniform after the reduction)
      float v = 0.f;
#pragma unroll
      for (int m = 0; m < M; ++m) v = lane == m ? acc[m] : v;
      if (p.bias != nullptr) v += ToFloat<T>(static_cast<const T*>(p.bias)[row]);
      if (p.residual != nullptr)  // the projection rounded, then the residual add rounded
        v = ToFloat<T>(static_cast<const T*>(p.residual)[lane * p.residual_stride + row]) +
            ToFloat<T>(FromFloat<T>(v));
      static_cast<T*>(p.y)[lane * p.y_stride + row] = FromFloat<T>(v);
    }
  }
}

}  // namespace saw
