// Dequantize cached prefixes into contiguous K/V rows in the activation dtype (the prefix half
// of dense prefill: the step's new tokens attend to it and to their own fresh K/V in one
// tensor-core attention call, sawtrt/kernels/dense_prefill.py).
//
// \param pool         one layer's pool, uint8 [num_pages, Hkv, head_block_bytes]
// \param prefix_lens  [num_seqs] int32: positions 0 .. prefix_lens[b]-1 of sequence b are read
// \param row_starts   [num_seqs] int32: position p of sequence b goes to row row_starts[b] + p
// \param k_out, v_out [rows, out_stride] act dtype, head h at column h*D; in the ORIGINAL basis
//                     (the BDR rotation is undone: K always, V when rotate_v), so the new
//                     tokens' q/k/v need no rotation and the output no inverse rotation.
//
// One warp per (token, KV head, K or V) vector, lane l owns elements [l*E, l*E+E), E = D/32, as
// in write_kv.cu: the inverse rotation is register butterflies + shuffles. Values follow
// sawtrt.kv_cache.decode (x = code * s + m in fp32) and hadamard.inverse_rotate, then one
// rounding to the activation dtype. Memory-bound: reads D/2 + 4 bytes, writes 2D bytes per vector.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "saw/dispatch.cuh"
#include "saw/hadamard.cuh"
#include "saw/launchers.h"
#include "saw/layout.cuh"

namespace saw {
namespace {

constexpr int kGatherWarps = 8;

template <int N> struct GatherBytes;  // an unsigned integer of N bytes for one load / store
template <> struct GatherBytes<1> { using type = uint8_t; };
template <> struct GatherBytes<2> { using type = uint16_t; };
template <> struct GatherBytes<4> { using type = uint32_t; };
template <> struct GatherBytes<8> { using type = uint2; };
template <> struct GatherBytes<16> { using type = uint4; };

template <typename T> __device__ __forceinline__ T GatherCast(float x);
template <> __device__ __forceinline__ __half GatherCast<__half>(float x) {
  return __float2half_rn(x);
}
template <> __device__ __forceinline__ __nv_bfloat16 GatherCast<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

template <typename T, int KIND, int D>
__global__ void __launch_bounds__(kGatherWarps * 32)
GatherKVKernel(const uint8_t* __restrict__ pool, const int32_t* __restrict__ block_tables,
               int32_t max_pages, const int32_t* __restrict__ prefix_lens,
               const int32_t* __restrict__ row_starts, int num_kv_heads, int page_size,
               int rotation_block, int rotate_v, const float* __restrict__ signs,
               T* __restrict__ k_out, T* __restrict__ v_out, int64_t out_stride) {
  constexpr int E = D / 32;
  const int seq = blockIdx.y;
  const int lane = threadIdx.x & 31;
  const int64_t warp = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  if (warp >= int64_t(prefix_lens[seq]) * num_kv_heads * 2) return;  // uniform per warp
  const int is_v = int(warp & 1);
  const int head = int((warp >> 1) % num_kv_heads);
  const int pos = int((warp >> 1) / num_kv_heads);
  const PageLayout layout(KIND, D, page_size);
  const int32_t page = block_tables[int64_t(seq) * max_pages + pos / page_size];
  const int off = pos % page_size;
  const uint8_t* block = layout.HeadBlock(pool, page, head, num_kv_heads);
  const uint8_t* codes = block + (is_v ? layout.v_codes : layout.k_codes) +
                         int64_t(off) * layout.code_bytes;
  float x[E];
  if constexpr (KIND == SAW_KIND_BF16) {
    using W = typename GatherBytes<2 * E>::type;
    const W w = *reinterpret_cast<const W*>(codes + lane * 2 * E);
    const __nv_bfloat16* v = reinterpret_cast<const __nv_bfloat16*>(&w);
#pragma unroll
    for (int i = 0; i < E; ++i) x[i] = __bfloat162float(v[i]);
  } else {
    const __half2 sm = *reinterpret_cast<const __half2*>(
        block + (is_v ? layout.v_params : layout.k_params) + int64_t(off) * kParamBytes);
    const float s = __low2float(sm), m = __high2float(sm);
    uint32_t c[E];
    if constexpr (KIND == SAW_KIND_INT4) {  // byte j: element 2j low nibble, 2j+1 high nibble
      using W = typename GatherBytes<E / 2>::type;
      const uint32_t w = uint32_t(*reinterpret_cast<const W*>(codes + lane * E / 2));
#pragma unroll
      for (int i = 0; i < E; ++i) c[i] = (w >> (4 * i)) & 0xFu;
    } else {
      using W = typename GatherBytes<E>::type;
      const W w = *reinterpret_cast<const W*>(codes + lane * E);
      const uint8_t* b = reinterpret_cast<const uint8_t*>(&w);
#pragma unroll
      for (int i = 0; i < E; ++i) c[i] = b[i];
    }
#pragma unroll
    for (int i = 0; i < E; ++i) x[i] = __fadd_rn(__fmul_rn(float(c[i]), s), m);  // no FMA: as torch
  }
  if (rotation_block > 0 && (!is_v || rotate_v)) WarpInverseRotate<E>(x, rotation_block, signs);
  T y[E];
#pragma unroll
  for (int i = 0; i < E; ++i) y[i] = GatherCast<T>(x[i]);
  T* dst = (is_v ? v_out : k_out) + (int64_t(row_starts[seq]) + pos) * out_stride +
           int64_t(head) * D + lane * E;
  using W = typename GatherBytes<E * sizeof(T)>::type;
  *reinterpret_cast<W*>(dst) = *reinterpret_cast<const W*>(y);
}

}  // namespace

cudaError_t LaunchGatherKV(const SawConfig& cfg, const void* pool_layer,
                           const int32_t* block_tables, int32_t max_pages_per_seq,
                           const int32_t* prefix_lens, const int32_t* row_starts,
                           int32_t num_seqs, int32_t max_prefix_len, void* k_out, void* v_out,
                           int64_t out_stride, cudaStream_t stream) {
  if (num_seqs == 0 || max_prefix_len == 0) return cudaSuccess;
  const int64_t warps = int64_t(max_prefix_len) * cfg.num_kv_heads * 2;
  const dim3 grid(unsigned((warps + kGatherWarps - 1) / kGatherWarps), unsigned(num_seqs));
  SAW_DISPATCH_DTYPE(cfg.act_dtype, T, SAW_DISPATCH_KIND(cfg.kind, KIND, SAW_DISPATCH_HEAD_DIM(
      cfg.head_dim, D,
      GatherKVKernel<T, KIND, D><<<grid, kGatherWarps * 32, 0, stream>>>(
          static_cast<const uint8_t*>(pool_layer), block_tables, max_pages_per_seq,
          prefix_lens, row_starts, cfg.num_kv_heads, cfg.page_size, cfg.rotation_block,
          cfg.rotate_v, cfg.signs, static_cast<T*>(k_out), static_cast<T*>(v_out),
          out_stride))));
  return cudaGetLastError();
}

}  // namespace saw
