// Fused rotate + quantize + paged store of a step's K and V (the cache "append").
//
// \param qkv   [num_tokens, qkv_stride] fp16/bf16, Q at column 0, K at Hq*D, V at (Hq+Hkv)*D
//              (the fused projection output, after k_norm and RoPE)
// \param slots [num_tokens] int32, page * page_size + offset; < 0 skips the token (padding)
// \param pool  one layer's pool, uint8 [num_pages, Hkv, head_block_bytes] (saw/layout.cuh)
//
// One warp encodes one (token, KV head, K or V) vector: lane l owns elements [l*E, l*E+E),
// E = D/32, so the BDR rotation is register butterflies + shuffles (saw/hadamard.cuh) and min/max
// are two warp reductions. Every op follows sawtrt/spec.py, so codes are bit-exact with
// sawtrt.kv_cache.write_kv (tests/test_kernels_gpu.py checks byte equality of whole pools).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "saw/dispatch.cuh"
#include "saw/hadamard.cuh"
#include "saw/launchers.h"
#include "saw/layout.cuh"
#include "saw/quantize.cuh"

namespace saw {
namespace {

constexpr int kWriteWarps = 4;  // 128-thread blocks; the kernel is tiny, occupancy is what counts

__device__ __forceinline__ float ToFloat(__half x) { return __half2float(x); }
__device__ __forceinline__ float ToFloat(__nv_bfloat16 x) { return __bfloat162float(x); }

template <int N>
struct Bytes;  // an unsigned integer of N bytes for one store
template <> struct Bytes<1> { using type = uint8_t; };
template <> struct Bytes<2> { using type = uint16_t; };
template <> struct Bytes<4> { using type = uint32_t; };
template <> struct Bytes<8> { using type = uint2; };
template <> struct Bytes<16> { using type = uint4; };

template <typename T, int KIND, int D, bool kVecLoad>
__global__ void __launch_bounds__(kWriteWarps * 32)
WriteKVKernel(const T* __restrict__ qkv, int64_t qkv_stride, const int32_t* __restrict__ slots,
              int32_t num_tokens, uint8_t* __restrict__ pool, int num_q_heads, int num_kv_heads,
              int page_size, int rotation_block, int rotate_k, int rotate_v,
              const float* __restrict__ signs) {
  constexpr int E = D / 32;  // elements per lane
  const int lane = threadIdx.x & 31;
  const int64_t warp = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  if (warp >= int64_t(num_tokens) * num_kv_heads * 2) return;  // uniform per warp
  const int is_v = int(warp & 1);
  const int head = int((warp >> 1) % num_kv_heads);
  const int64_t token = (warp >> 1) / num_kv_heads;
  const int32_t slot = slots[token];
  if (slot < 0) return;

  const T* src = qkv + token * qkv_stride + int64_t(num_q_heads + is_v * num_kv_heads + head) * D +
                 lane * E;
  float x[E];
  if constexpr (kVecLoad) {  // one 4/8/16-byte load per lane instead of E 2-byte loads
    using W = typename Bytes<E * sizeof(T)>::type;
    const W w = __ldg(reinterpret_cast<const W*>(src));
    const T* v = reinterpret_cast<const T*>(&w);
#pragma unroll
    for (int i = 0; i < E; ++i) x[i] = Sanitize(ToFloat(v[i]));
  } else {
#pragma unroll
    for (int i = 0; i < E; ++i) x[i] = Sanitize(ToFloat(src[i]));
  }
  if (is_v ? rotate_v : rotate_k) {
    WarpRotate<E>(x, rotation_block, signs);
#pragma unroll
    for (int i = 0; i < E; ++i) x[i] = Sanitize(x[i]);  // quant.quantize sanitizes again
  }

  const PageLayout layout(KIND, D, page_size);
  const int page = slot / page_size, offset = slot % page_size;
  uint8_t* block = layout.HeadBlock(pool, page, head, num_kv_heads);
  uint8_t* codes = block + (is_v ? layout.v_codes : layout.k_codes) + offset * layout.code_bytes;

  if constexpr (KIND == SAW_KIND_BF16) {
    __nv_bfloat16 y[E];
#pragma unroll
    for (int i = 0; i < E; ++i) y[i] = __float2bfloat16_rn(x[i]);
    using W = typename Bytes<2 * E>::type;
    *reinterpret_cast<W*>(codes + lane * 2 * E) = *reinterpret_cast<const W*>(y);
  } else {
    constexpr int kBits = KindBits(KIND);
    float lo = x[0], hi = x[0];
#pragma unroll
    for (int i = 1; i < E; ++i) lo = fminf(lo, x[i]), hi = fmaxf(hi, x[i]);
    const QuantParams p = MakeQuantParams<kBits>(WarpMin(lo), WarpMax(hi));
    uint32_t c[E];
#pragma unroll
    for (int i = 0; i < E; ++i) c[i] = QuantCode<kBits>(x[i], p);
    if constexpr (kBits == 4) {
      using W = typename Bytes<E / 2>::type;
      const uint32_t w = PackNibbles<E>(c);
      *reinterpret_cast<W*>(codes + lane * E / 2) = W(w);
    } else {
      uint8_t b[E];
#pragma unroll
      for (int i = 0; i < E; ++i) b[i] = uint8_t(c[i]);
      using W = typename Bytes<E>::type;
      *reinterpret_cast<W*>(codes + lane * E) = *reinterpret_cast<const W*>(b);
    }
    if (lane == 0) {
      __half2 sm;
      sm.x = p.scale;
      sm.y = p.offset;
      *reinterpret_cast<__half2*>(block + (is_v ? layout.v_params : layout.k_params) +
                                  offset * kParamBytes) = sm;
    }
  }
}

// Slot of every new token of a step; tokens past cu_q_lens[num_seqs] (padding) get -1.
__global__ void StepSlotsKernel(const int32_t* __restrict__ block_tables, int32_t max_pages,
                                const int32_t* __restrict__ seq_lens,
                                const int32_t* __restrict__ cu_q_lens, int32_t num_seqs,
                                int32_t num_tokens, int32_t page_size, int32_t* slots) {
  const int32_t i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= num_tokens) return;
  int lo = 0, hi = num_seqs;  // largest b with cu_q_lens[b] <= i
  while (hi - lo > 1) {
    const int mid = (lo + hi) >> 1;
    if (cu_q_lens[mid] <= i) lo = mid; else hi = mid;
  }
  const int32_t start = cu_q_lens[lo], end = cu_q_lens[lo + 1];
  int32_t slot = -1;
  if (i >= start && i < end) {
    const int32_t pos = seq_lens[lo] - (end - start) + (i - start);
    if (pos >= 0 && pos / page_size < max_pages)
      slot = block_tables[int64_t(lo) * max_pages + pos / page_size] * page_size + pos % page_size;
  }
  slots[i] = slot;
}

}  // namespace

cudaError_t LaunchWriteKV(const SawConfig& cfg, const void* qkv, int64_t qkv_stride,
                          const int32_t* slot_mapping, int32_t num_tokens, void* pool_layer,
                          cudaStream_t stream) {
  if (num_tokens == 0) return cudaSuccess;
  const int64_t warps = int64_t(num_tokens) * cfg.num_kv_heads * 2;
  const dim3 grid(unsigned((warps + kWriteWarps - 1) / kWriteWarps)), block(kWriteWarps * 32);
  const int rot_k = cfg.rotation_block > 0, rot_v = rot_k && cfg.rotate_v;
  // vector loads need every lane's E elements 16-byte aligned: base and row stride
  const bool vec = reinterpret_cast<uintptr_t>(qkv) % 16 == 0 && (qkv_stride * 2) % 16 == 0;
  SAW_DISPATCH_DTYPE(cfg.act_dtype, T, SAW_DISPATCH_KIND(cfg.kind, KIND, SAW_DISPATCH_HEAD_DIM(
      cfg.head_dim, D,
      auto kernel = vec ? WriteKVKernel<T, KIND, D, true> : WriteKVKernel<T, KIND, D, false>;
      kernel<<<grid, block, 0, stream>>>(
          static_cast<const T*>(qkv), qkv_stride, slot_mapping, num_tokens,
          static_cast<uint8_t*>(pool_layer), cfg.num_q_heads, cfg.num_kv_heads, cfg.page_size,
          cfg.rotation_block, rot_k, rot_v, cfg.signs))));
  return cudaGetLastError();
}

cudaError_t LaunchStepSlots(const int32_t* block_tables, int32_t max_pages_per_seq,
                            const int32_t* seq_lens, const int32_t* cu_q_lens, int32_t num_seqs,
                            int32_t num_tokens, int32_t page_size, int32_t* slots_out,
                            cudaStream_t stream) {
  if (num_tokens == 0) return cudaSuccess;
  StepSlotsKernel<<<(num_tokens + 255) / 256, 256, 0, stream>>>(
      block_tables, max_pages_per_seq, seq_lens, cu_q_lens, num_seqs, num_tokens, page_size,
      slots_out);
  return cudaGetLastError();
}

}  // namespace saw
