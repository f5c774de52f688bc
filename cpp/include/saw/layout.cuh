// Page layout of the SAW-INT4 paged KV cache — the C++ mirror of sawtrt.spec.PageLayout.
//
// The one C++ definition of where codes and (scale, offset) pairs live. saw_page_layout() exports
// it and tests/test_build.py checks it against the Python spec for many configurations.
//
// A pool for one layer is uint8 [num_pages, num_kv_heads, head_block_bytes]; each
// (page, KV head) owns one contiguous head block:
//   [ K codes: page_size * code_bytes | K params: page_size * 4 | V codes | V params ]
// code_bytes = D/2 (int4: byte j = element 2j low nibble, 2j+1 high nibble), D (int8), 2D (bf16).
// params = (scale, offset) as two fp16 per token, absent (0 bytes) for a bf16 cache.
// A slot is page_id * page_size + offset_in_page; slot < 0 means "skip" (padding).
#pragma once
#include <stdint.h>

#include "saw/c_api.h"

namespace saw {

constexpr int kParamBytes = 4;  // (scale, offset), fp16 each

__host__ __device__ constexpr int KindBits(int kind) {
  return kind == SAW_KIND_INT4 ? 4 : kind == SAW_KIND_INT8 ? 8 : 16;
}

struct PageLayout {
  int64_t code_bytes;        // bytes of K (or V) codes per token
  int64_t param_bytes;       // bytes of (scale, offset) per token: 4, or 0 for bf16
  int64_t k_codes, k_params, v_codes, v_params;  // region offsets inside a head block
  int64_t head_block_bytes;  // one (page, KV head) block

  __host__ __device__ constexpr PageLayout(int kind, int head_dim, int page_size)
      : code_bytes(int64_t(head_dim) * KindBits(kind) / 8),
        param_bytes(kind == SAW_KIND_BF16 ? 0 : kParamBytes),
        k_codes(0),
        k_params(int64_t(page_size) * code_bytes),
        v_codes(int64_t(page_size) * (code_bytes + param_bytes)),
        v_params(v_codes + int64_t(page_size) * code_bytes),
        head_block_bytes(int64_t(page_size) * 2 * (code_bytes + param_bytes)) {}

  // First byte of the head block of (page, kv_head) in one layer's pool.
  __host__ __device__ uint8_t* HeadBlock(void* pool, int64_t page, int kv_head,
                                         int num_kv_heads) const {
    return static_cast<uint8_t*>(pool) + (page * num_kv_heads + kv_head) * head_block_bytes;
  }
  __host__ __device__ const uint8_t* HeadBlock(const void* pool, int64_t page, int kv_head,
                                               int num_kv_heads) const {
    return static_cast<const uint8_t*>(pool) + (page * num_kv_heads + kv_head) * head_block_bytes;
  }
};

// Compile-time form for kernels: every offset a constant, so address math folds.
template <int KIND, int D, int PAGE>
struct PageLayoutT {
  static constexpr int kBits = KindBits(KIND);
  static constexpr int kCodeBytes = D * kBits / 8;
  static constexpr int kParamBytesPerToken = KIND == SAW_KIND_BF16 ? 0 : kParamBytes;
  static constexpr int kKCodes = 0;
  static constexpr int kKParams = PAGE * kCodeBytes;
  static constexpr int kVCodes = PAGE * (kCodeBytes + kParamBytesPerToken);
  static constexpr int kVParams = kVCodes + PAGE * kCodeBytes;
  static constexpr int kHeadBlockBytes = PAGE * 2 * (kCodeBytes + kParamBytesPerToken);
  static_assert(kHeadBlockBytes % 16 == 0, "head blocks must stay 16-byte aligned");
  static_assert(PageLayout(KIND, D, PAGE).head_block_bytes == kHeadBlockBytes,
                "runtime and compile-time layouts disagree");
};

}  // namespace saw
