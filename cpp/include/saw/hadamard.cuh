// Block-diagonal Hadamard rotation (BDR) on the GPU, the C++ twin of sawtrt/hadamard.py.
//
//   rotate(x)  = FWHT_h(x * sigma) * (1/sqrt(h))     per contiguous block of h channels
//   inverse(y) = FWHT_h(y) * (1/sqrt(h)) * sigma
//
// Butterfly stage s (stride 2^s, s = 0 .. log2(h)-1) maps the pair (i, i + 2^s), i with bit s
// clear, to (a + b, a - b) — the same operations in the same order as hadamard.fwht, so the fp32
// results are bit-identical to the PyTorch reference (the write kernel relies on this for
// bit-exact codes). Two forms:
//   * WarpRotate*: a warp holds one vector of N = 32*E floats, lane l owns elements
//     [l*E, l*E + E) in registers; stages with stride < E are in-register, larger ones shuffle.
//   * BlockRotateShared: all threads of a block rotate `count` vectors held in shared memory.
#pragma once
#include <cuda_runtime.h>

namespace saw {

// float(1/sqrt(h)) rounded exactly as Python's `1.0 / math.sqrt(h)` cast to fp32: the double
// literals are those Python prints, the cast is round-to-nearest like torch's scalar cast.
__host__ __device__ __forceinline__ float RotationScale(int h) {
  switch (h) {
    case 16: return 0.25f;
    case 32: return (float)0.17677669529663687;
    case 64: return 0.125f;
    case 128: return (float)0.08838834764831845;
    case 256: return 0.0625f;
    default: return 0.f;  // callers validate h first (c_api.cu)
  }
}

// Unnormalised FWHT over blocks of h channels of a vector spread over n aligned lanes (E per
// lane, lane l % n owns elements [(l % n) E, (l % n) E + E); n = 32 for a warp per vector; E, h
// powers of two, h <= n E). Blocks smaller than E (h = 16 with E = 32) end in registers. All 32
// lanes must call it with the same h: the cross-lane partner is lane ^ (s / E), inside the group.
template <int E>
__device__ __forceinline__ void WarpFWHT(float (&x)[E], int h) {
  static_assert(E >= 1 && (E & (E - 1)) == 0 && E <= 32, "E must be a power of two <= 32");
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int s = 1; s < E; s <<= 1) {  // in-register stages
    if (s >= h) break;
#pragma unroll
    for (int i = 0; i < E; ++i) {
      if ((i & s) == 0) {
        const float a = x[i], b = x[i + s];
        x[i] = a + b;
        x[i + s] = a - b;
      }
    }
  }
  for (int s = E; s < h; s <<= 1) {  // partner lane differs in bit s/E
    const int m = s / E;
    const bool upper = lane & m;
#pragma unroll
    for (int i = 0; i < E; ++i) {
      const float other = __shfl_xor_sync(0xffffffffu, x[i], m);
      // lower element a stays on the lane with the bit clear: a + b there, a - b on the other
      x[i] = upper ? other - x[i] : x[i] + other;
    }
  }
}

// rotate(x) in place. signs: device array of N floats (+-1) or nullptr; first: the element
// index of x[0] (default lane * E, a warp per vector).
template <int E>
__device__ __forceinline__ void WarpRotate(float (&x)[E], int h, const float* signs,
                                           int first = -1) {
  const int lane = threadIdx.x & 31;
  if (signs != nullptr) {
    const float* sg = signs + (first < 0 ? lane * E : first);
#pragma unroll
    for (int i = 0; i < E; ++i) x[i] *= __ldg(sg + i);
  }
  WarpFWHT<E>(x, h);
  const float scale = RotationScale(h);
#pragma unroll
  for (int i = 0; i < E; ++i) x[i] *= scale;
}

// inverse(y) in place (H is symmetric and H*H = h*I).
template <int E>
__device__ __forceinline__ void WarpInverseRotate(float (&x)[E], int h, const float* signs) {
  const int lane = threadIdx.x & 31;
  WarpFWHT<E>(x, h);
  const float scale = RotationScale(h);
#pragma unroll
  for (int i = 0; i < E; ++i) x[i] *= scale;
  if (signs != nullptr) {
#pragma unroll
    for (int i = 0; i < E; ++i) x[i] *= __ldg(signs + lane * E + i);
  }
}

// Rotate (or inverse-rotate) `count` vectors of n floats each, stored back to back at `buf` in
// shared memory, with every thread of the block. n % h == 0. Synchronises the block before and
// after, so callers can write buf just before and read it right after.
__device__ __forceinline__ void BlockRotateShared(float* buf, int count, int n, int h,
                                                  const float* signs, bool inverse) {
  const int total = count * n;
  __syncthreads();
  if (signs != nullptr && !inverse) {
    for (int i = threadIdx.x; i < total; i += blockDim.x) buf[i] *= __ldg(signs + i % n);
    __syncthreads();
  }
  for (int s = 1; s < h; s <<= 1) {
    for (int p = threadIdx.x; p < total / 2; p += blockDim.x) {
      // pair p: block of 2s elements p / s, position p % s inside its lower half
      const int i = (p / s) * 2 * s + (p % s);
      const float a = buf[i], b = buf[i + s];
      buf[i] = a + b;
      buf[i + s] = a - b;
    }
    __syncthreads();
  }
  const float scale = RotationScale(h);
  for (int i = threadIdx.x; i < total; i += blockDim.x) {
    float v = buf[i] * scale;
    if (signs != nullptr && inverse) v *= __ldg(signs + i % n);
    buf[i] = v;
  }
  __syncthreads();
}

}  // namespace saw
