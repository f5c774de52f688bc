// C++ launchers behind the C ABI (c_api.h). cpp/c_api.cu validates arguments and calls these;
// each is implemented next to its kernel in cpp/kernels/*.cu.
#pragma once
#include "saw/c_api.h"

namespace saw {

// Where the write kernel finds each new token's slot: slot_mapping when given, else from the
// step (token i of sequence b sits at position seq_lens[b] - q_len_b + i; decode: one token per
// sequence, token b of sequence b).
struct WriteSlots {
  const int32_t* slot_mapping = nullptr;
  const int32_t* block_tables = nullptr;
  int32_t max_pages_per_seq = 0;
  const int32_t* seq_lens = nullptr;
  const int32_t* cu_q_lens = nullptr;
  int32_t num_seqs = 0;
  bool decode = false;
};

// cpp/kernels/write_kv.cu — rotate + quantize + store K and V at their slots; with a prologue,
// q/k RMSNorm and RoPE first, q and k written back into qkv.
cudaError_t LaunchWriteKV(const SawConfig& cfg, const void* qkv, int64_t qkv_stride,
                          const WriteSlots& slots, const SawQKPrologue* prologue,
                          int32_t num_tokens, void* pool_layer, cudaStream_t stream);

// cpp/kernels/decode.cu — SMs of the current device (132 when it cannot be asked).
int SmCount();

// cpp/kernels/decode.cu — split-KV paged decode attention.
size_t DecodeWorkspaceBytes(const SawConfig& cfg, int32_t num_seqs, int32_t max_seq_len);
// True when the decode kernel has an instantiation for cfg (kind, head_dim, group, dtype, page).
bool DecodeSupported(const SawConfig& cfg);
cudaError_t LaunchDecode(const SawConfig& cfg, const void* q, int64_t q_stride,
                         const void* pool_layer, const int32_t* block_tables,
                         int32_t max_pages_per_seq, const int32_t* seq_lens, int32_t num_seqs,
                         int32_t max_seq_len, void* out, void* workspace, size_t workspace_bytes,
                         cudaStream_t stream, bool after_write = false);

// cpp/kernels/prefill.cu — causal paged prefill / mixed-batch attention.
size_t PrefillWorkspaceBytes(const SawConfig& cfg, int32_t num_seqs, int32_t num_tokens,
                             int32_t max_seq_len);
cudaError_t LaunchPrefill(const SawConfig& cfg, const void* q, int64_t q_stride,
                          const void* pool_layer, const int32_t* block_tables,
                          int32_t max_pages_per_seq, const int32_t* seq_lens,
                          const int32_t* cu_q_lens, int32_t num_seqs, int32_t num_tokens,
                          int32_t max_q_len, int32_t max_seq_len, void* out, void* workspace,
                          size_t workspace_bytes, cudaStream_t stream);

// cpp/kernels/gather_kv.cu — cached prefixes dequantized (and un-rotated) into contiguous rows.
cudaError_t LaunchGatherKV(const SawConfig& cfg, const void* pool_layer,
                           const int32_t* block_tables, int32_t max_pages_per_seq,
                           const int32_t* prefix_lens, const int32_t* row_starts,
                           int32_t num_seqs, int32_t max_prefix_len, void* k_out, void* v_out,
                           int64_t out_stride, cudaStream_t stream);

// cpp/kernels/linear.cu — skinny GEMM y = x W^T (+ bias) for decode steps (m <= 8 rows);
// glu: x = silu(x[:, :k]) * x[:, k:2k] (the gated MLP's down projection input); fusion: RMSNorm
// of x, residual add (null: neither).
cudaError_t LaunchLinear(int32_t dtype, const void* x, int64_t x_stride, const void* w,
                         const void* bias, void* y, int64_t y_stride, int32_t m, int32_t n,
                         int32_t k, bool glu, const SawLinearFusion* fusion,
                         cudaStream_t stream);

}  // namespace saw
