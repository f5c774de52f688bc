// Small dispatch macros: turn a runtime value into a constexpr and name the bad value when there
// is no instantiation for it. Used only in launchers (host code) that return cudaError_t.
#pragma once
#include <cuda_runtime_api.h>

#include "saw/c_api.h"

namespace saw {
// Record a printf-style message for saw_last_error_message() and return `code` (cpp/c_api.cu).
cudaError_t SetError(int code, const char* fmt, ...);
}  // namespace saw

#define SAW_DISPATCH_CASE(VALUE, NAME, ...) \
  case VALUE: {                            \
    constexpr int NAME = VALUE;            \
    __VA_ARGS__;                           \
  } break;

// head_dim -> constexpr D in {64, 128, 256}
#define SAW_DISPATCH_HEAD_DIM(value, NAME, ...)                                         \
  switch (value) {                                                                      \
    SAW_DISPATCH_CASE(64, NAME, __VA_ARGS__)                                            \
    SAW_DISPATCH_CASE(128, NAME, __VA_ARGS__)                                           \
    SAW_DISPATCH_CASE(256, NAME, __VA_ARGS__)                                           \
    default:                                                                            \
      return ::saw::SetError(SAW_ERR_UNSUPPORTED,                                       \
                             "head_dim %d not supported (64, 128, 256)", int(value));   \
  }

// SawKind -> constexpr kind
#define SAW_DISPATCH_KIND(value, NAME, ...)                                             \
  switch (value) {                                                                      \
    SAW_DISPATCH_CASE(SAW_KIND_BF16, NAME, __VA_ARGS__)                                 \
    SAW_DISPATCH_CASE(SAW_KIND_INT8, NAME, __VA_ARGS__)                                 \
    SAW_DISPATCH_CASE(SAW_KIND_INT4, NAME, __VA_ARGS__)                                 \
    default:                                                                            \
      return ::saw::SetError(SAW_ERR_UNSUPPORTED,                                       \
                             "cache kind %d not supported (0 bf16, 1 int8, 2 int4)",    \
                             int(value));                                               \
  }

// SawDtype -> type alias T (half or __nv_bfloat16)
#define SAW_DISPATCH_DTYPE(value, T, ...)                                               \
  switch (value) {                                                                      \
    case SAW_DTYPE_FP16: {                                                              \
      using T = __half;                                                                 \
      __VA_ARGS__;                                                                      \
    } break;                                                                            \
    case SAW_DTYPE_BF16: {                                                              \
      using T = __nv_bfloat16;                                                          \
      __VA_ARGS__;                                                                      \
    } break;                                                                            \
    default:                                                                            \
      return ::saw::SetError(SAW_ERR_UNSUPPORTED,                                       \
                             "activation dtype %d not supported (0 fp16, 1 bf16)",      \
                             int(value));                                               \
  }
