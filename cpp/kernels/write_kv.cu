// Fused rotate + quantize + paged store of a step's K and V (the cache "append"), optionally
// behind the step's q/k prologue (RMSNorm of every query and key head, RoPE).
//
// \param qkv   [num_tokens, qkv_stride] fp16/bf16, Q at column 0, K at Hq*D, V at (Hq+Hkv)*D
//              (the fused projection output; after k_norm and RoPE unless the prologue runs)
// \param slots [num_tokens] int32, page * page_size + offset; < 0 skips the token (padding);
//              or derived from the step's block tables and lengths (StepSlot)
// \param pool  one layer's pool, uint8 [num_pages, Hkv, head_block_bytes] (saw/layout.cuh)
//
// D/32 lanes encode one (token, KV head, K or V) vector, 32 elements each (kWriteE below), so
// the BDR rotation is register butterflies + a few shuffles (saw/hadamard.cuh) and min/max are
// group reductions. Every op follows sawtrt/spec.py, so codes are bit-exact with
// sawtrt.kv_cache.write_kv (tests/test_kernels_gpu.py checks byte equality of whole pools).
//
// The prologue is what a decode step runs between the q/k/v projection and attention: done
// here it costs one kernel instead of the five the compiled layer work used for q/k-norm, RoPE
// and packing, plus the separate slot kernel (Qwen3-4B, one sequence: ~11 us of a ~110 us
// layer). Query heads get warps of their own; keys are normalized and rotated in the warps that
// quantize them, and both are written back into qkv (the attention kernels read q from there).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "saw/codec.cuh"
#include "saw/dispatch.cuh"
#include "saw/hadamard.cuh"
#include "saw/launch.cuh"
#include "saw/launchers.h"
#include "saw/layout.cuh"
#include "saw/quantize.cuh"

namespace saw {
namespace {

constexpr int kWriteWarps = 4;  // 128-thread blocks; the kernel is tiny, occupancy is what counts

// Elements per lane: a (token, KV head) vector is spread over D / 32 lanes (2, 4, 8 for D = 64,
// 128, 256), so a warp encodes 32 * 32 / D vectors of one kind (K or V) at once. At D = 128 a
// BDR block of h = 128 then takes 2 shuffle stages of 32 elements per 8 vectors (8 warp shuffles
// per vector) where a warp per vector (4 elements per lane) took 5 stages of 4 (20), and min /
// max take 4 per 8 vectors instead of 10 per vector. Shuffles are the rotation's cost: 20 per
// K vector at one warp shuffle per clock per SM is ~5 us for 8 192 tokens x 8 heads on the H200;
// the step's measured int4-bdr - int4 gap was 8-11 us per 8 192 tokens.
constexpr int kWriteE = 32;

template <typename T>
struct WriteParams {
  T* qkv;  // written only by the prologue
  int64_t qkv_stride;
  int32_t num_tokens;
  uint8_t* pool;
  int num_q_heads, num_kv_heads, page_size, rotation_block, rotate_k, rotate_v;
  const float* signs;
  // slots: explicit, or those of a step (block_tables, seq_lens, cu_q_lens, num_seqs)
  const int32_t* slots;
  const int32_t* block_tables;
  int32_t max_pages;
  const int32_t* seq_lens;
  const int32_t* cu_q_lens;
  int32_t num_seqs;
  bool decode;  // one token per sequence: token i belongs to sequence i
  // prologue (kernels instantiated with kPrologue only)
  const T* q_norm;  // [D] or null: no RMSNorm
  const T* k_norm;
  float norm_eps;
  const T* rope_cos;  // [num_tokens, rope_stride] or null: no RoPE
  const T* rope_sin;
  int64_t rope_stride;
  int64_t q_warps;  // warps given to query heads (0 without the prologue)
};

// Slot of a step's new token: token i of sequence b sits at position seq_lens[b] - q_len_b + i;
// -1 for padding past cu_q_lens[num_seqs] and for positions outside the block table.
template <typename T>
__device__ __forceinline__ int32_t StepSlot(const WriteParams<T>& p, int64_t token) {
  int b = 0;
  int32_t pos = -1;
  if (p.decode) {
    b = int(token);
    pos = p.seq_lens[b] - 1;
  } else {
    int lo = 0, hi = p.num_seqs;  // largest b with cu_q_lens[b] <= token
    while (hi - lo > 1) {
      const int mid = (lo + hi) >> 1;
      if (p.cu_q_lens[mid] <= token) lo = mid; else hi = mid;
    }
    const int32_t start = p.cu_q_lens[lo], end = p.cu_q_lens[lo + 1];
    if (token < start || token >= end) return -1;
    b = lo;
    pos = p.seq_lens[lo] - (end - start) + int32_t(token - start);
  }
  if (pos < 0 || pos / p.page_size >= p.max_pages) return -1;
  return p.block_tables[int64_t(b) * p.max_pages + pos / p.page_size] * p.page_size +
         pos % p.page_size;
}

// E consecutive elements at src as floats (16-byte loads when kVec).
template <typename T, int E, bool kVec>
__device__ __forceinline__ void LoadRow(const T* src, float (&x)[E]) {
  if constexpr (kVec) {
    constexpr int kPer = 16 / sizeof(T);
#pragma unroll
    for (int j = 0; j < E / kPer; ++j) {
      const uint4 w = __ldg(reinterpret_cast<const uint4*>(src) + j);
      const T* v = reinterpret_cast<const T*>(&w);
#pragma unroll
      for (int i = 0; i < kPer; ++i) x[j * kPer + i] = ToFloat(v[i]);
    }
  } else {
#pragma unroll
    for (int i = 0; i < E; ++i) x[i] = ToFloat(src[i]);
  }
}

template <typename T, int E, bool kVec>
__device__ __forceinline__ void StoreRow(T* dst, const float (&x)[E]) {
  if constexpr (kVec) {
    constexpr int kPer = 16 / sizeof(T);
#pragma unroll
    for (int j = 0; j < E / kPer; ++j) {
      uint4 w;
      T* v = reinterpret_cast<T*>(&w);
#pragma unroll
      for (int i = 0; i < kPer; ++i) v[i] = FromFloat<T>(x[j * kPer + i]);
      reinterpret_cast<uint4*>(dst)[j] = w;
    }
  } else {
#pragma unroll
    for (int i = 0; i < E; ++i) dst[i] = FromFloat<T>(x[i]);
  }
}

// One lane's share of the prologue's inputs (norm weight, cos and sin row: elements sub*E .. +E),
// loaded together with the head vector so the kernel makes one memory round trip, not three.
template <typename T, int E, bool kVec>
struct PrologueInputs {
  float w[E], c[E], s[E];
  bool norm, rope;
  __device__ __forceinline__ PrologueInputs(const T* norm_w, const T* cos_row, const T* sin_row,
                                            int sub)
      : norm(norm_w != nullptr), rope(cos_row != nullptr) {
    if (norm) LoadRow<T, E, kVec>(norm_w + sub * E, w);
    if (rope) {
      LoadRow<T, E, kVec>(cos_row + sub * E, c);
      LoadRow<T, E, kVec>(sin_row + sub * E, s);
    }
  }
};

// The prologue on one head vector held by kLanes lanes (this lane: elements sub*E .. +E), as
// sawtrt.models.model computes it: RMSNorm in fp32, rounded, times the weight, rounded; then
// rotate-half RoPE in fp32 (element i pairs with i +- D/2, which sits kLanes/2 lanes away),
// rounded to T. Every lane of the warp calls it (shuffles).
template <typename T, int E, int kLanes, bool kVec>
__device__ __forceinline__ void NormRope(float (&x)[E], const PrologueInputs<T, E, kVec>& in,
                                         float eps, int sub) {
  if (in.norm) {
    float ss = 0.f;
#pragma unroll
    for (int i = 0; i < E; ++i) ss = fmaf(x[i], x[i], ss);
#pragma unroll
    for (int m = kLanes / 2; m > 0; m >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, m);
    const float r = rsqrtf(ss / float(E * kLanes) + eps);
#pragma unroll
    for (int i = 0; i < E; ++i)
      x[i] = ToFloat(FromFloat<T>(in.w[i] * ToFloat(FromFloat<T>(x[i] * r))));
  }
  if (in.rope) {
    const bool low = sub < kLanes / 2;  // elements below D/2 pair with -x[i + D/2]
#pragma unroll
    for (int i = 0; i < E; ++i) {
      const float other = __shfl_xor_sync(0xffffffffu, x[i], kLanes / 2);
      x[i] = fmaf(x[i], in.c[i], (low ? -other : other) * in.s[i]);
    }
  }
#pragma unroll
  for (int i = 0; i < E; ++i) x[i] = ToFloat(FromFloat<T>(x[i]));
}

template <typename T, int KIND, int D, bool kVecLoad, bool kPrologue>
__global__ void __launch_bounds__(kWriteWarps * 32) WriteKVKernel(const WriteParams<T> p) {
  constexpr int E = kWriteE;                  // elements per lane
  constexpr int kLanes = D / E;               // lanes per vector
  constexpr int kVecs = 32 / kLanes;          // vectors per warp
  static_assert(D % E == 0 && 32 % kLanes == 0, "head_dim");
  // the attention kernel after this one (programmatic launch) waits for this grid to finish
  // before it reads q or the cache: its CTAs may be scheduled now
  LaunchDependents();
  // launched programmatically itself (only its scheduling overlaps the kernel before, which
  // wrote qkv): nothing is read before this
  GridDependencyWait();
  const int lane = threadIdx.x & 31, sub = lane % kLanes;
  int64_t warp = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;

  if constexpr (kPrologue) {
    if (warp < p.q_warps) {  // query heads: normalize, rotate, write back
      const int64_t vec = warp * kVecs + lane / kLanes;
      const bool active = vec < int64_t(p.num_tokens) * p.num_q_heads;
      const int64_t token = active ? vec / p.num_q_heads : 0;
      T* row = p.qkv + token * p.qkv_stride + (vec % p.num_q_heads) * D + sub * E;
      float x[E];
      if (active) LoadRow<T, E, kVecLoad>(row, x);
      else
#pragma unroll
        for (int i = 0; i < E; ++i) x[i] = 0.f;
      const PrologueInputs<T, E, kVecLoad> in(
          p.q_norm, p.rope_cos ? p.rope_cos + token * p.rope_stride : nullptr,
          p.rope_sin ? p.rope_sin + token * p.rope_stride : nullptr, sub);
      NormRope<T, E, kLanes, kVecLoad>(x, in, p.norm_eps, sub);
      if (active) StoreRow<T, E, kVecLoad>(row, x);
      return;  // uniform per warp
    }
    warp -= p.q_warps;
  }

  // even warps encode K, odd warps V (one kind per warp: the rotation's shuffles are uniform)
  const int is_v = int(warp & 1);
  const int64_t pairs = int64_t(p.num_tokens) * p.num_kv_heads;  // (token, KV head) pairs
  const int64_t first = (warp >> 1) * kVecs;
  if (first >= pairs) return;  // uniform per warp
  const int64_t pair = first + lane / kLanes;
  const int head = int(pair % p.num_kv_heads);
  const int64_t token = pair / p.num_kv_heads;

  // the vector (and the prologue's inputs) first: their loads do not wait on the slot's
  float x[E];
  T* src = p.qkv + token * p.qkv_stride +
           int64_t(p.num_q_heads + is_v * p.num_kv_heads + head) * D + sub * E;
  if (pair < pairs) LoadRow<T, E, kVecLoad>(src, x);
  else
#pragma unroll
    for (int i = 0; i < E; ++i) x[i] = 0.f;
  // lanes of a skipped vector (padding slot, past the end) still take part in the shuffles
  const int32_t slot = pair >= pairs ? -1 : (p.slots ? p.slots[token] : StepSlot(p, token));
  const bool active = slot >= 0;
  if constexpr (kPrologue) {
    if (!is_v) {  // warp-uniform
      const int64_t row = pair < pairs ? token : 0;  // the tables have num_tokens rows
      const PrologueInputs<T, E, kVecLoad> in(
          p.k_norm, p.rope_cos ? p.rope_cos + row * p.rope_stride : nullptr,
          p.rope_sin ? p.rope_sin + row * p.rope_stride : nullptr, sub);
      NormRope<T, E, kLanes, kVecLoad>(x, in, p.norm_eps, sub);
      if (pair < pairs) StoreRow<T, E, kVecLoad>(src, x);
    }
  }
#pragma unroll
  for (int i = 0; i < E; ++i) x[i] = active ? Sanitize(x[i]) : 0.f;
  if (is_v ? p.rotate_v : p.rotate_k) {
    WarpRotate<E>(x, p.rotation_block, p.signs, sub * E);
#pragma unroll
    for (int i = 0; i < E; ++i) x[i] = Sanitize(x[i]);  // quant.quantize sanitizes again
  }

  const PageLayout layout(KIND, D, p.page_size);
  const int page = active ? slot / p.page_size : 0, offset = active ? slot % p.page_size : 0;
  uint8_t* block = layout.HeadBlock(p.pool, page, head, p.num_kv_heads);
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
    const QuantParams qp = MakeQuantParams<kBits>(WarpMin<kLanes>(lo), WarpMax<kLanes>(hi));
    if (!active) return;
    if constexpr (kBits == 4) {  // 32 codes -> 16 bytes, spec nibble order
      uint32_t w[4];
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        uint32_t c[8];
#pragma unroll
        for (int i = 0; i < 8; ++i) c[i] = QuantCode<kBits>(x[8 * j + i], qp);
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
            w[k] |= QuantCode<kBits>(x[16 * j + 4 * k + i], qp) << (8 * i);
        }
        reinterpret_cast<uint4*>(codes)[j] = make_uint4(w[0], w[1], w[2], w[3]);
      }
    }
    if (sub == 0) {
      __half2 sm;
      sm.x = qp.scale;
      sm.y = qp.offset;
      *reinterpret_cast<__half2*>(block + (is_v ? layout.v_params : layout.k_params) +
                                  offset * kParamBytes) = sm;
    }
  }
}

template <typename T, int KIND, int D, bool kVec, bool kPrologue>
cudaError_t Launch(const WriteParams<T>& p, cudaStream_t stream) {
  const int vecs_per_warp = 32 * kWriteE / D;
  const int64_t pairs = int64_t(p.num_tokens) * p.num_kv_heads;
  const int64_t warps = p.q_warps + 2 * ((pairs + vecs_per_warp - 1) / vecs_per_warp);
  const dim3 grid(unsigned((warps + kWriteWarps - 1) / kWriteWarps));
  return LaunchProgrammatic(WriteKVKernel<T, KIND, D, kVec, kPrologue>, grid,
                            dim3(kWriteWarps * 32), 0, stream, p);
}

}  // namespace

cudaError_t LaunchWriteKV(const SawConfig& cfg, const void* qkv, int64_t qkv_stride,
                          const WriteSlots& slots, const SawQKPrologue* prologue,
                          int32_t num_tokens, void* pool_layer, cudaStream_t stream) {
  if (num_tokens == 0) return cudaSuccess;
  SAW_DISPATCH_DTYPE(cfg.act_dtype, T, SAW_DISPATCH_KIND(cfg.kind, KIND, SAW_DISPATCH_HEAD_DIM(
      cfg.head_dim, D, {
        WriteParams<T> p{};
        p.qkv = static_cast<T*>(const_cast<void*>(qkv));
        p.qkv_stride = qkv_stride;
        p.num_tokens = num_tokens;
        p.pool = static_cast<uint8_t*>(pool_layer);
        p.num_q_heads = cfg.num_q_heads;
        p.num_kv_heads = cfg.num_kv_heads;
        p.page_size = cfg.page_size;
        p.rotation_block = cfg.rotation_block;
        p.rotate_k = cfg.rotation_block > 0;
        p.rotate_v = p.rotate_k && cfg.rotate_v;
        p.signs = cfg.signs;
        p.slots = slots.slot_mapping;
        p.block_tables = slots.block_tables;
        p.max_pages = slots.max_pages_per_seq;
        p.seq_lens = slots.seq_lens;
        p.cu_q_lens = slots.cu_q_lens;
        p.num_seqs = slots.num_seqs;
        p.decode = slots.decode;
        // 16-byte loads need every lane's elements 16-byte aligned: bases and row strides
        bool vec = reinterpret_cast<uintptr_t>(qkv) % 16 == 0 && (qkv_stride * sizeof(T)) % 16 == 0;
        if (prologue != nullptr) {
          p.q_norm = static_cast<const T*>(prologue->q_norm);
          p.k_norm = static_cast<const T*>(prologue->k_norm);
          p.norm_eps = prologue->norm_eps;
          p.rope_cos = static_cast<const T*>(prologue->rope_cos);
          p.rope_sin = static_cast<const T*>(prologue->rope_sin);
          p.rope_stride = prologue->rope_stride;
          constexpr int kVecsPerWarp = 32 * kWriteE / D;
          p.q_warps = (int64_t(num_tokens) * cfg.num_q_heads + kVecsPerWarp - 1) / kVecsPerWarp;
          for (const void* t : {prologue->q_norm, prologue->k_norm, prologue->rope_cos,
                                prologue->rope_sin})
            vec &= reinterpret_cast<uintptr_t>(t) % 16 == 0;
          vec &= (prologue->rope_stride * sizeof(T)) % 16 == 0;
          return vec ? Launch<T, KIND, D, true, true>(p, stream)
                     : Launch<T, KIND, D, false, true>(p, stream);
        }
        return vec ? Launch<T, KIND, D, true, false>(p, stream)
                   : Launch<T, KIND, D, false, false>(p, stream);
      })));
  return cudaSuccess;
}

}  // namespace saw
