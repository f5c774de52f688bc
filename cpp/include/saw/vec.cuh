// Vector loads/stores and the cp.async (global -> shared) pipeline primitives.
//
// The decode kernel streams each (page, KV head) block with 16-byte cp.async copies into a
// per-warp ring of shared-memory stages, so several KB per warp are in flight without holding
// registers (the paper's Triton kernel was latency-bound with 64-byte register loads).
#pragma once
#include <cstdint>
#include <cuda_runtime.h>

namespace saw {

__device__ __forceinline__ uint32_t SmemAddr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte async copy global -> shared. `valid == false` zero-fills the destination and reads
// nothing (tokens past the sequence end: their bytes may be garbage or NaN in an unwritten page).
__device__ __forceinline__ void CpAsync16(uint32_t dst, const void* src, bool valid) {
  const int bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global.L2::128B [%0], [%1], 16, %2;\n"
               ::"r"(dst), "l"(src), "r"(bytes) : "memory");
}

__device__ __forceinline__ void CpAsyncCommit() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}

// Wait until at most `N` of this thread's committed groups are still pending.
template <int N>
__device__ __forceinline__ void CpAsyncWait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

__device__ __forceinline__ uint4 Lds128(uint32_t addr) {
  uint4 v;
  asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "r"(addr));
  return v;
}

__device__ __forceinline__ uint2 Lds64(uint32_t addr) {
  uint2 v;
  asm volatile("ld.shared.v2.u32 {%0, %1}, [%2];\n" : "=r"(v.x), "=r"(v.y) : "r"(addr));
  return v;
}

__device__ __forceinline__ uint32_t Lds32(uint32_t addr) {
  uint32_t v;
  asm volatile("ld.shared.u32 %0, [%1];\n" : "=r"(v) : "r"(addr));
  return v;
}

// Load `N` consecutive 32-bit words from shared memory (N = 1, 2, 4, or a multiple of 4),
// 16 bytes at a time where possible.
template <int N>
__device__ __forceinline__ void LdsWords(uint32_t addr, uint32_t (&w)[N]) {
  if constexpr (N == 1) {
    w[0] = Lds32(addr);
  } else if constexpr (N == 2) {
    const uint2 v = Lds64(addr);
    w[0] = v.x; w[1] = v.y;
  } else {
    static_assert(N % 4 == 0, "word count");
#pragma unroll
    for (int i = 0; i < N / 4; ++i) {
      const uint4 v = Lds128(addr + 16 * i);
      w[4 * i] = v.x; w[4 * i + 1] = v.y; w[4 * i + 2] = v.z; w[4 * i + 3] = v.w;
    }
  }
}

}  // namespace saw
