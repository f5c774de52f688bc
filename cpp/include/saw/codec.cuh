// INT4 and INT8 codes -> 16-bit floats in registers, without a per-element int->float conversion.
//
// \note Nibble order (sawtrt/spec.py): byte j of a token's code row holds element 2j (low
// nibble) and 2j+1 (high nibble), so one 32-bit word holds elements e0..e7 at bits 0,4,..,28.
// Masking with 0x000F000F selects (e0, e4) as the two halves of a 32-bit register; OR-ing the
// exponent of 1024 (fp16 0x6400) or 128 (bf16 0x4300) turns a nibble n into the exact float
// 1024 + n (or 128 + n). The decode kernel loads the query in the matching order
// (q[0], q[4]), (q[1], q[5]), ... instead of shuffling codes.
#pragma once
#include <cstdint>
#include <cuda_fp16.h>
#include <cuda_bf16.h>

namespace saw {

__device__ __forceinline__ uint32_t Lop3AndOr(uint32_t a, uint32_t mask, uint32_t magic) {
  uint32_t d;  // (a & mask) | magic; immLut 0xEA = (0xF0 & 0xCC) | 0xAA
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;\n" : "=r"(d) : "r"(a), "r"(mask), "r"(magic));
  return d;
}

// One word of 8 nibbles -> four fp16x2 with the bias left in: h[0] = 1024 + (e0,e4),
// h[1] = 1024 + 16 (e1,e5), h[2] = 1024 + (e2,e6), h[3] = 1024 + 16 (e3,e7) (low half first);
// 5 instructions for 8 elements. The 0x00F000F0 mask keeps the nibble at bit 4, so no shift:
// the query entries facing h[1], h[3] are pre-divided by 16, and the kernel subtracts the bias
// once per head (1024 * sum of the stored q'), not once per element pair. (The unbiased form,
// one packed FMA per pair, cost 64 of ~410 SASS instructions per 16-token tile at D = 128.)
__device__ __forceinline__ void Int4x8ToHalf2Biased(uint32_t w, uint32_t (&h)[4]) {
  constexpr uint32_t kMagic = 0x64006400;
  const uint32_t w8 = w >> 8;
  h[0] = Lop3AndOr(w, 0x000F000F, kMagic);
  h[1] = Lop3AndOr(w, 0x00F000F0, kMagic);
  h[2] = Lop3AndOr(w8, 0x000F000F, kMagic);
  h[3] = Lop3AndOr(w8, 0x00F000F0, kMagic);
}

// Low 16 bits of `x` hold nibbles n0..n3 of one token, high 16 bits n0..n3 of another (built
// with __byte_perm from two tokens' words): four bf16x2 (token a, token b) pairs 128 + n, one per
// nibble position (bf16 has 7 mantissa bits, so every nibble is shifted to bit 0). The kernel
// removes 128 * sum(p') per head once.
__device__ __forceinline__ void Int4PairsToBf162Biased(uint32_t x, uint32_t (&h)[4]) {
  constexpr uint32_t kMagic = 0x43004300;
  h[0] = Lop3AndOr(x, 0x000F000F, kMagic);
  h[1] = Lop3AndOr(x >> 4, 0x000F000F, kMagic);
  h[2] = Lop3AndOr(x >> 8, 0x000F000F, kMagic);
  h[3] = Lop3AndOr(x >> 12, 0x000F000F, kMagic);
}

// INT8 codes (one uint8 per element, element d at byte d; sawtrt/spec.py).
//
// K: one word of 4 codes -> two fp16x2 with the bias left in, h0 = 1024 + (e0, e1),
// h1 = 1024 + (e2, e3): fp16 has 10 mantissa bits, so 0x6400 | n is exactly 1024 + n for
// n < 1024, and one byte permute per pair builds it (the bias is removed once per head, as for
// INT4).
__device__ __forceinline__ void Int8x4ToHalf2Biased(uint32_t w, uint32_t& h0, uint32_t& h1) {
  constexpr uint32_t kMagic = 0x64646464;
  h0 = __byte_perm(w, kMagic, 0x4140);
  h1 = __byte_perm(w, kMagic, 0x4342);
}

// V: bf16 has 7 mantissa bits, so 0..255 has no single magic-exponent form; a code is split into
// nibbles, code = lo + 16 hi, and each nibble becomes one exact bf16: 128 + lo (exponent of 128,
// lo at mantissa bits 0..3) and 256 + 16 hi (exponent of 256, whose mantissa step is 2: hi at
// bits 3..6). The low 16 bits of `x` hold bytes e, e+1 of one token, the high 16 bits the same
// bytes of another (built with __byte_perm from two tokens' words). Out, as (token a, token b)
// pairs: h[0] = 128 + lo(e), h[1] = 256 + 16 hi(e), h[2] = 128 + lo(e+1), h[3] = 256 + 16 hi(e+1).
// The two MMAs over (h[0], h[2]) and (h[1], h[3]) sum to 384 + code per element; the kernel
// removes the bias once per head (same instruction count per word as Int4PairsToBf162Biased).
__device__ __forceinline__ void Int8PairsToBf162Split(uint32_t x, uint32_t (&h)[4]) {
  constexpr uint32_t kMagicLo = 0x43004300, kMagicHi = 0x43804380;
  h[0] = Lop3AndOr(x, 0x000F000F, kMagicLo);
  h[1] = Lop3AndOr(x >> 1, 0x00780078, kMagicHi);
  h[2] = Lop3AndOr(x >> 8, 0x000F000F, kMagicLo);
  h[3] = Lop3AndOr(x >> 9, 0x00780078, kMagicHi);
}

// The two bf16 halves of a packed pair as floats (exact).
__device__ __forceinline__ float Bf16Lo(uint32_t x) { return __uint_as_float(x << 16); }
__device__ __forceinline__ float Bf16Hi(uint32_t x) { return __uint_as_float(x & 0xFFFF0000u); }

template <typename T>
__device__ __forceinline__ uint32_t PackFloat2(float lo, float hi);

template <>
__device__ __forceinline__ uint32_t PackFloat2<__half>(float lo, float hi) {
  const __half2 v = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}

template <>
__device__ __forceinline__ uint32_t PackFloat2<__nv_bfloat16>(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}

template <typename T>
__device__ __forceinline__ float ToFloat(T x);
template <>
__device__ __forceinline__ float ToFloat<__half>(__half x) { return __half2float(x); }
template <>
__device__ __forceinline__ float ToFloat<__nv_bfloat16>(__nv_bfloat16 x) {
  return __bfloat162float(x);
}

template <typename T>
__device__ __forceinline__ T FromFloat(float x);
template <>
__device__ __forceinline__ __half FromFloat<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 FromFloat<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

__device__ __forceinline__ float2 Half2ToFloat2(uint32_t h) {
  return __half22float2(*reinterpret_cast<const __half2*>(&h));
}

}  // namespace saw
