// Causal paged prefill / chunked prefill / mixed-batch attention over the SAW-INT4 cache.
//
// Sequence b owns query rows cu_q_lens[b] .. cu_q_lens[b+1]-1; they are the last q_len_b of its
// seq_lens[b] cached tokens (write-then-attend) and attend causally: query i at position
// p_i = seq_len - q_len + i sees cache positions 0..p_i.
//
// \param q     [num_tokens, q_stride] fp16/bf16, head h at column h*D (unrotated)
// \param out   [num_tokens, Hq*D], same dtype; in the original basis (V un-rotated if rotate_v)
//
// Structure (flash-attention 2 on mma.sync m16n8k16, fp32 accumulation):
//   * a block = 4 warps = 64 query rows of ONE KV head; a row is (query token, group head), so
//     the G query heads of a GQA group share every K/V tile that the block decodes;
//   * the query is rotated in registers (saw/hadamard.cuh) and stored as one fp16 MMA operand:
//     an unrotated fp16/bf16 query is exact in fp16 (inside its range, +-65504, to which it is
//     clamped); a rotated one is rounded to fp16 once. That rounding is part of the contract
//     (sawtrt.reference.paged_attention(query_operand=torch.float16) models it): at most 2^-11
//     of |q| per element; on the outlier-heavy test data it moves the output by ~1e-3 (relative
//     Frobenius; up to 2e-2 of a row's max elementwise), where the INT4 cache itself moves it by
//     ~0.4 (up to 3x a row's max) — measured on CPU, CHANGELOG.md (prefill kernel). An
//     earlier hi + lo split (two MMAs) cost int4-bdr 8-9 % of its prefill time for nothing a
//     model can see. sm_scale*log2(e) is applied in fp32 after the MMA; sum(q) per row (of the
//     rounded operands) is kept for the offset term;
//   * K/V tiles of BK tokens are read page by page (any page order) as raw codes, one tile
//     ahead into registers (the loads fly during the current tile's MMAs), then turned into
//     MMA operands without applying (s, m): the algebra of docs/design.md does that exactly in fp32,
//       q . k_hat = s * (q . code) + m * sum(q),
//       sum_t p_t v_hat_t = sum_t (p_t s_t) code_t + sum_t p_t m_t,
//     so an INT4/INT8 code is an exact small integer operand and only p*s is rounded;
//   * the MMA operands are fp16 whatever the activation type: codes and bf16-cache values are
//     exact in it, and p*s keeps 11 bits instead of bf16's 8;
//   * online softmax in registers; the finished tile is staged in shared memory so that each
//     output row is inverse-rotated (rotate_v) by one warp and stored with coalesced writes.
// A bf16 cache is the same kernel with s = 1, m = 0 and the stored values as operands.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "saw/dispatch.cuh"
#include "saw/hadamard.cuh"
#include "saw/launchers.h"
#include "saw/layout.cuh"

namespace saw {
namespace {

template <typename T, int KIND, int D>
struct PrefillTraits {
  static constexpr int kWarps = 4;
  static constexpr int kThreads = kWarps * 32;
  // int4 at D <= 128 fits in 168 registers (ptxas -v: no spill on sm_80/89/90a/100a/120a)
  // instead of 171: three blocks per SM instead of two on the H200 (where shared memory holds
  // fewer, e.g. sm_89's 100 KB, the cap buys nothing). bf16/int8 need more and keep one.
  static constexpr int kMinBlocks = KIND == SAW_KIND_INT4 && D <= 128 ? 3 : 1;
  static constexpr int kRows = kWarps * 16;     // query rows per block (16 per warp: one MMA M)
  // Smaller K/V tiles at D = 256 keep shared memory under the 99 KB sm_89 allows per block.
  static constexpr int kBK = D >= 256 ? 32 : 64;
  static constexpr int kPad = 8;                // 16 bytes: rows land on distinct banks
  static constexpr int kQStride = D + kPad;     // elements, Qs[row][d]
  static constexpr int kKStride = D + kPad;     // Ks[token][d]
  static constexpr int kVStride = D + kPad;     // Vs[token][d] (ldmatrix.trans feeds P.V)
  static constexpr int kOStride = D + 4;        // fp32 staging of the finished tile
  static constexpr int kQBytes = kRows * kQStride * 2;
  static constexpr int kKBytes = kBK * kKStride * 2;
  static constexpr int kVBytes = kBK * kVStride * 2;
  static constexpr int kTileBytes = kQBytes + kKBytes + kVBytes;
  static constexpr int kOBytes = kRows * kOStride * 4;
  static constexpr int kMainBytes = kTileBytes > kOBytes ? kTileBytes : kOBytes;
  // + per-token (s, m) of K and V, + per-row sum(q)
  static constexpr int kSmemBytes = kMainBytes + 4 * kBK * 4 + kRows * 4;
  static_assert(D % 32 == 0 && kBK % 16 == 0, "tile shapes must match the MMA shape");
  static_assert(kSmemBytes <= 99 * 1024, "must fit sm_89's shared memory per block");
};

__device__ __forceinline__ float ToFloat(__half x) { return __half2float(x); }
__device__ __forceinline__ float ToFloat(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T> __device__ __forceinline__ T FromFloat(float x);
template <> __device__ __forceinline__ __half FromFloat<__half>(float x) {
  return __float2half_rn(x);
}
template <> __device__ __forceinline__ __nv_bfloat16 FromFloat<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

template <typename T>
__device__ __forceinline__ uint32_t PackPair(float lo, float hi) {
  T v[2] = {FromFloat<T>(lo), FromFloat<T>(hi)};
  return *reinterpret_cast<const uint32_t*>(v);
}

// D[16x8] += A[16x16] * B[16x8], fp32 accumulators.
template <typename T>
__device__ __forceinline__ void Mma16816(float (&c)[4], const uint32_t (&a)[4],
                                         uint32_t b0, uint32_t b1) {
  if constexpr (std::is_same_v<T, __half>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

// 16 bytes of one token's codes -> fp16 MMA operands at `dst` (16-byte aligned, shared memory).
// Integer codes are centred (int4: code - 8, int8: code - 128; exact in fp16): the offset term
// m + bias * s is then near the vector's middle instead of its minimum, so the code term and
// the offset term no longer cancel in the output (measured: 6-17 u of error before, bf16).
// Codes become fp16 by the exponent trick: 0x6400 | c is the fp16 number 1024 + c (c < 1024).
template <int KIND>
__device__ __forceinline__ void DecodeChunk(const uint4& raw, __half* dst) {
  const uint32_t w[4] = {raw.x, raw.y, raw.z, raw.w};
  uint32_t h[KIND == SAW_KIND_INT4 ? 16 : KIND == SAW_KIND_INT8 ? 8 : 4];  // half2 words
  if constexpr (KIND == SAW_KIND_INT4) {  // 32 codes, element i at bits [4i, 4i+4)
    const __half2 bias = __floats2half2_rn(1032.f, 1032.f);
#pragma unroll
    for (int j = 0; j < 16; ++j) {
      const uint32_t u = w[j / 4] >> (8 * (j % 4));  // elements 2j, 2j+1 in bits 0..7
      const uint32_t x = (u & 0xFu) | ((u & 0xF0u) << 12) | 0x64006400u;
      const __half2 v = __hsub2(*reinterpret_cast<const __half2*>(&x), bias);
      h[j] = *reinterpret_cast<const uint32_t*>(&v);
    }
  } else if constexpr (KIND == SAW_KIND_INT8) {  // 16 codes
    const __half2 bias = __floats2half2_rn(1152.f, 1152.f);
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const uint32_t u = w[j / 2] >> (16 * (j % 2));
      const uint32_t x = (u & 0xFFu) | ((u & 0xFF00u) << 8) | 0x64006400u;
      const __half2 v = __hsub2(*reinterpret_cast<const __half2*>(&x), bias);
      h[j] = *reinterpret_cast<const uint32_t*>(&v);
    }
  } else {  // 8 bf16 values -> fp16 (exact inside fp16's range; the cache is clamped to 60000)
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const __half2 v = __floats2half2_rn(__uint_as_float(w[j] << 16),
                                          __uint_as_float(w[j] & 0xFFFF0000u));
      h[j] = *reinterpret_cast<const uint32_t*>(&v);
    }
  }
  uint4* out = reinterpret_cast<uint4*>(dst);
#pragma unroll
  for (int j = 0; j < int(sizeof(h) / 16); ++j)
    out[j] = make_uint4(h[4 * j], h[4 * j + 1], h[4 * j + 2], h[4 * j + 3]);
}

// Four 8x8 fp16 matrices from shared memory, transposed: the B operand of P.V from row-major V.
__device__ __forceinline__ void LdMatrixX4Trans(uint32_t (&r)[4], const void* smem_ptr) {
  const uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(smem_ptr));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

template <typename T, int KIND, int D>
__global__ void __launch_bounds__(PrefillTraits<T, KIND, D>::kThreads,
                                  PrefillTraits<T, KIND, D>::kMinBlocks)
PrefillKernel(const T* __restrict__ q, int64_t q_stride, const uint8_t* __restrict__ pool,
              const int32_t* __restrict__ block_tables, int32_t max_pages,
              const int32_t* __restrict__ seq_lens, const int32_t* __restrict__ cu_q_lens,
              int tiles_per_seq, int num_q_heads, int num_kv_heads, int page_size,
              int rotation_block, int rotate_v, const float* __restrict__ signs, float q_scale,
              T* __restrict__ out) {
  using Tr = PrefillTraits<T, KIND, D>;
  using M = __half;  // MMA operand type, see the header comment
  constexpr int BK = Tr::kBK, E = D / 32;
  constexpr int kCodesPerChunk = KIND == SAW_KIND_INT4 ? 32 : KIND == SAW_KIND_INT8 ? 16 : 8;
  constexpr int kChunks = D / kCodesPerChunk;  // 16-byte chunks per token row
  constexpr float kBias = KIND == SAW_KIND_INT4 ? 8.f : 128.f;  // code centring (DecodeChunk)
  extern __shared__ __align__(16) uint8_t smem[];
  M* Qs = reinterpret_cast<M*>(smem);
  M* Ks = reinterpret_cast<M*>(smem + Tr::kQBytes);
  M* Vs = reinterpret_cast<M*>(smem + Tr::kQBytes + Tr::kKBytes);
  float* Os = reinterpret_cast<float*>(smem);  // aliases Q/K/V once the tile is finished
  float* k_s = reinterpret_cast<float*>(smem + Tr::kMainBytes);
  float* k_m = k_s + BK;
  float* v_s = k_m + BK;
  float* v_m = v_s + BK;
  float* q_sum = v_m + BK;

  // causal tiles get longer with the tile index: launch the longest first so the last wave is
  // made of short blocks (less tail)
  const int seq = blockIdx.x / tiles_per_seq;
  const int tile = tiles_per_seq - 1 - blockIdx.x % tiles_per_seq;
  const int kvh = blockIdx.y;
  const int group = num_q_heads / num_kv_heads;
  const int q_begin = cu_q_lens[seq], q_len = cu_q_lens[seq + 1] - q_begin;
  const int seq_len = seq_lens[seq];
  const int row0 = tile * Tr::kRows;  // first (token, head) row of this tile
  if (row0 >= q_len * group) return;  // uniform per block
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int gid = lane >> 2, tig = lane & 3;  // MMA fragment coordinates
  const PageLayout layout(KIND, D, page_size);
  const int32_t* table = block_tables + int64_t(seq) * max_pages;

  // ---- query tile: rotate, clamp to fp16's range, store as fp16; rows past q_len are zero
  constexpr float kHalfMax = 65504.f;
  // four rows in flight: their loads and shuffle chains overlap (the rotation is latency-bound)
#pragma unroll 4
  for (int r = warp * 16; r < warp * 16 + 16; ++r) {
    const int idx = row0 + r, qi = idx / group, g = idx % group;
    float x[E];
    if (qi < q_len) {
      const T* src = q + int64_t(q_begin + qi) * q_stride + int64_t(kvh * group + g) * D + lane * E;
#pragma unroll
      for (int i = 0; i < E; ++i) x[i] = ToFloat(src[i]);
      if (rotation_block > 0) WarpRotate<E>(x, rotation_block, signs);
    } else {
#pragma unroll
      for (int i = 0; i < E; ++i) x[i] = 0.f;
    }
    float sum = 0.f;
#pragma unroll
    for (int i = 0; i < E; ++i) {
      const M op = FromFloat<M>(fminf(fmaxf(x[i], -kHalfMax), kHalfMax));
      Qs[r * Tr::kQStride + lane * E + i] = op;
      sum += ToFloat(op);  // sum of the operands actually used, so the m term matches the MMA
    }
#pragma unroll
    for (int m = 16; m > 0; m >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, m);
    if (lane == 0) q_sum[r] = sum;
  }

  // positions of this thread's two fragment rows (gid and gid + 8 of the warp's 16)
  int qpos[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int qi = (row0 + warp * 16 + gid + 8 * h) / group;
    qpos[h] = qi < q_len ? seq_len - q_len + qi : -1;  // -1: padding row, everything masked
  }
  const int last_row = min(row0 + Tr::kRows, q_len * group) - 1;
  const int kv_end = seq_len - q_len + last_row / group + 1;  // causal: nothing later is seen

  float o[D / 8][4];
#pragma unroll
  for (int i = 0; i < D / 8; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
  float row_max[2] = {-INFINITY, -INFINITY}, row_sum[2] = {0.f, 0.f}, row_pm[2] = {0.f, 0.f};

  // ---- K/V tiles: raw bytes are fetched into registers one tile ahead (the loads fly while
  // the tensor cores work on the current tile), then decoded into shared memory
  constexpr int kItems = BK * kChunks / Tr::kThreads;  // 16-byte chunks per thread per tile
  static_assert(BK * kChunks % Tr::kThreads == 0 && BK <= Tr::kThreads, "tile split");
  uint4 kraw[kItems], vraw[kItems];
  __half2 kpar = __floats2half2_rn(0.f, 0.f), vpar = kpar;
  auto fetch = [&](int kv0) {
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      const int item = threadIdx.x + i * Tr::kThreads, t = item % BK, c = item / BK;
      const int pos = kv0 + t;
      kraw[i] = vraw[i] = make_uint4(0, 0, 0, 0);
      if (pos < kv_end) {
        const uint8_t* blk = layout.HeadBlock(pool, table[pos / page_size], kvh, num_kv_heads);
        const int64_t row = int64_t(pos % page_size) * layout.code_bytes + c * 16;
        kraw[i] = __ldg(reinterpret_cast<const uint4*>(blk + layout.k_codes + row));
        vraw[i] = __ldg(reinterpret_cast<const uint4*>(blk + layout.v_codes + row));
      }
    }
    if (KIND != SAW_KIND_BF16 && threadIdx.x < BK) {
      const int pos = kv0 + threadIdx.x;
      kpar = vpar = __floats2half2_rn(0.f, 0.f);  // padding tokens: finite, and masked
      if (pos < kv_end) {
        const uint8_t* blk = layout.HeadBlock(pool, table[pos / page_size], kvh, num_kv_heads);
        const int64_t off = int64_t(pos % page_size) * kParamBytes;
        kpar = *reinterpret_cast<const __half2*>(blk + layout.k_params + off);
        vpar = *reinterpret_cast<const __half2*>(blk + layout.v_params + off);
      }
    }
  };
  fetch(0);
  for (int kv0 = 0; kv0 < kv_end; kv0 += BK) {
    __syncthreads();  // previous tile fully consumed (and Q tile written, first time)
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      const int item = threadIdx.x + i * Tr::kThreads, t = item % BK, c = item / BK;
      DecodeChunk<KIND>(kraw[i], Ks + t * Tr::kKStride + c * kCodesPerChunk);
      DecodeChunk<KIND>(vraw[i], Vs + t * Tr::kVStride + c * kCodesPerChunk);
    }
    if (threadIdx.x < BK) {
      const int t = threadIdx.x;
      float ks, km, vs, vm;
      if constexpr (KIND == SAW_KIND_BF16) {
        ks = kv0 + t < kv_end ? q_scale : 0.f, km = 0.f, vs = 1.f, vm = 0.f;
      } else {
        // operands are centred codes (code - kBias), so the offset becomes m + kBias * s;
        // sm_scale * log2(e) folded into the K terms: scores come out in the log2 domain
        ks = __low2float(kpar), km = __high2float(kpar) + kBias * ks;
        ks *= q_scale, km *= q_scale;
        vs = __low2float(vpar), vm = __high2float(vpar) + kBias * vs;
      }
      k_s[t] = ks, k_m[t] = km, v_s[t] = vs, v_m[t] = vm;
    }
    __syncthreads();
    if (kv0 + BK < kv_end) fetch(kv0 + BK);

    // ---- S = Q K^T (codes), 16 rows x BK tokens per warp
    float s[BK / 8][4];
#pragma unroll
    for (int n = 0; n < BK / 8; ++n) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.f;
    const M* qa = Qs + (warp * 16 + gid) * Tr::kQStride + tig * 2;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      uint32_t a[4];
      a[0] = *reinterpret_cast<const uint32_t*>(qa + kk * 16);
      a[1] = *reinterpret_cast<const uint32_t*>(qa + 8 * Tr::kQStride + kk * 16);
      a[2] = *reinterpret_cast<const uint32_t*>(qa + kk * 16 + 8);
      a[3] = *reinterpret_cast<const uint32_t*>(qa + 8 * Tr::kQStride + kk * 16 + 8);
#pragma unroll
      for (int n = 0; n < BK / 8; ++n) {
        const M* kb = Ks + (n * 8 + gid) * Tr::kKStride + kk * 16 + tig * 2;
        Mma16816<M>(s[n], a, *reinterpret_cast<const uint32_t*>(kb),
                    *reinterpret_cast<const uint32_t*>(kb + 8));
      }
    }

    // ---- scores (log2 domain), causal mask, online softmax
    float qs[2] = {q_sum[warp * 16 + gid], q_sum[warp * 16 + gid + 8]};
    float tile_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int n = 0; n < BK / 8; ++n) {
      // this thread's two tokens of the n-tile: one 8-byte shared load per parameter
      const float2 ks = *reinterpret_cast<const float2*>(k_s + n * 8 + tig * 2);
      const float2 km = *reinterpret_cast<const float2*>(k_m + n * 8 + tig * 2);
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int h = i >> 1, t = n * 8 + tig * 2 + (i & 1);
        const float sc = i & 1 ? ks.y : ks.x, of = i & 1 ? km.y : km.x;
        const float v = kv0 + t > qpos[h] ? -INFINITY : s[n][i] * sc + of * qs[h];
        s[n][i] = v;
        tile_max[h] = fmaxf(tile_max[h], v);
      }
    }
    float alpha[2], base[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      tile_max[h] = fmaxf(tile_max[h], __shfl_xor_sync(0xffffffffu, tile_max[h], 1));
      tile_max[h] = fmaxf(tile_max[h], __shfl_xor_sync(0xffffffffu, tile_max[h], 2));
      const float m_new = fmaxf(row_max[h], tile_max[h]);
      base[h] = m_new == -INFINITY ? 0.f : m_new;  // fully masked so far: keep exp2 finite
      alpha[h] = exp2f(row_max[h] - base[h]);
      row_max[h] = m_new;
      row_sum[h] *= alpha[h];
      row_pm[h] *= alpha[h];
    }
#pragma unroll
    for (int d = 0; d < D / 8; ++d) {
      o[d][0] *= alpha[0], o[d][1] *= alpha[0], o[d][2] *= alpha[1], o[d][3] *= alpha[1];
    }
    // p -> (p * s_v) as the A operand of P.V, sum p and sum p*m on the side
    uint32_t pa[BK / 16][4];
#pragma unroll
    for (int n = 0; n < BK / 8; ++n) {
      float ps[4];
      const float2 vs = *reinterpret_cast<const float2*>(v_s + n * 8 + tig * 2);
      const float2 vm = *reinterpret_cast<const float2*>(v_m + n * 8 + tig * 2);
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int h = i >> 1;
        const float p = exp2f(s[n][i] - base[h]);
        row_sum[h] += p;
        row_pm[h] += p * (i & 1 ? vm.y : vm.x);
        ps[i] = p * (i & 1 ? vs.y : vs.x);
      }
      // n even -> k 0..7 of step n/2 (regs 0, 1); n odd -> k 8..15 (regs 2, 3)
      pa[n / 2][(n & 1) * 2 + 0] = PackPair<M>(ps[0], ps[1]);
      pa[n / 2][(n & 1) * 2 + 1] = PackPair<M>(ps[2], ps[3]);
    }
    // ---- O += (P * s_v) . codes_v
#pragma unroll
    for (int kk = 0; kk < BK / 16; ++kk) {
      // lanes 0-7 / 8-15 address tokens 0-7 / 8-15 of the step at dims d*8.., lanes 16-31 the
      // same at (d+1)*8..: r = {B(d) k-lo, B(d) k-hi, B(d+1) k-lo, B(d+1) k-hi}
      const M* vrow = Vs + (kk * 16 + (lane & 15)) * Tr::kVStride + (lane >> 4) * 8;
#pragma unroll
      for (int d = 0; d < D / 8; d += 2) {
        uint32_t r[4];
        LdMatrixX4Trans(r, vrow + d * 8);
        Mma16816<M>(o[d], pa[kk], r[0], r[1]);
        Mma16816<M>(o[d + 1], pa[kk], r[2], r[3]);
      }
    }
  }

  // ---- finish: (O + sum p*m_v) / sum p, staged in shared memory
#pragma unroll
  for (int h = 0; h < 2; ++h) {
#pragma unroll
    for (int m = 1; m <= 2; m <<= 1) {
      row_sum[h] += __shfl_xor_sync(0xffffffffu, row_sum[h], m);
      row_pm[h] += __shfl_xor_sync(0xffffffffu, row_pm[h], m);
    }
  }
  __syncthreads();  // Os aliases the Q/K/V tiles other warps may still read
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const float inv = row_sum[h] > 0.f ? 1.f / row_sum[h] : 0.f;
    float* orow = Os + (warp * 16 + gid + 8 * h) * Tr::kOStride + tig * 2;
#pragma unroll
    for (int d = 0; d < D / 8; ++d) {
      orow[d * 8 + 0] = (o[d][2 * h + 0] + row_pm[h]) * inv;
      orow[d * 8 + 1] = (o[d][2 * h + 1] + row_pm[h]) * inv;
    }
  }
  __syncwarp();
  for (int r = warp * 16; r < warp * 16 + 16; ++r) {  // each warp stores its own rows
    const int idx = row0 + r, qi = idx / group, g = idx % group;
    if (qi >= q_len) break;  // rows are in order: the rest are padding too
    float x[E];
#pragma unroll
    for (int i = 0; i < E; ++i) x[i] = Os[r * Tr::kOStride + lane * E + i];
    if (rotate_v) WarpInverseRotate<E>(x, rotation_block, signs);
    T* dst = out + int64_t(q_begin + qi) * num_q_heads * D + int64_t(kvh * group + g) * D +
             lane * E;
#pragma unroll
    for (int i = 0; i < E; ++i) dst[i] = FromFloat<T>(x[i]);
  }
}

template <typename T, int KIND, int D>
cudaError_t RunPrefill(const SawConfig& cfg, const void* q, int64_t q_stride, const void* pool,
                       const int32_t* block_tables, int32_t max_pages, const int32_t* seq_lens,
                       const int32_t* cu_q_lens, int32_t num_seqs, int32_t max_q_len, void* out,
                       cudaStream_t stream) {
  using Tr = PrefillTraits<T, KIND, D>;
  auto kernel = PrefillKernel<T, KIND, D>;
  // Host-side and cheap; set on every call so it holds on whichever device is current.
  cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                       Tr::kSmemBytes);
  if (e != cudaSuccess) return e;
  const int group = cfg.num_q_heads / cfg.num_kv_heads;
  const int tiles = int((int64_t(max_q_len) * group + Tr::kRows - 1) / Tr::kRows);
  const dim3 grid(unsigned(num_seqs * tiles), unsigned(cfg.num_kv_heads));
  const float log2e = 1.4426950408889634f;
  kernel<<<grid, Tr::kThreads, Tr::kSmemBytes, stream>>>(
      static_cast<const T*>(q), q_stride, static_cast<const uint8_t*>(pool), block_tables,
      max_pages, seq_lens, cu_q_lens, tiles, cfg.num_q_heads, cfg.num_kv_heads, cfg.page_size,
      cfg.rotation_block, cfg.rotate_v, cfg.signs, cfg.sm_scale * log2e, static_cast<T*>(out));
  return cudaGetLastError();
}

}  // namespace

size_t PrefillWorkspaceBytes(const SawConfig&, int32_t, int32_t, int32_t) { return 0; }

cudaError_t LaunchPrefill(const SawConfig& cfg, const void* q, int64_t q_stride,
                          const void* pool_layer, const int32_t* block_tables,
                          int32_t max_pages_per_seq, const int32_t* seq_lens,
                          const int32_t* cu_q_lens, int32_t num_seqs, int32_t num_tokens,
                          int32_t max_q_len, int32_t max_seq_len, void* out, void* workspace,
                          size_t workspace_bytes, cudaStream_t stream) {
  (void)num_tokens, (void)max_seq_len, (void)workspace, (void)workspace_bytes;
  if (num_seqs == 0 || max_q_len == 0) return cudaSuccess;
  SAW_DISPATCH_DTYPE(cfg.act_dtype, T, SAW_DISPATCH_KIND(cfg.kind, KIND, SAW_DISPATCH_HEAD_DIM(
      cfg.head_dim, D,
      return (RunPrefill<T, KIND, D>(cfg, q, q_stride, pool_layer, block_tables,
                                     max_pages_per_seq, seq_lens, cu_q_lens, num_seqs, max_q_len,
                                     out, stream)))));
  return cudaSuccess;
}

}  // namespace saw
