// The C ABI (saw/c_api.h): validate every argument, then call the launchers (saw/launchers.h).
// Validation runs before any CUDA call, so a bad configuration is reported the same on a
// machine without a GPU (tests/test_build.py relies on that).
#include <math.h>
#include <cmath>
#include <algorithm>
#include <stdarg.h>
#include <stdio.h>

#include <cuda_runtime_api.h>

#include "saw/c_api.h"
#include "saw/launchers.h"
#include "saw/layout.cuh"

namespace saw {
namespace {
thread_local char g_message[512] = "";
}  // namespace

cudaError_t SetError(int code, const char* fmt, ...) {
  va_list args;
  va_start(args, fmt);
  vsnprintf(g_message, sizeof(g_message), fmt, args);
  va_end(args);
  return static_cast<cudaError_t>(code);
}

}  // namespace saw

namespace {

using saw::SetError;

bool IsPow2(int x) { return x > 0 && (x & (x - 1)) == 0; }

// Returns 0 or an error code with the message set.
int CheckConfig(const SawConfig* cfg) {
  if (cfg == nullptr) return SetError(SAW_ERR_BAD_ARGUMENT, "config pointer is NULL");
  const SawConfig& c = *cfg;
  if (c.head_dim != 64 && c.head_dim != 128 && c.head_dim != 256)
    return SetError(SAW_ERR_UNSUPPORTED, "head_dim %d not supported (64, 128, 256)", c.head_dim);
  if (c.page_size != 16 && c.page_size != 32 && c.page_size != 64 && c.page_size != 128)
    return SetError(SAW_ERR_UNSUPPORTED, "page_size %d not supported (16, 32, 64, 128)",
                    c.page_size);
  if (c.kind != SAW_KIND_BF16 && c.kind != SAW_KIND_INT8 && c.kind != SAW_KIND_INT4)
    return SetError(SAW_ERR_UNSUPPORTED, "cache kind %d not supported (0 bf16, 1 int8, 2 int4)",
                    c.kind);
  if (c.num_kv_heads < 1)
    return SetError(SAW_ERR_BAD_ARGUMENT, "num_kv_heads %d must be >= 1", c.num_kv_heads);
  if (c.num_q_heads < 1 || c.num_q_heads % c.num_kv_heads)
    return SetError(SAW_ERR_BAD_ARGUMENT, "num_q_heads %d is not a multiple of num_kv_heads %d",
                    c.num_q_heads, c.num_kv_heads);
  const int group = c.num_q_heads / c.num_kv_heads;
  if (group > 16)
    return SetError(SAW_ERR_UNSUPPORTED, "GQA group %d (num_q_heads %d / num_kv_heads %d) "
                    "not supported (1..16)", group, c.num_q_heads, c.num_kv_heads);
  if (c.rotation_block != 0) {
    if (c.kind != SAW_KIND_INT4)
      return SetError(SAW_ERR_UNSUPPORTED, "rotation block %d needs an int4 cache (kind %d)",
                      c.rotation_block, c.kind);
    if (!IsPow2(c.rotation_block) || c.rotation_block < 16 || c.rotation_block > c.head_dim)
      return SetError(SAW_ERR_UNSUPPORTED, "rotation block %d must be a power of two in "
                      "[16, head_dim %d]", c.rotation_block, c.head_dim);
  } else {
    if (c.rotate_v)
      return SetError(SAW_ERR_BAD_ARGUMENT, "rotate_v %d set without a rotation block",
                      c.rotate_v);
    if (c.signs != nullptr)
      return SetError(SAW_ERR_BAD_ARGUMENT, "signs given without a rotation block");
  }
  if (c.rotate_v != 0 && c.rotate_v != 1)
    return SetError(SAW_ERR_BAD_ARGUMENT, "rotate_v %d must be 0 or 1", c.rotate_v);
  if (c.act_dtype != SAW_DTYPE_FP16 && c.act_dtype != SAW_DTYPE_BF16)
    return SetError(SAW_ERR_UNSUPPORTED, "activation dtype %d not supported (0 fp16, 1 bf16)",
                    c.act_dtype);
  if (!(isfinite(c.sm_scale) && c.sm_scale > 0.f))
    return SetError(SAW_ERR_BAD_ARGUMENT, "sm_scale %g must be finite and > 0",
                    double(c.sm_scale));
  return 0;
}

#define SAW_REQUIRE(cond, code, ...) \
  do {                               \
    if (!(cond)) return SetError(code, __VA_ARGS__); \
  } while (0)
#define SAW_CHECK_CONFIG(cfg)          \
  do {                                 \
    if (int e_ = CheckConfig(cfg)) return e_; \
  } while (0)

int CheckAttentionArgs(const SawConfig& c, const void* q, int64_t q_stride, const void* pool,
                       const int32_t* block_tables, int32_t max_pages, const int32_t* seq_lens,
                       int32_t num_seqs, int32_t max_seq_len, const void* out) {
  SAW_REQUIRE(num_seqs >= 0, SAW_ERR_BAD_ARGUMENT, "num_seqs %d is negative", num_seqs);
  SAW_REQUIRE(max_pages >= 1, SAW_ERR_BAD_ARGUMENT, "max_pages_per_seq %d must be >= 1",
              max_pages);
  SAW_REQUIRE(max_seq_len >= 0 && int64_t(max_seq_len) <= int64_t(max_pages) * c.page_size,
              SAW_ERR_BAD_ARGUMENT,
              "max_seq_len %d outside [0, max_pages_per_seq %d * page_size %d]", max_seq_len,
              max_pages, c.page_size);
  SAW_REQUIRE(q_stride >= int64_t(c.num_q_heads) * c.head_dim, SAW_ERR_BAD_ARGUMENT,
              "q stride %lld < num_q_heads * head_dim = %d", (long long)q_stride,
              c.num_q_heads * c.head_dim);
  if (num_seqs > 0) {
    SAW_REQUIRE(q && pool && block_tables && seq_lens && out, SAW_ERR_BAD_ARGUMENT,
                "NULL pointer among q %p, pool %p, block_tables %p, seq_lens %p, out %p", q,
                pool, (const void*)block_tables, (const void*)seq_lens, out);
  }
  return 0;
}

// The chunked-prefill arguments shared by saw_prefill and saw_attention_step.
int CheckQueryRows(int32_t num_seqs, int32_t num_tokens, int32_t max_q_len, int32_t max_seq_len,
                   const int32_t* cu_q_lens) {
  SAW_REQUIRE(num_tokens >= 0, SAW_ERR_BAD_ARGUMENT, "num_tokens %d is negative", num_tokens);
  SAW_REQUIRE(max_q_len >= 0 && max_q_len <= max_seq_len, SAW_ERR_BAD_ARGUMENT,
              "max_q_len %d outside [0, max_seq_len %d]", max_q_len, max_seq_len);
  if (num_seqs > 0 && num_tokens > 0)
    SAW_REQUIRE(cu_q_lens != nullptr, SAW_ERR_BAD_ARGUMENT, "cu_q_lens is NULL");
  return 0;
}

// The arguments saw_linear and saw_linear_fused share (x: what is staged, m x k elements).
int CheckLinear(int32_t dtype, const void* x, int64_t x_stride, const void* w, const void* y,
                int64_t y_stride, int32_t m, int32_t n, int32_t k) {
  SAW_REQUIRE(dtype == SAW_DTYPE_FP16 || dtype == SAW_DTYPE_BF16, SAW_ERR_UNSUPPORTED,
              "linear: dtype %d not supported (0 fp16, 1 bf16)", dtype);
  SAW_REQUIRE(m >= 1 && m <= SAW_LINEAR_MAX_M, SAW_ERR_UNSUPPORTED,
              "linear: m %d outside [1, %d]", m, SAW_LINEAR_MAX_M);
  SAW_REQUIRE(n >= 0 && k > 0 && k % 8 == 0, SAW_ERR_BAD_ARGUMENT,
              "linear: n %d must be >= 0 and k %d a positive multiple of 8", n, k);
  SAW_REQUIRE(int64_t(m) * k * 2 <= SAW_LINEAR_MAX_X_BYTES, SAW_ERR_UNSUPPORTED,
              "linear: x (%d x %d) exceeds %d bytes of shared memory", m, k,
              SAW_LINEAR_MAX_X_BYTES);
  SAW_REQUIRE(x_stride >= k && x_stride % 8 == 0 && y_stride >= n, SAW_ERR_BAD_ARGUMENT,
              "linear: x_stride %lld (>= k %d, multiple of 8) / y_stride %lld (>= n %d)",
              (long long)x_stride, k, (long long)y_stride, n);
  SAW_REQUIRE(x && w && y, SAW_ERR_BAD_ARGUMENT, "linear: NULL pointer among x %p, w %p, y %p",
              x, w, y);
  SAW_REQUIRE(!(reinterpret_cast<uintptr_t>(x) % 16) && !(reinterpret_cast<uintptr_t>(w) % 16),
              SAW_ERR_BAD_ARGUMENT, "linear: x %p and w %p must be 16-byte aligned", x, w);
  return 0;
}

// The split-KV partials: at least `need` bytes, 16-byte aligned (the split merge reads them as
// float4). `what` names the launcher in the message.
int CheckWorkspace(const void* workspace, size_t workspace_bytes, size_t need, const char* what) {
  if (need == 0) return 0;
  SAW_REQUIRE(workspace_bytes >= need && workspace, SAW_ERR_BAD_ARGUMENT,
              "workspace of %zu bytes at %p, %s needs %zu (saw_workspace_bytes)", workspace_bytes,
              workspace, what, need);
  SAW_REQUIRE(reinterpret_cast<uintptr_t>(workspace) % 16 == 0, SAW_ERR_BAD_ARGUMENT,
              "workspace %p must be 16-byte aligned", workspace);
  return 0;
}

// saw_attention_step with an optional q/k prologue (saw_attention_step_qk).
int AttentionStep(const SawConfig* cfg, const void* qkv, int64_t qkv_stride,
                  const SawQKPrologue* prologue, void* pool_layer, const int32_t* block_tables,
                  int32_t max_pages_per_seq, const int32_t* seq_lens, const int32_t* cu_q_lens,
                  int32_t num_seqs, int32_t num_tokens, int32_t max_q_len, int32_t max_seq_len,
                  void* out, void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  SAW_CHECK_CONFIG(cfg);
  const SawConfig& c = *cfg;
  const int64_t need_stride = int64_t(c.num_q_heads + 2 * c.num_kv_heads) * c.head_dim;
  SAW_REQUIRE(qkv_stride >= need_stride, SAW_ERR_BAD_ARGUMENT,
              "qkv stride %lld < (num_q_heads + 2 * num_kv_heads) * head_dim = %lld",
              (long long)qkv_stride, (long long)need_stride);
  if (int e = CheckAttentionArgs(c, qkv, qkv_stride, pool_layer, block_tables, max_pages_per_seq,
                                 seq_lens, num_seqs, max_seq_len, out))
    return e;
  if (int e = CheckQueryRows(num_seqs, num_tokens, max_q_len, max_seq_len, cu_q_lens)) return e;
  if (num_seqs == 0 || num_tokens == 0) return 0;
  const bool decode = max_q_len == 1 && num_tokens == num_seqs;
  const size_t need = decode ? saw::DecodeWorkspaceBytes(c, num_seqs, max_seq_len)
                             : saw::PrefillWorkspaceBytes(c, num_seqs, num_tokens, max_seq_len);
  if (int e = CheckWorkspace(workspace, workspace_bytes, need, "attention step")) return e;
  saw::WriteSlots slots;  // derived in the write kernel from the step
  slots.block_tables = block_tables;
  slots.max_pages_per_seq = max_pages_per_seq;
  slots.seq_lens = seq_lens;
  slots.cu_q_lens = cu_q_lens;
  slots.num_seqs = num_seqs;
  slots.decode = decode;
  cudaError_t e = saw::LaunchWriteKV(c, qkv, qkv_stride, slots, prologue, num_tokens,
                                     pool_layer, stream);
  if (e != cudaSuccess) return e;
  if (decode)  // programmatic launch: its prologue overlaps the write (saw/launch.cuh)
    return saw::LaunchDecode(c, qkv, qkv_stride, pool_layer, block_tables, max_pages_per_seq,
                             seq_lens, num_seqs, max_seq_len, out, workspace, workspace_bytes,
                             stream, /*after_write=*/true);
  return saw::LaunchPrefill(c, qkv, qkv_stride, pool_layer, block_tables, max_pages_per_seq,
                            seq_lens, cu_q_lens, num_seqs, num_tokens, max_q_len, max_seq_len,
                            out, workspace, workspace_bytes, stream);
}

}  // namespace

extern "C" {

int saw_page_layout(const SawConfig* cfg, SawPageLayout* out) {
  SAW_CHECK_CONFIG(cfg);
  SAW_REQUIRE(out != nullptr, SAW_ERR_BAD_ARGUMENT, "output pointer is NULL");
  const saw::PageLayout l(cfg->kind, cfg->head_dim, cfg->page_size);
  *out = SawPageLayout{l.code_bytes, l.param_bytes, l.k_codes, l.k_params,
                       l.v_codes,    l.v_params,    l.head_block_bytes};
  return 0;
}

int saw_decode_supported(const SawConfig* cfg) {
  if (CheckConfig(cfg)) return 0;
  return saw::DecodeSupported(*cfg) ? 1 : 0;
}

const char* saw_error_string(int code) {
  switch (code) {
    case 0: return "success";
    case SAW_ERR_UNSUPPORTED: return "unsupported configuration";
    case SAW_ERR_BAD_ARGUMENT: return "bad argument";
    default: return cudaGetErrorString(static_cast<cudaError_t>(code));
  }
}

const char* saw_last_error_message(void) { return saw::g_message; }

int saw_write_kv(const SawConfig* cfg, const void* qkv, int64_t qkv_stride,
                 const int32_t* slot_mapping, int32_t num_tokens, void* pool_layer,
                 cudaStream_t stream) {
  SAW_CHECK_CONFIG(cfg);
  const int64_t need = int64_t(cfg->num_q_heads + 2 * cfg->num_kv_heads) * cfg->head_dim;
  SAW_REQUIRE(num_tokens >= 0, SAW_ERR_BAD_ARGUMENT, "num_tokens %d is negative", num_tokens);
  SAW_REQUIRE(qkv_stride >= need, SAW_ERR_BAD_ARGUMENT,
              "qkv stride %lld < (num_q_heads + 2 * num_kv_heads) * head_dim = %lld",
              (long long)qkv_stride, (long long)need);
  if (num_tokens == 0) return 0;
  SAW_REQUIRE(qkv && slot_mapping && pool_layer, SAW_ERR_BAD_ARGUMENT,
              "NULL pointer among qkv %p, slot_mapping %p, pool %p", qkv,
              (const void*)slot_mapping, pool_layer);
  saw::WriteSlots slots;
  slots.slot_mapping = slot_mapping;
  return saw::LaunchWriteKV(*cfg, qkv, qkv_stride, slots, nullptr, num_tokens, pool_layer,
                            stream);
}

size_t saw_workspace_bytes(const SawConfig* cfg, int32_t num_seqs, int32_t num_tokens,
                           int32_t max_seq_len) {
  if (CheckConfig(cfg) || num_seqs < 0 || num_tokens < 0 || max_seq_len < 0) return 0;
  return std::max(saw::DecodeWorkspaceBytes(*cfg, num_seqs, max_seq_len),
                  saw::PrefillWorkspaceBytes(*cfg, num_seqs, num_tokens, max_seq_len));
}

int saw_decode(const SawConfig* cfg, const void* q, int64_t q_stride, const void* pool_layer,
               const int32_t* block_tables, int32_t max_pages_per_seq, const int32_t* seq_lens,
               int32_t num_seqs, int32_t max_seq_len, void* out, void* workspace,
               size_t workspace_bytes, cudaStream_t stream) {
  SAW_CHECK_CONFIG(cfg);
  if (int e = CheckAttentionArgs(*cfg, q, q_stride, pool_layer, block_tables, max_pages_per_seq,
                                 seq_lens, num_seqs, max_seq_len, out))
    return e;
  if (num_seqs == 0) return 0;
  const size_t need = saw::DecodeWorkspaceBytes(*cfg, num_seqs, max_seq_len);
  if (int e = CheckWorkspace(workspace, workspace_bytes, need, "decode")) return e;
  return saw::LaunchDecode(*cfg, q, q_stride, pool_layer, block_tables, max_pages_per_seq,
                           seq_lens, num_seqs, max_seq_len, out, workspace, workspace_bytes,
                           stream);
}

int saw_prefill(const SawConfig* cfg, const void* q, int64_t q_stride, const void* pool_layer,
                const int32_t* block_tables, int32_t max_pages_per_seq, const int32_t* seq_lens,
                const int32_t* cu_q_lens, int32_t num_seqs, int32_t num_tokens,
                int32_t max_q_len, int32_t max_seq_len, void* out, void* workspace,
                size_t workspace_bytes, cudaStream_t stream) {
  SAW_CHECK_CONFIG(cfg);
  if (int e = CheckAttentionArgs(*cfg, q, q_stride, pool_layer, block_tables, max_pages_per_seq,
                                 seq_lens, num_seqs, max_seq_len, out))
    return e;
  if (int e = CheckQueryRows(num_seqs, num_tokens, max_q_len, max_seq_len, cu_q_lens)) return e;
  if (num_seqs == 0 || num_tokens == 0) return 0;
  const size_t need = saw::PrefillWorkspaceBytes(*cfg, num_seqs, num_tokens, max_seq_len);
  if (int e = CheckWorkspace(workspace, workspace_bytes, need, "prefill")) return e;
  return saw::LaunchPrefill(*cfg, q, q_stride, pool_layer, block_tables, max_pages_per_seq,
                            seq_lens, cu_q_lens, num_seqs, num_tokens, max_q_len, max_seq_len,
                            out, workspace, workspace_bytes, stream);
}

int saw_attention_step(const SawConfig* cfg, const void* qkv, int64_t qkv_stride,
                       void* pool_layer, const int32_t* block_tables, int32_t max_pages_per_seq,
                       const int32_t* seq_lens, const int32_t* cu_q_lens, int32_t num_seqs,
                       int32_t num_tokens, int32_t max_q_len, int32_t max_seq_len, void* out,
                       void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  return AttentionStep(cfg, qkv, qkv_stride, nullptr, pool_layer, block_tables,
                       max_pages_per_seq, seq_lens, cu_q_lens, num_seqs, num_tokens, max_q_len,
                       max_seq_len, out, workspace, workspace_bytes, stream);
}

int saw_attention_step_qk(const SawConfig* cfg, void* qkv, int64_t qkv_stride,
                          const SawQKPrologue* prologue, void* pool_layer,
                          const int32_t* block_tables, int32_t max_pages_per_seq,
                          const int32_t* seq_lens, const int32_t* cu_q_lens, int32_t num_seqs,
                          int32_t num_tokens, int32_t max_q_len, int32_t max_seq_len, void* out,
                          void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  SAW_CHECK_CONFIG(cfg);
  SAW_REQUIRE(prologue != nullptr, SAW_ERR_BAD_ARGUMENT, "prologue is NULL");
  const SawQKPrologue& pr = *prologue;
  SAW_REQUIRE((pr.rope_cos == nullptr) == (pr.rope_sin == nullptr), SAW_ERR_BAD_ARGUMENT,
              "rope_cos %p and rope_sin %p: both or neither", pr.rope_cos, pr.rope_sin);
  SAW_REQUIRE(pr.rope_cos == nullptr || pr.rope_stride >= cfg->head_dim, SAW_ERR_BAD_ARGUMENT,
              "rope_stride %lld < head_dim %d", (long long)pr.rope_stride, cfg->head_dim);
  SAW_REQUIRE((pr.q_norm == nullptr && pr.k_norm == nullptr) ||
                  (std::isfinite(pr.norm_eps) && pr.norm_eps >= 0.f),
              SAW_ERR_BAD_ARGUMENT, "norm_eps %g must be finite and >= 0", double(pr.norm_eps));
  return AttentionStep(cfg, qkv, qkv_stride, prologue, pool_layer, block_tables,
                       max_pages_per_seq, seq_lens, cu_q_lens, num_seqs, num_tokens, max_q_len,
                       max_seq_len, out, workspace, workspace_bytes, stream);
}

int saw_gather_kv(const SawConfig* cfg, const void* pool_layer, const int32_t* block_tables,
                  int32_t max_pages_per_seq, const int32_t* prefix_lens,
                  const int32_t* row_starts, int32_t num_seqs, int32_t max_prefix_len,
                  void* k_out, void* v_out, int64_t out_stride, cudaStream_t stream) {
  SAW_CHECK_CONFIG(cfg);
  const SawConfig& c = *cfg;
  SAW_REQUIRE(num_seqs >= 0 && max_pages_per_seq >= 0, SAW_ERR_BAD_ARGUMENT,
              "num_seqs %d / max_pages_per_seq %d is negative", num_seqs, max_pages_per_seq);
  SAW_REQUIRE(max_prefix_len >= 0 &&
                  int64_t(max_prefix_len) <= int64_t(max_pages_per_seq) * c.page_size,
              SAW_ERR_BAD_ARGUMENT, "max_prefix_len %d outside [0, max_pages_per_seq %d * "
              "page_size %d]", max_prefix_len, max_pages_per_seq, c.page_size);
  SAW_REQUIRE(out_stride >= int64_t(c.num_kv_heads) * c.head_dim, SAW_ERR_BAD_ARGUMENT,
              "out stride %lld < num_kv_heads * head_dim = %d", (long long)out_stride,
              c.num_kv_heads * c.head_dim);
  if (num_seqs == 0 || max_prefix_len == 0) return 0;
  SAW_REQUIRE(pool_layer && block_tables && prefix_lens && row_starts && k_out && v_out,
              SAW_ERR_BAD_ARGUMENT, "NULL pointer among pool %p, block_tables %p, prefix_lens "
              "%p, row_starts %p, k_out %p, v_out %p", pool_layer, (const void*)block_tables,
              (const void*)prefix_lens, (const void*)row_starts, k_out, v_out);
  return saw::LaunchGatherKV(c, pool_layer, block_tables, max_pages_per_seq, prefix_lens,
                             row_starts, num_seqs, max_prefix_len, k_out, v_out, out_stride,
                             stream);
}

int saw_linear(int32_t dtype, const void* x, int64_t x_stride, const void* w, const void* bias,
               void* y, int64_t y_stride, int32_t m, int32_t n, int32_t k, cudaStream_t stream) {
  if (int e = CheckLinear(dtype, x, x_stride, w, y, y_stride, m, n, k)) return e;
  if (n == 0) return 0;
  return saw::LaunchLinear(dtype, x, x_stride, w, bias, y, y_stride, m, n, k, false, nullptr,
                           stream);
}

int saw_linear_fused(int32_t dtype, const void* x, int64_t x_stride, const void* w,
                     const void* bias, void* y, int64_t y_stride, int32_t m, int32_t n,
                     int32_t k, int32_t glu, const SawLinearFusion* fusion,
                     cudaStream_t stream) {
  if (glu)
    SAW_REQUIRE(x_stride >= 2 * int64_t(k), SAW_ERR_BAD_ARGUMENT,
                "linear: glu needs x_stride %lld >= 2 * k (k %d)", (long long)x_stride, k);
  if (int e = CheckLinear(dtype, x, x_stride, w, y, y_stride, m, n, k)) return e;
  if (fusion != nullptr) {
    SAW_REQUIRE(!(glu && fusion->norm_weight), SAW_ERR_UNSUPPORTED,
                "linear: glu and norm_weight together");
    SAW_REQUIRE(!fusion->norm_weight || !(reinterpret_cast<uintptr_t>(fusion->norm_weight) % 16),
                SAW_ERR_BAD_ARGUMENT, "linear: norm_weight %p must be 16-byte aligned",
                fusion->norm_weight);
    SAW_REQUIRE(!fusion->norm_weight || fusion->norm_eps >= 0.f, SAW_ERR_BAD_ARGUMENT,
                "linear: norm_eps %g < 0", double(fusion->norm_eps));
    SAW_REQUIRE(!fusion->residual || fusion->residual_stride >= n, SAW_ERR_BAD_ARGUMENT,
                "linear: residual_stride %lld < n %d", (long long)fusion->residual_stride, n);
  }
  if (n == 0) return 0;
  return saw::LaunchLinear(dtype, x, x_stride, w, bias, y, y_stride, m, n, k, glu != 0, fusion,
                           stream);
}

}  // extern "C"
