// Online-softmax state in the log2 domain, with merge and normalize.
//
// Scores are pre-multiplied by sm_scale * log2(e) (folded into the query), so exp() is one
// ex2.approx. A partial result over a token range is (m, l, o): m = max score, l = sum 2^(s-m),
// o = sum 2^(s-m) v (un-normalized). Two partials merge exactly:
//   M = max(m1, m2), l = l1 2^(m1-M) + l2 2^(m2-M), o = o1 2^(m1-M) + o2 2^(m2-M).
// Split-KV partials are stored normalized with lse = m + log2(l) (empty range: lse = -inf).
#pragma once
#include <cmath>

namespace saw {

__device__ __forceinline__ float Exp2(float x) {  // 2^x; 2^-inf = 0
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// Running max used as the exponent origin: -inf (nothing seen yet) maps to 0 so that
// 2^(-inf - 0) = 0 instead of NaN.
__device__ __forceinline__ float SafeMax(float m) { return m == -INFINITY ? 0.f : m; }

struct SoftmaxState {
  float m = -INFINITY;  // running max (log2 domain)
  float l = 0.f;        // running denominator relative to m

  // Fold in a new max; returns the factor the accumulated o must be scaled by.
  __device__ __forceinline__ float Rescale(float m_new) {
    const float corr = Exp2(m - SafeMax(m_new));
    m = m_new;
    l *= corr;
    return corr;
  }
  __device__ __forceinline__ float Lse() const {
    return l > 0.f ? m + __log2f(l) : -INFINITY;
  }
};

// Weight of a partial with log-sum-exp `lse` against the merged maximum `lse_max`.
__device__ __forceinline__ float MergeWeight(float lse, float lse_max) {
  return Exp2(lse - SafeMax(lse_max));
}

}  // namespace saw
