// Fused rotate + quantize + paged store of a step's K and V (the cache "append").
//
// \param qkv   [num_tokens, qkv_stride] fp16/bf16, Q at column 0, K at Hq*D, V at (Hq+Hkv)*D
//              (the fused projection output, after k_norm and RoPE)
// \param slots [num_tokens] int32, page * page_size + offset; < 0 skips the token (padding)
// \param pool  one layer's pool, uint8 [num_pages, Hkv, head_block_bytes] (saw/layout.cuh)
//
// D/32 lanes encode one (token, KV head, K or V) vector, 32 elements each (kWriteE below), so
// the BDR rotation is register butterflies + a few shuffles (saw/hadamard.cuh) and min/max are
// group reductions. Every op follows sawtrt/spec.py, so codes are bit-exact with
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

// Elements per lane: a (token, KV head) vector is spread over D / 32 lanes (2, 4, 8 for D = 64,
// 128, 256), so a warp encodes 32 * 32 / D vectors of one kind (K or V) at once. At D = 128 a
// BDR block of h = 128 then takes 2 shuffle stages of 32 elements per 8 vectors (8 warp shuffles
// per vector) where a warp per vector (4 elements per lane) took 5 stages of 4 (20), and min /
// max take 4 per 8 vectors instead of 10 per vector. Shuffles are the rotation's cost: 20 per
// K vector at one warp shuffle per clock per SM is ~5 us for 8 192 tokens x 8 heads on the H200;
// the step's measured int4-bdr - int4 gap was 8-11 us per 8 192 tokens.
constexpr int kWriteE = 32;

template <typename T, int KIND, int D, bool kVecLoad>
__global__ void __launch_bounds__(kWriteWarps * 32)
WriteKVKernel(const T* __restrict__ qkv, int64_t qkv_stride, const int32_t* __restrict__ slots,
              int32_t num_tokens, uint8_t* __restrict__ pool, int num_q_heads, int num_kv_heads,
              int page_size, int rotation_block, int rotate_k, int rotate_v,
              const float* __restrict__ signs) {
  constexpr int E = kWriteE;                  // elements per lane
  constexpr int kLanes = D / E;               // lanes per vector
  constexpr int kVecs = 32 / kLanes;          // vectors per warp
  static_assert(D % E == 0 && 32 % kLanes == 0, "head_dim");
  const int lane = threadIdx.x & 31, sub = lane % kLanes;
  const int64_t warp = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  // even warps encode K, odd warps V (one kind per warp: the rotation's shuffles are uniform)
  const int is_v = int(warp & 1);
  const int64_t pairs = int64_t(num_tokens) * num_kv_heads;     // (token, KV head) pairs
  const int64_t first = (warp >> 1) * kVecs;
  if (first >= pairs) return;  // uniform per warp
  const int64_t pair = first + lane / kLanes;
  const int head = int(pair % num_kv_heads);
  const int64_t token = pair / num_kv_heads;
  // lanes of a skipped vector (padding slot, past the end) still take part in the shuffles
  const bool active = pair < pairs && slots[token] >= 0;
  const int32_t slot = active ? slots[token] : 0;

  float x[E];
  if (active) {
    const T* src = qkv + token * qkv_stride +
                   int64_t(num_q_heads + is_v * num_kv_heads + head) * D + sub * E;
    if constexpr (kVecLoad) {  // 16-byte loads instead of 2-byte ones
      constexpr int kPer = 16 / sizeof(T);
#pragma unroll
      for (int j = 0; j < E / kPer; ++j) {
        const uint4 w = __ldg(reinterpret_cast<const uint4*>(src) + j);
        const T* v = reinterpret_cast<const T*>(&w);
#pragma unroll
        for (int i = 0; i < kPer; ++i) x[j * kPer + i] = Sanitize(ToFloat(v[i]));
      }
    } else {
#pragma unroll
      for (int i = 0; i < E; ++i) x[i] = Sanitize(ToFloat(src[i]));
    }
  } else {
#pragma unroll
    for (int i = 0; i < E; ++i) x[i] = 0.f;
  }
  if (is_v ? rotate_v : rotate_k) {
    WarpRotate<E>(x, rotation_block, signs, sub * E);
#pragma unroll
    for (int i = 0; i < E; ++i) x[i] = Sanitize(x[i]);  // quant.quantize sanitizes again
  }

  const PageLayout layout(KIND, D, page_size);
  const int page = slot / page_size, offset = slot % page_size;
  uint8_t* block = layout.HeadBlock(pool, page, head, num_kv_heads);
  uint8_t* codes = block + (is_v ? layout.v_codes : layout.k_codes) + offset * layout.code_bytes +
                   sub * (E * KindBits(KIND) / 8);

  if constexpr (KIND == SAW_KIND_BF16) {
    if (!active) return;
#pragma unroll
    for (int j = 0; j < E / 8; ++j) {  // 8 bf16 per 16-byte store, element 2i in the low half
      uint32_t w[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const __nv_bfloat162 y = __floats2bfloat162_rn(x[8 * j + 2 * i], x[8 * j + 2 * i + 1]);
        w[i] = *reinterpret_cast<const uint32_t*>(&y);
      }
      reinterpret_cast<uint4*>(codes)[j] = make_uint4(w[0], w[1], w[2], w[3]);
    }
  } else {
    constexpr int kBits = KindBits(KIND);
    float lo = x[0], hi = x[0];
#pragma unroll
    for (int i = 1; i < E; ++i) lo = fminf(lo, x[i]), hi = fmaxf(hi, x[i]);
    const QuantParams p = MakeQuantParams<kBits>(WarpMin<kLanes>(lo), WarpMax<kLanes>(hi));
    if (!active) return;
    if constexpr (kBits == 4) {  // 32 codes -> 16 bytes, spec nibble order
      uint32_t w[4];
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        uint32_t c[8];
#pragma unroll
        for (int i = 0; i < 8; ++i) c[i] = QuantCode<kBits>(x[8 * j + i], p);
        w[j] = PackNibbles<8>(c);
      }
      *reinterpret_cast<uint4*>(codes) = make_uint4(w[0], w[1], w[2], w[3]);
    } else {  // 32 codes -> 32 bytes, element i in byte i
#pragma unroll
      for (int j = 0; j < E / 16; ++j) {
        uint32_t w[4];
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          w[k] = 0;
#pragma unroll
          for (int i = 0; i < 4; ++i)
            w[k] |= QuantCode<kBits>(x[16 * j + 4 * k + i], p) << (8 * i);
        }
        reinterpret_cast<uint4*>(codes)[j] = make_uint4(w[0], w[1], w[2], w[3]);
      }
    }
    if (sub == 0) {
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
  const int vecs_per_warp = 32 * kWriteE / cfg.head_dim;
  const int64_t pairs = int64_t(num_tokens) * cfg.num_kv_heads;
  const int64_t warps = 2 * ((pairs + vecs_per_warp - 1) / vecs_per_warp);  // K and V warps
  const dim3 grid(unsigned((warps + kWriteWarps - 1) / kWriteWarps)), block(kWriteWarps * 32);
  const int rot_k = cfg.rotation_block > 0, rot_v = rot_k && cfg.rotate_v;
  // 16-byte loads need every lane's elements 16-byte aligned: base and row stride
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
