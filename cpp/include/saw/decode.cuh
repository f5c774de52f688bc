// Paged decode attention over the SAW-INT4 (or INT8, or BF16) cache: traits and kernel bodies.
//
// One CTA = (split of the context, KV head, sequence); its 4 warps each stream their own
// 16-token tiles of the split (tile i goes to warp i % 4) through a private cp.async ring of
// shared-memory stages, and all query heads of the KV group ride on one load of each tile.
// Page ids come lane-parallel, a 32-tile window ahead (INT4, INT8), so no tile's copies wait on a
// block-table load (that wait was the one memory-side stall measured: CHANGELOG.md, decode kernel).
//
// Per 16-token tile a warp runs two tensor-core products (mma.sync m16n8k16, fp32 accumulate):
//   S^T[token, head] = codes[token, :] . q'[head, :]      A = codes (fp16), B = q' (fp16)
//   O^T[dim, head]  += codesV^T[dim, token] . P'^T[token, head]   A = V codes (bf16), B = P'
// using the algebra of docs/design.md ("Reading quantized K and V"):
//   q . x_hat = s (q . code) + m sum(q),    sum_t p_t x_hat_t = sum_t (p_t s_t) code_t + sum_t p_t m_t
// Tokens are the MMA's M (16 rows), the GQA group its N (8 per n-tile, NT = 2 for groups 9..16),
// so a group of 4 wastes half of N but no load. P^T moves from the S^T accumulator layout to the
// B-operand layout with one movmatrix.trans per 8x8 block (no shared-memory round trip). P' is
// bf16 (not fp16) because p*s can be far below fp16's normal range.
//
// INT8 (never rotated) runs the INT4 algorithm with 8-bit codes: K codes enter the fp16 MMA as
// 1024 + n (one byte permute per pair), V codes as two bf16 MMAs over the nibbles (128 + lo and
// 256 + 16 hi: bf16 has no exact single-register form of 0..255), see codec.cuh.
//
// Query: q' = FWHT_h(q * signs) / sqrt(h) * sm_scale * log2(e) in shared memory (fp32), then
// rounded to fp16 for the INT4 cache; for a BF16 cache q enters as bf16 hi + lo and the scale
// is applied to the fp32 scores. The MMA's reduction dimension is permuted so that a
// thread's A fragment comes straight out of its own 16-byte code load (see codec.cuh); the query
// fragment is loaded in that same permuted order.
//
// Output: per-warp partials merge in shared memory; with one split the CTA writes the final
// output (inverse-rotated when V is rotated), otherwise a normalized fp32 partial and its
// log-sum-exp, merged by DecodeReduceKernel.
#pragma once
#include <cstdint>
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>

#include "saw/c_api.h"
#include "saw/codec.cuh"
#include "saw/launch.cuh"
#include "saw/softmax_state.cuh"
#include "saw/vec.cuh"

namespace saw {

struct DecodeParams {
  const void* q;              // [num_seqs, q_stride] act dtype, head h at column h*D
  int64_t q_stride;
  const uint8_t* pool;        // one layer: [num_pages, Hkv, head_block_bytes]
  int64_t head_block_bytes;
  const int32_t* block_tables;  // [num_seqs, max_pages]
  int32_t max_pages;
  const int32_t* seq_lens;    // [num_seqs]
  void* out;                  // [num_seqs, Hq*D] act dtype
  float* part_o;              // [num_seqs, Hq, num_splits, D] (num_splits > 1)
  float* part_lse;            // [num_seqs, Hq, num_splits]
  int32_t num_kv_heads, group, page_size, page_shift;
  int32_t num_splits, chunk;  // chunk: tokens per split, a multiple of 64
  int32_t rot_block, rotate_v;  // rot_block 0: no rotation
  const float* signs;         // [D] or null
  float q_scale;              // sm_scale * log2(e)
};

constexpr int kDecodeMaxSplits = 128;

// Tuning knobs (-D at compile time); the library is built with these defaults, the fastest
// measured on H200 (4 CTAs/SM; 5 CTAs/SM and other in-flight sizes were not faster).
#ifndef SAW_DECODE_INFLIGHT_BYTES
#define SAW_DECODE_INFLIGHT_BYTES 12288
#endif
#ifndef SAW_DECODE_MIN_BLOCKS
#define SAW_DECODE_MIN_BLOCKS 4
#endif

// Tile constants of one instantiation. KIND_: SAW_KIND_BF16 / INT8 / INT4 (c_api.h).
template <int D_, int KIND_, int NT_>
struct DecodeTraitsT {
  static constexpr int D = D_;
  static constexpr int kKind = KIND_;
  static constexpr bool kInt4 = KIND_ == SAW_KIND_INT4;
  static constexpr bool kInt8 = KIND_ == SAW_KIND_INT8;
  static constexpr bool kQuant = kInt4 || kInt8;  // codes + (scale, offset) per token
  static constexpr int NT = NT_;  // n-tiles of 8 query heads
  static_assert(D == 64 || D == 128 || D == 256, "head_dim");
  static_assert(NT == 1 || NT == 2, "group <= 16");
  static_assert(KIND_ == SAW_KIND_BF16 || kQuant, "cache kind");
  static constexpr int kWarps = 4;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kTile = 16;  // tokens per warp step = MMA M
  static constexpr int kHeads = 8 * NT;
  static constexpr int kCodeBytes = kInt4 ? D / 2 : (kInt8 ? D : 2 * D);  // per token
  static constexpr int kParamBytes = kQuant ? 4 : 0;
  static constexpr int kRowChunks = kCodeBytes / 16;       // 16-byte chunks per token row
  // stage = one warp's 16-token tile: [K codes | K params | V codes | V params]
  static constexpr int kKc = 0;
  static constexpr int kKp = kKc + kTile * kCodeBytes;
  static constexpr int kVc = kKp + kTile * kParamBytes;
  static constexpr int kVp = kVc + kTile * kCodeBytes;
  static constexpr int kStageBytes = kVp + kTile * kParamBytes;
  // ~12 KB in flight per warp (48 KB per CTA); Little's law at 4.2 TB/s and ~1.5 us loaded
  // latency wants ~50 KB per SM. INT8 at D <= 128 keeps at least 3 stages (its 4.2 KB tile at
  // D = 128 would get 2, i.e. one tile in flight behind the one being computed; an untimed
  // choice: INT4's 2.2 KB tile runs 5).
  static constexpr int kStagesRaw = SAW_DECODE_INFLIGHT_BYTES / kStageBytes;
  static constexpr int kStagesMin = kInt8 && D <= 128 ? 3 : 2;
  static constexpr int kStages = kStagesRaw < kStagesMin ? kStagesMin
                                                         : (kStagesRaw > 8 ? 8 : kStagesRaw);
  static constexpr int kPipeBytes = kWarps * kStages * kStageBytes;
  static constexpr int kMergeBytes = kWarps * kHeads * (D + 2) * 4;
  static constexpr int kQBytes = kHeads * D * 4;
  static constexpr int kSmemBytes = (kPipeBytes > kMergeBytes ? kPipeBytes : kMergeBytes) + kQBytes;
  static constexpr int kKPairs = D / 32;                   // pairs of 16-wide k-tiles in Q.K
  // K words per thread per token row (INT8: two words per k-tile pair)
  static constexpr int kKWords = kInt4 ? D / 32 : (kInt8 ? D / 16 : D / 8);
  static constexpr int kMT = D / 16;                       // 16-dim m-tiles of O^T
  // V words per thread per token row (D / 8 dims each)
  static constexpr int kVWords = kInt4 ? D / 64 : (kInt8 ? D / 32 : D / 16);
  static constexpr int kMinBlocks = D * NT <= 128 ? SAW_DECODE_MIN_BLOCKS : (D * NT <= 256 ? 3 : 2);
};

// The BF16 / INT4 instantiations keep their historical names (profiling scripts match on them).
template <int D_, bool kInt4_, int NT_>
struct DecodeTraits : DecodeTraitsT<D_, kInt4_ ? SAW_KIND_INT4 : SAW_KIND_BF16, NT_> {};
template <int D_, int NT_>
struct DecodeTraitsInt8 : DecodeTraitsT<D_, SAW_KIND_INT8, NT_> {};

// Shared-memory chunk swizzles (16-byte granularity, a bijection inside a row), chosen so the
// fragment reads below are bank-conflict free where rows are a multiple of 128 bytes.
//   INT8 K: thread c reads chunks c + 4u of rows r, r + 8 (D = 64: one 64-byte row, no swizzle);
//   INT8 V: thread r reads logical chunk r (D = 128), chunks 2r, 2r + 1 (D = 256) or half of
//   chunk r / 2 (D = 64, 2-way conflicts: 16 threads read 128 bytes of 64-byte rows that all
//   start at the same bank) of rows 2c, 2c + 1, 2c + 8, 2c + 9.
template <class TR>
__device__ __forceinline__ int SwzK(int row, int col) {
  if constexpr (TR::kInt8) {
    if constexpr (TR::D == 64) return col;
    else return col ^ ((row & 1) << 2);
  } else if constexpr (!TR::kInt4 || TR::D == 256) return col ^ ((row & 1) << 2);
  else return col;
}
template <class TR>
__device__ __forceinline__ int SwzV(int row, int col) {
  if constexpr (TR::kInt8) {
    if constexpr (TR::D == 64) return col ^ (((row >> 1) & 1) << 1);
    else if constexpr (TR::D == 128) return col ^ (((row >> 1) & 3) << 1);
    else return col ^ (((row >> 1) & 1) | (((row >> 2) & 1) << 2));
  } else if constexpr (!TR::kInt4) return col ^ (((row >> 1) & 1) | (((row >> 2) & 1) << 2));
  else if constexpr (TR::D == 256) return col ^ (((row >> 1) & 3) << 1);
  else return col;
}

__device__ __forceinline__ void MmaF16(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2,
                                       uint32_t a3, uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

__device__ __forceinline__ void MmaBf16(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2,
                                        uint32_t a3, uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

__device__ __forceinline__ uint32_t MovTrans(uint32_t x) {
  uint32_t y;
  asm volatile("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;\n" : "=r"(y) : "r"(x));
  return y;
}

// In-place unnormalised Walsh-Hadamard transform over blocks of h of a [n] fp32 array in shared
// memory (rows of D back to back; h | D). Same butterfly order as sawtrt/hadamard.py.
__device__ __forceinline__ void SmemFwht(float* x, int n, int h) {
  for (int stride = 1; stride < h; stride *= 2) {
    __syncthreads();
    for (int i = threadIdx.x; i < n / 2; i += blockDim.x) {
      const int pos = (i / stride) * 2 * stride + i % stride;
      const float a = x[pos], b = x[pos + stride];
      x[pos] = a + b;
      x[pos + stride] = a - b;
    }
  }
  __syncthreads();
}

template <typename T>
__device__ __forceinline__ float RawToFloat(uint16_t x);
template <>
__device__ __forceinline__ float RawToFloat<__half>(uint16_t x) {
  return __half2float(__ushort_as_half(x));
}
template <>
__device__ __forceinline__ float RawToFloat<__nv_bfloat16>(uint16_t x) {
  return __bfloat162float(__ushort_as_bfloat16(x));
}

// Physical head dimension of the first element of a thread's K word group `u` (lane % 4 = c).
// INT8: the 8 bytes of pair u (two words of the row load): half u & 1 of chunk c + 4 (u >> 1).
template <class TR>
__device__ __forceinline__ int KWordBase(int c, int u) {
  if constexpr (TR::kInt8) return 16 * (c + 4 * (u >> 1)) + 8 * (u & 1);
  else if constexpr (!TR::kInt4) return 8 * (c + 4 * u);              // bf16: one 16-byte chunk
  else if constexpr (TR::D <= 128) return c * (TR::D / 4) + 8 * u;  // int4: one 32-bit word
  else return 32 * (c + 4 * (u >> 2)) + 8 * (u & 3);
}

template <class TR, typename T>
__global__ void __launch_bounds__(TR::kThreads, TR::kMinBlocks)
DecodeKernel(const DecodeParams p) {
  constexpr int D = TR::D, NT = TR::NT, S = TR::kStages;
  extern __shared__ __align__(16) uint8_t smem[];
  float* qs = reinterpret_cast<float*>(smem + (TR::kPipeBytes > TR::kMergeBytes
                                                   ? TR::kPipeBytes : TR::kMergeBytes));
  const int split = blockIdx.x, kvh = blockIdx.y, b = blockIdx.z;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int r = lane >> 2, c = lane & 3;
  const int group = p.group;
  const int num_q_heads = group * p.num_kv_heads;
  const int len = p.seq_lens[b];
  const int t_begin = split * p.chunk;
  const int t_end = split == p.num_splits - 1 ? len : min(len, t_begin + p.chunk);
  T* out = static_cast<T*>(p.out) + (int64_t)b * num_q_heads * D + (int64_t)kvh * group * D;

  if (t_begin >= t_end) {  // empty split (short sequence); the reducer skips it
    GridDependencyWait();
    if (p.num_splits == 1)
      for (int i = tid; i < group * D; i += TR::kThreads) out[i] = FromFloat<T>(0.f);
    return;
  }

  // ---- per-warp streaming over 16-token tiles ----
  const int ntiles = (t_end - t_begin + TR::kTile - 1) / TR::kTile;
  const int my_tiles = ntiles > warp ? (ntiles - warp + TR::kWarps - 1) / TR::kWarps : 0;
  uint8_t* wsm = smem + warp * S * TR::kStageBytes;
  const uint32_t wsm_addr = SmemAddr(wsm);
  const int32_t* bt = p.block_tables + (int64_t)b * p.max_pages;
  const int P = p.page_size;

  // Page ids: lane l of a warp holds the page of the warp's tile (window start + l), fetched
  // lane-parallel one 32-tile window ahead (`pg_nxt`) and read with one shuffle per tile. (The
  // first version loaded each tile's block-table entry right before its copies: one dependent
  // global round trip per tile, 0.26 long-scoreboard stall cycles per issued instruction.)
  // INT4 and INT8 only: the BF16 path runs at the copy bandwidth already, and its D = 128 kernel,
  // at its 128-register cap, spills with the extra registers.
  constexpr bool kWindow = TR::kQuant;
  const int t_warp0 = t_begin + TR::kTile * warp;
  auto load_pages = [&](int j0) -> int {
    const int j = j0 + lane;
    return j < my_tiles ? __ldg(bt + ((t_warp0 + TR::kTile * TR::kWarps * j) >> p.page_shift)) : 0;
  };
  int pg_cur = kWindow ? load_pages(0) : 0;
  int pg_nxt = kWindow && my_tiles > 32 ? load_pages(32) : 0;
  const uint8_t* pool_h = p.pool + (int64_t)kvh * p.head_block_bytes;
  // one page of all KV heads (< 4 GB), so page * stride is one 32 x 32 -> 64-bit multiply
  const uint32_t page_stride32 = (uint32_t)((int64_t)p.num_kv_heads * p.head_block_bytes);
  const int v_off = P * (TR::kCodeBytes + TR::kParamBytes);  // V codes after K codes + params
  int stage_in = 0;  // ring slot of the next issued tile

  auto issue = [&](int j) {
    if constexpr (kWindow) {
      if (j < my_tiles) {
        if ((j & 31) == 0 && j > 0) {
          pg_cur = pg_nxt;
          pg_nxt = j + 32 < my_tiles ? load_pages(j + 32) : 0;
        }
        const int page = __shfl_sync(0xffffffff, pg_cur, j & 31);
        const int t0 = t_warp0 + TR::kTile * TR::kWarps * j;
        const uint32_t off = (uint32_t)t0 & (uint32_t)(P - 1);
        const uint8_t* hb = pool_h + (uint64_t)(uint32_t)page * page_stride32;
        const int rem = t_end - t0;  // rows < rem are inside the sequence
        // the tile never straddles its page, so every source address is inside an allocated
        // page; rows past the end read 0 bytes (zero fill)
        const uint8_t* kc = hb + off * TR::kCodeBytes;
        const uint8_t* vc = kc + v_off;
        const uint32_t dst = wsm_addr + stage_in * TR::kStageBytes;
#pragma unroll
        for (int i = 0; i < TR::kTile * TR::kRowChunks / 32; ++i) {
          const int ch = lane + 32 * i;
          const int row = ch / TR::kRowChunks, col = ch % TR::kRowChunks;
          const bool valid = row < rem;
          CpAsync16(dst + TR::kKc + row * TR::kCodeBytes + SwzK<TR>(row, col) * 16, kc + ch * 16,
                    valid);
          CpAsync16(dst + TR::kVc + row * TR::kCodeBytes + SwzV<TR>(row, col) * 16, vc + ch * 16,
                    valid);
        }
        if (lane < 8) {  // params: 4 tokens per 16-byte chunk; rows past the end are masked later
          const int chunk = lane & 3;
          const uint8_t* src =
              hb + (P * TR::kCodeBytes + off * 4 + chunk * 16) + (lane < 4 ? 0 : v_off);
          CpAsync16(dst + (lane < 4 ? TR::kKp : TR::kVp) + chunk * 16, src, 4 * chunk < rem);
        }
        stage_in = stage_in == S - 1 ? 0 : stage_in + 1;
      }
      CpAsyncCommit();
    } else {  // BF16: one block-table load per tile
      if (j < my_tiles) {
        const int t0 = t_begin + TR::kTile * (warp + TR::kWarps * j);
        const int page = bt[t0 >> p.page_shift];
        const int off = t0 & (P - 1);
        const uint8_t* hb = p.pool + ((int64_t)page * p.num_kv_heads + kvh) * p.head_block_bytes;
        const uint8_t* kc = hb + off * TR::kCodeBytes;
        const uint8_t* vc = hb + P * (TR::kCodeBytes + TR::kParamBytes) + off * TR::kCodeBytes;
        const uint32_t dst = wsm_addr + (j % S) * TR::kStageBytes;
#pragma unroll
        for (int ch = lane; ch < TR::kTile * TR::kRowChunks; ch += 32) {
          const int row = ch / TR::kRowChunks, col = ch % TR::kRowChunks;
          const bool valid = t0 + row < t_end;
          CpAsync16(dst + TR::kKc + row * TR::kCodeBytes + SwzK<TR>(row, col) * 16,
                    valid ? kc + ch * 16 : kc, valid);
          CpAsync16(dst + TR::kVc + row * TR::kCodeBytes + SwzV<TR>(row, col) * 16,
                    valid ? vc + ch * 16 : vc, valid);
        }
        if constexpr (TR::kInt4) {
          if (lane < 8) {  // params: 4 tokens per 16-byte chunk; rows past the end are masked later
            const int chunk = lane & 3;
            const bool valid = t0 + 4 * chunk < t_end;
            const uint8_t* src = lane < 4
                ? hb + P * TR::kCodeBytes + off * 4
                : hb + P * (2 * TR::kCodeBytes + TR::kParamBytes) + off * 4;
            CpAsync16(dst + (lane < 4 ? TR::kKp : TR::kVp) + chunk * 16, src + chunk * 16, valid);
          }
        }
      }
      CpAsyncCommit();
    }
  };

  SoftmaxState st[NT][2];
  float pm[NT][2];  // sum_t p_t m_t - bias sum_t p'_t (INT4/INT8 V offsets, code bias), own tokens
  float o[NT][TR::kMT][4];
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
    // Explicitly, not by SoftmaxState's member initializers: with those alone the sm_90a build
    // (nvcc 13.0) was observed to start the second n-tile's heads (NT = 2) at m = 0 instead of
    // -inf, so their origin moved only for scores above +8 (kLazy), and a head whose scores all
    // lay below -126 got p = 2^s = 0: an all-zero output (test_decode_very_negative_scores).
    st[nt][0] = st[nt][1] = SoftmaxState{-INFINITY, 0.f};
    pm[nt][0] = pm[nt][1] = 0.f;
#pragma unroll
    for (int mt = 0; mt < TR::kMT; ++mt) o[nt][mt][0] = o[nt][mt][1] = o[nt][mt][2] = o[nt][mt][3] = 0.f;
  }

  // The first stages go out before the query prologue so its global load and FWHT overlap
  // the first tiles' memory latency (the rotation cost was 8 % of int4 time without this).
  constexpr int kQPer = TR::kHeads * D / TR::kThreads;  // query elements per thread
  // the query's global loads go out with the page-id loads, before the first copies (one memory
  // round trip in the prologue instead of two); raw 16-bit loads only, converted after the copies
  constexpr bool kEarlyQ = kQPer <= 16;
  // Launched programmatically after the write kernel (saw_attention_step), this CTA may run
  // while the write finishes: seq_lens and the block table are the step's inputs, but q and the
  // new token's K/V come from the write, so everything below waits for it (a no-op otherwise).
  GridDependencyWait();
  const T* qb = static_cast<const T*>(p.q) + (int64_t)b * p.q_stride + (int64_t)kvh * group * D;
  uint16_t qraw[kEarlyQ ? kQPer : 1];
  float qsg[kEarlyQ ? kQPer : 1];
  if constexpr (kEarlyQ) {
    const uint16_t* q16 = reinterpret_cast<const uint16_t*>(qb);
    const bool sgn = p.rot_block && p.signs;
#pragma unroll
    for (int k = 0; k < kQPer; ++k) {
      const int i = tid + k * TR::kThreads, g = i / D, d = i % D;
      qraw[k] = 0;
      qsg[k] = 1.f;
      if (g < group) qraw[k] = q16[g * D + d];
      if (sgn) qsg[k] = p.signs[d];
    }
  }

#pragma unroll
  for (int s = 0; s < S - 1; ++s) issue(s);

  // ---- query: load, sign, FWHT, scale -> fp32 [kHeads][D] in shared memory ----
  {
    if constexpr (kEarlyQ) {
#pragma unroll
      for (int k = 0; k < kQPer; ++k) qs[tid + k * TR::kThreads] = RawToFloat<T>(qraw[k]) * qsg[k];
    } else {
      for (int i = tid; i < TR::kHeads * D; i += TR::kThreads) {
        const int g = i / D, d = i % D;
        float v = g < group ? ToFloat<T>(qb[g * D + d]) : 0.f;
        if (p.rot_block && p.signs) v *= p.signs[d];
        qs[i] = v;
      }
    }
    if (p.rot_block) SmemFwht(qs, TR::kHeads * D, p.rot_block);
    else __syncthreads();
  }
  const float qscale = p.q_scale * (p.rot_block ? rsqrtf((float)p.rot_block) : 1.f);
  uint32_t qf[NT][TR::kKPairs][4];
  // BF16 cache: q enters the bf16 MMA as hi + lo (both bf16) and the softmax scale is applied
  // to the fp32 scores afterwards. Folding sm_scale * log2(e) into q and rounding it to bf16
  // moved scores by 2^-9 of their size: with K outlier channels 20-100x (logits of tens of
  // log2 units) that was up to 16 u of the output's row max (tests/test_kernels_gpu.py, H200).
  uint32_t qflo[TR::kQuant ? 1 : NT][TR::kQuant ? 1 : TR::kKPairs][4];
  // INT4/INT8: sum of the effective q' (offset term m * sum q) and the code bias 1024 * sum of
  // the stored fp16 q' (codes enter the MMA as 1024 + n, or 1024 + 16 n), for heads 2c, 2c+1
  float qsum[NT][2], qbias[NT][2];
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
    const float* qh = qs + (8 * nt + r) * D;  // B operand column = head lane/4
    float part = 0.f, bias = 0.f;
#pragma unroll
    for (int u = 0; u < TR::kKPairs; ++u) {
      const int base = KWordBase<TR>(c, u);
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        // int4: (e_i, e_{i+4}) of the word; bf16: (d_2i, d_2i+1) of the chunk; int8: bytes
        // (2i, 2i+1) of the pair's 8 bytes
        const int d0 = TR::kInt4 ? base + i : base + 2 * i;
        const int d1 = TR::kInt4 ? base + i + 4 : base + 2 * i + 1;
        if constexpr (TR::kInt8) {  // every slot faces 1024 + n (Int8x4ToHalf2Biased)
          qf[nt][u][i] = PackFloat2<__half>(qh[d0] * qscale, qh[d1] * qscale);
          const float2 f = Half2ToFloat2(qf[nt][u][i]);
          part += f.x + f.y;
          bias += f.x + f.y;
        } else if constexpr (TR::kInt4) {
          // slots 1, 3 face 1024 + 16 n (Int4x8ToHalf2Biased): q' / 16 there (exact scaling)
          const float f16 = (i & 1) ? 0.0625f : 1.f;
          qf[nt][u][i] = PackFloat2<__half>(qh[d0] * qscale * f16, qh[d1] * qscale * f16);
          const float2 f = Half2ToFloat2(qf[nt][u][i]);
          part += (f.x + f.y) * ((i & 1) ? 16.f : 1.f);
          bias += f.x + f.y;
        } else {
          qf[nt][u][i] = PackFloat2<__nv_bfloat16>(qh[d0], qh[d1]);
          qflo[nt][u][i] = PackFloat2<__nv_bfloat16>(qh[d0] - Bf16Lo(qf[nt][u][i]),
                                                     qh[d1] - Bf16Hi(qf[nt][u][i]));
        }
      }
    }
    part += __shfl_xor_sync(0xffffffff, part, 1);
    part += __shfl_xor_sync(0xffffffff, part, 2);  // quad sum: head r's full sum
    bias += __shfl_xor_sync(0xffffffff, bias, 1);
    bias += __shfl_xor_sync(0xffffffff, bias, 2);
    qsum[nt][0] = __shfl_sync(0xffffffff, part, (2 * c) * 4);
    qsum[nt][1] = __shfl_sync(0xffffffff, part, (2 * c + 1) * 4);
    qbias[nt][0] = 1024.f * __shfl_sync(0xffffffff, bias, (2 * c) * 4);
    qbias[nt][1] = 1024.f * __shfl_sync(0xffffffff, bias, (2 * c + 1) * 4);
  }

  int stage_out = 0;
  for (int j = 0; j < my_tiles; ++j) {
    issue(j + S - 1);
    CpAsyncWait<S - 1>();
    __syncwarp();
    const uint32_t stg = wsm_addr + (kWindow ? stage_out : j % S) * TR::kStageBytes;
    if constexpr (kWindow) stage_out = stage_out == S - 1 ? 0 : stage_out + 1;
    const int t0 = t_begin + TR::kTile * (warp + TR::kWarps * j);
    const bool valid0 = t0 + r < t_end, valid1 = t0 + r + 8 < t_end;

    // ---- S^T = K q' (tokens r, r+8; heads 2c, 2c+1 of each n-tile) ----
    // two accumulators (even / odd k-tiles) halve the dependent HMMA chain per tile
    float sacc[NT][4], sacc2[NT][4];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i) sacc[nt][i] = sacc2[nt][i] = 0.f;
    {
      if constexpr (TR::kInt8) {
        // one 16-byte chunk (c + 4t) of rows r, r + 8 per two k-tile pairs, loaded where it is
        // used (all D bytes up front cost 88 bytes of spills at D = 256, group > 8)
#pragma unroll
        for (int t = 0; t < TR::kKWords / 4; ++t) {
          const uint4 a = Lds128(stg + TR::kKc + r * TR::kCodeBytes + SwzK<TR>(r, c + 4 * t) * 16);
          const uint4 e = Lds128(stg + TR::kKc + (r + 8) * TR::kCodeBytes +
                                 SwzK<TR>(r + 8, c + 4 * t) * 16);
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const int u = 2 * t + h;  // a[i] = bytes (2i, 2i+1) of the pair's 8 bytes
            uint32_t a0[4], a1[4];
            Int8x4ToHalf2Biased(h ? a.z : a.x, a0[0], a0[1]);
            Int8x4ToHalf2Biased(h ? a.w : a.y, a0[2], a0[3]);
            Int8x4ToHalf2Biased(h ? e.z : e.x, a1[0], a1[1]);
            Int8x4ToHalf2Biased(h ? e.w : e.y, a1[2], a1[3]);
#pragma unroll
            for (int nt = 0; nt < NT; ++nt) {
              MmaF16(sacc[nt], a0[0], a1[0], a0[1], a1[1], qf[nt][u][0], qf[nt][u][1]);
              MmaF16(sacc2[nt], a0[2], a1[2], a0[3], a1[3], qf[nt][u][2], qf[nt][u][3]);
            }
          }
        }
      } else {
        uint32_t kw0[TR::kKWords], kw1[TR::kKWords];
        if constexpr (TR::kInt4 && D <= 128) {
          LdsWords(stg + TR::kKc + r * TR::kCodeBytes + c * (D / 8), kw0);
          LdsWords(stg + TR::kKc + (r + 8) * TR::kCodeBytes + c * (D / 8), kw1);
        } else {
#pragma unroll
          for (int u = 0; u < TR::kKWords / 4; ++u) {
            const uint4 a =
                Lds128(stg + TR::kKc + r * TR::kCodeBytes + SwzK<TR>(r, c + 4 * u) * 16);
            const uint4 e = Lds128(stg + TR::kKc + (r + 8) * TR::kCodeBytes +
                                   SwzK<TR>(r + 8, c + 4 * u) * 16);
            kw0[4 * u] = a.x; kw0[4 * u + 1] = a.y; kw0[4 * u + 2] = a.z; kw0[4 * u + 3] = a.w;
            kw1[4 * u] = e.x; kw1[4 * u + 1] = e.y; kw1[4 * u + 2] = e.z; kw1[4 * u + 3] = e.w;
          }
        }
#pragma unroll
        for (int u = 0; u < TR::kKPairs; ++u) {
          uint32_t a0[4], a1[4];
          if constexpr (TR::kInt4) {
            Int4x8ToHalf2Biased(kw0[u], a0);
            Int4x8ToHalf2Biased(kw1[u], a1);
          } else {
#pragma unroll
            for (int i = 0; i < 4; ++i) { a0[i] = kw0[4 * u + i]; a1[i] = kw1[4 * u + i]; }
          }
#pragma unroll
          for (int nt = 0; nt < NT; ++nt) {
            if constexpr (TR::kQuant) {
              MmaF16(sacc[nt], a0[0], a1[0], a0[1], a1[1], qf[nt][u][0], qf[nt][u][1]);
              MmaF16(sacc2[nt], a0[2], a1[2], a0[3], a1[3], qf[nt][u][2], qf[nt][u][3]);
            } else {
              MmaBf16(sacc[nt], a0[0], a1[0], a0[1], a1[1], qf[nt][u][0], qf[nt][u][1]);
              MmaBf16(sacc2[nt], a0[2], a1[2], a0[3], a1[3], qf[nt][u][2], qf[nt][u][3]);
              MmaBf16(sacc[nt], a0[0], a1[0], a0[1], a1[1], qflo[nt][u][0], qflo[nt][u][1]);
              MmaBf16(sacc2[nt], a0[2], a1[2], a0[3], a1[3], qflo[nt][u][2], qflo[nt][u][3]);
            }
          }
        }
      }
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int i = 0; i < 4; ++i)
          sacc[nt][i] = TR::kQuant ? sacc[nt][i] + sacc2[nt][i]
                                   : (sacc[nt][i] + sacc2[nt][i]) * qscale;
    }

    // ---- scores, online softmax, P' = p * s_v ----
    float vs0 = 1.f, vm0 = 0.f, vs1 = 1.f, vm1 = 0.f;
    // V codes are centred on kVCentre (INT4 8, INT8 128); kVBias = kVCentre + the bias the
    // codes carry into the V MMA (INT4 128 + n; INT8 (128 + lo) + (256 + 16 hi) = 384 + n)
    constexpr float kVCentre = TR::kInt8 ? 128.f : 8.f;
    constexpr float kVBias = TR::kInt8 ? 512.f : 136.f;
    if constexpr (TR::kQuant) {
      const float2 k0 = Half2ToFloat2(Lds32(stg + TR::kKp + r * 4));
      const float2 k1 = Half2ToFloat2(Lds32(stg + TR::kKp + (r + 8) * 4));
      const float2 v0 = Half2ToFloat2(Lds32(stg + TR::kVp + r * 4));
      const float2 v1 = Half2ToFloat2(Lds32(stg + TR::kVp + (r + 8) * 4));
      // centred codes: O = sum P' (code - 8) + sum p (m + 8 s). The rounding error of the bf16
      // P' then multiplies a zero-mean (code - 8) instead of a positive code, so it is no
      // common-mode vector — which an inverse rotation of V would fold into one channel per
      // block, sqrt(h) times larger (16 u of the row max at h = 256 before this, H200 tests).
      vs0 = valid0 ? v0.x : 0.f; vm0 = valid0 ? fmaf(kVCentre, v0.x, v0.y) : 0.f;
      vs1 = valid1 ? v1.x : 0.f; vm1 = valid1 ? fmaf(kVCentre, v1.x, v1.y) : 0.f;
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
        for (int hh = 0; hh < 2; ++hh) {
          sacc[nt][hh] = k0.x * (sacc[nt][hh] - qbias[nt][hh]) + k0.y * qsum[nt][hh];
          sacc[nt][2 + hh] = k1.x * (sacc[nt][2 + hh] - qbias[nt][hh]) + k1.y * qsum[nt][hh];
        }
      }
    }
    // Lazy rescaling: the exponent origin st.m moves only when a tile's max exceeds it by more
    // than kLazy (log2 units), so p <= 2^8 (exact enough in bf16/fp32) and the O^T rescale
    // (32 FMUL per tile at D = 128) runs on a handful of tiles per split instead of every one.
    constexpr float kLazy = 8.f;
    float s0[NT][2], s1[NT][2], mx[NT][2];
    bool grow = false;
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int hh = 0; hh < 2; ++hh) {
        s0[nt][hh] = valid0 ? sacc[nt][hh] : -INFINITY;
        s1[nt][hh] = valid1 ? sacc[nt][2 + hh] : -INFINITY;
        // this lane's own max: the head's max over the tile exceeds the origin + kLazy iff some
        // lane's does, so the cross-lane reduction runs only on the (rare) growing tiles
        const float m = fmaxf(s0[nt][hh], s1[nt][hh]);
        mx[nt][hh] = m;
        grow |= m > st[nt][hh].m + kLazy;
      }
    if (__any_sync(0xffffffff, grow)) {
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int hh = 0; hh < 2; ++hh) {
          float m = mx[nt][hh];  // the head's max over all 16 tokens
          m = fmaxf(m, __shfl_xor_sync(0xffffffff, m, 4));
          m = fmaxf(m, __shfl_xor_sync(0xffffffff, m, 8));
          m = fmaxf(m, __shfl_xor_sync(0xffffffff, m, 16));
          mx[nt][hh] = m;
          const bool g = mx[nt][hh] > st[nt][hh].m + kLazy;
          const float corr = g ? st[nt][hh].Rescale(mx[nt][hh]) : 1.f;
          pm[nt][hh] *= corr;
#pragma unroll
          for (int mt = 0; mt < TR::kMT; ++mt) { o[nt][mt][hh] *= corr; o[nt][mt][2 + hh] *= corr; }
        }
    }
    uint32_t pb0[NT], pb1[NT];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      float pp[4];
#pragma unroll
      for (int hh = 0; hh < 2; ++hh) {
        const float mu = SafeMax(st[nt][hh].m);
        const float p0 = Exp2(s0[nt][hh] - mu), p1 = Exp2(s1[nt][hh] - mu);
        st[nt][hh].l += p0 + p1;
        pm[nt][hh] += p0 * vm0 + p1 * vm1;
        pp[hh] = p0 * vs0;
        pp[2 + hh] = p1 * vs1;
      }
      const uint32_t P0 = PackFloat2<__nv_bfloat16>(pp[0], pp[1]);  // token r; heads 2c, 2c+1
      const uint32_t P1 = PackFloat2<__nv_bfloat16>(pp[2], pp[3]);  // token r+8
      if constexpr (TR::kQuant) {  // INT4 V codes enter as 128 + n: remove (128 + 8) * sum of
        // rounded p' (INT8: (384 + 128) * sum)
        pm[nt][0] -= kVBias * (Bf16Lo(P0) + Bf16Lo(P1));
        pm[nt][1] -= kVBias * (Bf16Hi(P0) + Bf16Hi(P1));
      }
      pb0[nt] = MovTrans(P0);  // tokens 2c,2c+1; head r
      pb1[nt] = MovTrans(P1);  // tokens 2c+8,2c+9
    }

    // ---- O^T += V^T P'^T (dims r*D/8 .. +D/8 of this thread; tokens 2c,2c+1,2c+8,2c+9) ----
    {
      uint32_t w[4][TR::kVWords];
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        const int row = 2 * c + (k & 1) + 8 * (k >> 1);
        const uint32_t rb = stg + TR::kVc + row * TR::kCodeBytes;
        if constexpr (TR::kInt4 && D <= 128) {
          LdsWords(rb + r * (D / 16), w[k]);
        } else if constexpr (TR::kInt8 && D == 64) {  // 8 bytes: half r & 1 of chunk r / 2
          const uint2 a = Lds64(rb + SwzV<TR>(row, r >> 1) * 16 + (r & 1) * 8);
          w[k][0] = a.x; w[k][1] = a.y;
        } else {
#pragma unroll
          for (int u = 0; u < TR::kVWords / 4; ++u) {
            const int col = r * (TR::kVWords / 4) + u;
            const uint4 a = Lds128(rb + SwzV<TR>(row, col) * 16);
            w[k][4 * u] = a.x; w[k][4 * u + 1] = a.y; w[k][4 * u + 2] = a.z; w[k][4 * u + 3] = a.w;
          }
        }
      }
#pragma unroll
      for (int jw = 0; jw < TR::kVWords; ++jw) {
        if constexpr (TR::kInt8) {
#pragma unroll
          for (int qq = 0; qq < 2; ++qq) {  // bytes (0, 1), then (2, 3) of the word
            const uint32_t sel = qq ? 0x7632 : 0x5410;
            uint32_t lo[4], hi[4];
            Int8PairsToBf162Split(__byte_perm(w[0][jw], w[1][jw], sel), lo);  // tokens 2c, 2c+1
            Int8PairsToBf162Split(__byte_perm(w[2][jw], w[3][jw], sel), hi);  // tokens 2c+8, 2c+9
            // m-tile rows r, r + 8 = bytes 2 qq, 2 qq + 1: dims r D/8 + 2 mt (+1), as INT4/BF16
            const int mt = 2 * jw + qq;
#pragma unroll
            for (int nt = 0; nt < NT; ++nt) {
              MmaBf16(o[nt][mt], lo[0], lo[2], hi[0], hi[2], pb0[nt], pb1[nt]);  // 128 + lo
              MmaBf16(o[nt][mt], lo[1], lo[3], hi[1], hi[3], pb0[nt], pb1[nt]);  // 256 + 16 hi
            }
          }
        } else if constexpr (TR::kInt4) {
#pragma unroll
          for (int half = 0; half < 2; ++half) {  // nibbles 0..3, then 4..7 of the word
            const uint32_t sel = half ? 0x7632 : 0x5410;
            uint32_t lo[4], hi[4];
            Int4PairsToBf162Biased(__byte_perm(w[0][jw], w[1][jw], sel), lo);  // tokens 2c, 2c+1
            Int4PairsToBf162Biased(__byte_perm(w[2][jw], w[3][jw], sel), hi);  // tokens 2c+8, 2c+9
#pragma unroll
            for (int qq = 0; qq < 2; ++qq) {
              const int mt = 4 * jw + 2 * half + qq;  // element i = 4 half + 2 qq (+1)
#pragma unroll
              for (int nt = 0; nt < NT; ++nt)
                MmaBf16(o[nt][mt], lo[2 * qq], lo[2 * qq + 1], hi[2 * qq], hi[2 * qq + 1],
                        pb0[nt], pb1[nt]);
            }
          }
        } else {
          const uint32_t a0 = __byte_perm(w[0][jw], w[1][jw], 0x5410);
          const uint32_t a1 = __byte_perm(w[0][jw], w[1][jw], 0x7632);
          const uint32_t a2 = __byte_perm(w[2][jw], w[3][jw], 0x5410);
          const uint32_t a3 = __byte_perm(w[2][jw], w[3][jw], 0x7632);
#pragma unroll
          for (int nt = 0; nt < NT; ++nt) MmaBf16(o[nt][jw], a0, a1, a2, a3, pb0[nt], pb1[nt]);
        }
      }
    }
    __syncwarp();  // every lane is done reading stage j % S before it is refilled
  }
  CpAsyncWait<0>();
  // let the split reducer (launched with programmatic stream serialization) get scheduled; it
  // waits in griddepcontrol.wait until this grid's writes are complete
  LaunchDependents();

  // ---- merge the 4 warps' partials in shared memory ----
  float lsum[NT][2];
#pragma unroll
  for (int nt = 0; nt < NT; ++nt)
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
      float l = st[nt][hh].l, q = pm[nt][hh];
#pragma unroll
      for (int x = 4; x < 32; x *= 2) {
        l += __shfl_xor_sync(0xffffffff, l, x);
        q += __shfl_xor_sync(0xffffffff, q, x);
      }
      lsum[nt][hh] = l;
      pm[nt][hh] = q;
    }
  __syncthreads();  // every warp is done with its pipeline stages (aliased below)
  float* mo = reinterpret_cast<float*>(smem);                      // [warps][heads][D]
  float* mm = mo + TR::kWarps * TR::kHeads * D;                    // [warps][heads]
  float* ml = mm + TR::kWarps * TR::kHeads;
#pragma unroll
  for (int nt = 0; nt < NT; ++nt)
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
      const int head = 8 * nt + 2 * c + hh;
      float* dst = mo + (warp * TR::kHeads + head) * D + r * (D / 8);
#pragma unroll
      for (int mt = 0; mt < TR::kMT; ++mt)
        *reinterpret_cast<float2*>(dst + 2 * mt) =
            make_float2(o[nt][mt][hh] + pm[nt][hh], o[nt][mt][2 + hh] + pm[nt][hh]);
      if (r == 0) {
        mm[warp * TR::kHeads + head] = st[nt][hh].m;
        ml[warp * TR::kHeads + head] = lsum[nt][hh];
      }
    }
  __syncthreads();
  const bool final_out = p.num_splits == 1;
  for (int i = tid; i < group * D; i += TR::kThreads) {
    const int g = i / D, d = i % D;
    float mx = -INFINITY;
#pragma unroll
    for (int w = 0; w < TR::kWarps; ++w) mx = fmaxf(mx, mm[w * TR::kHeads + g]);
    float l = 0.f, acc = 0.f;
#pragma unroll
    for (int w = 0; w < TR::kWarps; ++w) {
      const float f = Exp2(mm[w * TR::kHeads + g] - SafeMax(mx));
      l += ml[w * TR::kHeads + g] * f;
      acc += mo[(w * TR::kHeads + g) * D + d] * f;
    }
    const float val = l > 0.f ? acc / l : 0.f;
    if (final_out) {
      qs[i] = val;
    } else {
      const int64_t row = ((int64_t)b * num_q_heads + kvh * group + g) * p.num_splits + split;
      p.part_o[row * D + d] = val;
      if (d == 0) p.part_lse[row] = l > 0.f ? mx + __log2f(l) : -INFINITY;
    }
  }
  if (!final_out) return;
  if (p.rotate_v && p.rot_block) {
    SmemFwht(qs, group * D, p.rot_block);
    const float f = rsqrtf((float)p.rot_block);
    for (int i = tid; i < group * D; i += TR::kThreads) {
      const int d = i % D;
      out[i] = FromFloat<T>(qs[i] * f * (p.signs ? p.signs[d] : 1.f));
    }
  } else {
    __syncthreads();
    for (int i = tid; i < group * D; i += TR::kThreads) out[i] = FromFloat<T>(qs[i]);
  }
}

// Merge split-KV partials: one CTA of kDecodeReduceThreads per (query head, sequence). Thread s
// holds split s's log-sum-exp, and the float4 column groups of a head (D / 4 <= 64) leave at
// least two split lanes.
constexpr int kDecodeReduceThreads = 128;
constexpr int kDecodeReduceMaxD = 256;   // the largest head_dim dispatched (saw/dispatch.cuh)

template <typename T>
__global__ void __launch_bounds__(kDecodeReduceThreads)
DecodeReduceKernel(const DecodeParams p, int D) {
  static_assert(kDecodeReduceThreads == 4 * 32, "the block reductions combine four warps");
  static_assert(kDecodeMaxSplits <= kDecodeReduceThreads, "one split per reducer thread");
  __shared__ float w[kDecodeMaxSplits];
  __shared__ float ob[kDecodeReduceMaxD];
  const int hq = blockIdx.x, b = blockIdx.y, tid = threadIdx.x;
  // the output projection after it (saw_linear, a programmatic launch) may start streaming its
  // weights now; it waits for this grid before it reads the output
  LaunchDependents();
  GridDependencyWait();
  const int num_q_heads = p.group * p.num_kv_heads;
  const int len = p.seq_lens[b];
  const int n = len <= 0 ? 0 : min(p.num_splits, (len + p.chunk - 1) / p.chunk);
  const int64_t row0 = ((int64_t)b * num_q_heads + hq) * p.num_splits;
  // one parallel load of the n <= kDecodeMaxSplits log-sum-exps, block reductions
  __shared__ float red[2][4];
  const int lane = tid & 31, wid = tid >> 5;
  const float lse = tid < n ? p.part_lse[row0 + tid] : -INFINITY;
  float m = lse;
#pragma unroll
  for (int x = 16; x > 0; x /= 2) m = fmaxf(m, __shfl_xor_sync(0xffffffff, m, x));
  if (lane == 0) red[0][wid] = m;
  __syncthreads();
  const float mx = fmaxf(fmaxf(red[0][0], red[0][1]), fmaxf(red[0][2], red[0][3]));
  const float wt = tid < n ? MergeWeight(lse, mx) : 0.f;
  float sum = wt;
#pragma unroll
  for (int x = 16; x > 0; x /= 2) sum += __shfl_xor_sync(0xffffffff, sum, x);
  if (lane == 0) red[1][wid] = sum;
  if (tid < n) w[tid] = wt;
  __syncthreads();
  const float den = red[1][0] + red[1][1] + red[1][2] + red[1][3];
  const float inv = den > 0.f ? 1.f / den : 0.f;
  // thread (split lane sl, column group cg) sums float4 column group cg of splits sl, sl + L,
  // ... (L = kDecodeReduceThreads / (D / 4) split lanes), its loads unrolled so they are in
  // flight together: at one sequence the merge is a chain of L2 round trips, not bandwidth
  const int cols = D / 4, lanes_s = blockDim.x / cols;
  const int cg = tid % cols, sl = tid / cols;
  const float4* po = reinterpret_cast<const float4*>(p.part_o + row0 * D);
  float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll 8
  for (int s = sl; s < n; s += lanes_s) {
    const float4 v = po[s * cols + cg];
    const float ws = w[s];
    acc.x = fmaf(ws, v.x, acc.x);
    acc.y = fmaf(ws, v.y, acc.y);
    acc.z = fmaf(ws, v.z, acc.z);
    acc.w = fmaf(ws, v.w, acc.w);
  }
  __shared__ float4 lane_acc[kDecodeReduceThreads];
  lane_acc[tid] = acc;
  __syncthreads();
  if (tid < cols) {
    float4 t = lane_acc[tid];
    for (int l = 1; l < lanes_s; ++l) {
      const float4 u = lane_acc[l * cols + tid];
      t.x += u.x, t.y += u.y, t.z += u.z, t.w += u.w;
    }
    ob[4 * tid] = t.x * inv, ob[4 * tid + 1] = t.y * inv;
    ob[4 * tid + 2] = t.z * inv, ob[4 * tid + 3] = t.w * inv;
  }
  T* out = static_cast<T*>(p.out) + ((int64_t)b * num_q_heads + hq) * D;
  if (p.rotate_v && p.rot_block) {
    SmemFwht(ob, D, p.rot_block);
    const float f = rsqrtf((float)p.rot_block);
    for (int d = tid; d < D; d += blockDim.x)
      out[d] = FromFloat<T>(ob[d] * f * (p.signs ? p.signs[d] : 1.f));
  } else {
    __syncthreads();
    for (int d = tid; d < D; d += blockDim.x) out[d] = FromFloat<T>(ob[d]);
  }
}

}  // namespace saw
