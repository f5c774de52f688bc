// Token-wise asymmetric quantization on the GPU — the C++ twin of sawtrt/quant.py.
//
// Rule (sawtrt/spec.py is the definition; every step is an IEEE fp32 op so the codes are
// bit-identical to the PyTorch reference):
//   1. sanitize: NaN/+-Inf -> 0, finite values clamped to +-kClamp
//   2. offset = fp16_rd(min x), scale = fp16_ru((max x - m) / L), L = 2^bits - 1
//   3. code = clamp(rint((x - m) * (1 / s)), 0, L); s == 0 gives code 0
// INT4 packing: byte j = element 2j (low nibble) | element 2j+1 (high nibble), i.e. in a 32-bit
// word element i sits at bits [4i, 4i + 4).
#pragma once
#include <cuda_fp16.h>
#include <stdint.h>

namespace saw {

constexpr float kClamp = 60000.f;  // spec.CLAMP: keeps offset and scale inside fp16 range

__device__ __forceinline__ float Sanitize(float x) {
  return isfinite(x) ? fminf(fmaxf(x, -kClamp), kClamp) : 0.f;
}

// min / max over aligned groups of kLanes lanes (32: the whole warp); every lane calls it.
template <int kLanes = 32>
__device__ __forceinline__ float WarpMin(float v) {
#pragma unroll
  for (int m = kLanes / 2; m > 0; m >>= 1) v = fminf(v, __shfl_xor_sync(0xffffffffu, v, m));
  return v;
}
template <int kLanes = 32>
__device__ __forceinline__ float WarpMax(float v) {
#pragma unroll
  for (int m = kLanes / 2; m > 0; m >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, m));
  return v;
}

// (scale, offset) of one token from the min and max of its sanitized vector.
struct QuantParams {
  __half scale, offset;  // what is stored
  float m, inv;          // offset as fp32 and 1/scale (0 when scale == 0)
};

template <int BITS>
__device__ __forceinline__ QuantParams MakeQuantParams(float lo, float hi) {
  constexpr float kLevels = float((1 << BITS) - 1);
  QuantParams p;
  p.offset = __float2half_rd(lo);  // directed rounding keeps (x - m) / s inside [0, L]
  p.m = __half2float(p.offset);
  p.scale = __float2half_ru(__fdiv_rn(__fsub_rn(hi, p.m), kLevels));
  const float s = __half2float(p.scale);
  p.inv = s > 0.f ? __fdiv_rn(1.f, s) : 0.f;
  return p;
}

template <int BITS>
__device__ __forceinline__ uint32_t QuantCode(float x, const QuantParams& p) {
  constexpr float kLevels = float((1 << BITS) - 1);
  // explicit _rn intrinsics: no FMA contraction, no fast-math surprises
  const float c = rintf(__fmul_rn(__fsub_rn(x, p.m), p.inv));
  return uint32_t(fminf(fmaxf(c, 0.f), kLevels));
}

// E codes (E <= 8, each < 16) -> E/2 bytes as the low bits of a word, spec nibble order.
template <int E>
__device__ __forceinline__ uint32_t PackNibbles(const uint32_t (&c)[E]) {
  static_assert(E % 2 == 0 && E <= 8, "pack 2, 4, 6 or 8 nibbles");
  uint32_t w = 0;
#pragma unroll
  for (int i = 0; i < E; ++i) w |= c[i] << (4 * i);
  return w;
}

}  // namespace saw
