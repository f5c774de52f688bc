// Kernel sandbox entry for the decode kernel (llm.c dev/cuda style): a standalone shared library
// exporting the decode launcher under dev names, so cpp/dev/decode_check.py can validate and time
// it before (or without) the full library.
//
// Compile (sm_90a only, for speed; the real build is build_scripts/):
//   nvcc -O3 -std=c++17 -gencode=arch=compute_90a,code=sm_90a -Xptxas -v -shared \
//        -Xcompiler -fPIC -Icpp/include cpp/kernels/decode.cu cpp/dev/decode_dev.cu \
//        -o build/libsawdecode_dev.so
#include <stdarg.h>
#include <stdio.h>

#include "saw/c_api.h"
#include "saw/launchers.h"

namespace saw {
static char g_dev_message[512];
// The library's c_api.cu defines this; the sandbox gets its own.
cudaError_t SetError(int code, const char* fmt, ...) {
  va_list args;
  va_start(args, fmt);
  vsnprintf(g_dev_message, sizeof(g_dev_message), fmt, args);
  va_end(args);
  return static_cast<cudaError_t>(code);
}
}  // namespace saw

extern "C" {
size_t sawdev_decode_workspace_bytes(const SawConfig* cfg, int32_t num_seqs, int32_t max_seq_len) {
  return saw::DecodeWorkspaceBytes(*cfg, num_seqs, max_seq_len);
}
int sawdev_decode(const SawConfig* cfg, const void* q, int64_t q_stride, const void* pool_layer,
                  const int32_t* block_tables, int32_t max_pages_per_seq, const int32_t* seq_lens,
                  int32_t num_seqs, int32_t max_seq_len, void* out, void* workspace,
                  size_t workspace_bytes, cudaStream_t stream) {
  return saw::LaunchDecode(*cfg, q, q_stride, pool_layer, block_tables, max_pages_per_seq,
                           seq_lens, num_seqs, max_seq_len, out, workspace, workspace_bytes,
                           stream);
}
const char* sawdev_last_error(void) { return saw::g_dev_message; }
}
