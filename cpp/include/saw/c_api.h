// sawtrt kernel library: the C ABI shared by the torch ops (ctypes) and the TensorRT plugin.
//
// Every launcher validates its arguments, dispatches to a template instantiation and launches on
// `stream`; it never synchronizes and never allocates, so all of them can be captured in CUDA
// graphs. Return value: 0 (cudaSuccess) or a cudaError_t / SAW_ERR_* code; saw_error_string()
// names it. Host-side sizes (max_q_len, max_seq_len) are upper bounds used only for grid sizing.
//
// Layout and numerics: sawtrt/spec.py is the definition; saw/layout.cuh mirrors it and
// saw_page_layout() exports it so the Python tests check the two agree.
#pragma once
#include <stddef.h>
#include <stdint.h>
#include <cuda_runtime_api.h>

#ifdef __cplusplus
extern "C" {
#endif

enum SawKind { SAW_KIND_BF16 = 0, SAW_KIND_INT8 = 1, SAW_KIND_INT4 = 2 };
enum SawDtype { SAW_DTYPE_FP16 = 0, SAW_DTYPE_BF16 = 1 };
enum SawError {
  SAW_ERR_UNSUPPORTED = 10001,   // a configuration with no instantiation (message says which)
  SAW_ERR_BAD_ARGUMENT = 10002,  // null pointer, negative size, workspace too small, ...
};

typedef struct SawConfig {
  int32_t num_q_heads;     // Hq
  int32_t num_kv_heads;    // Hkv, Hq % Hkv == 0, group Hq/Hkv in 1..16
  int32_t head_dim;        // D in {64, 128, 256}
  int32_t page_size;       // tokens per page in {16, 32, 64, 128}
  int32_t kind;            // SawKind of the cache
  int32_t rotation_block;  // BDR block h (16..D, power of two, h | D); 0 = no rotation
  int32_t rotate_v;        // 1: V is rotated too (output is inverse-rotated)
  int32_t act_dtype;       // SawDtype of q/k/v and of the output
  float sm_scale;          // softmax scale, usually 1/sqrt(D)
  const float* signs;      // device pointer to D floats of +-1 applied before the FWHT, or NULL
} SawConfig;

typedef struct SawPageLayout {  // byte offsets inside one (page, KV head) block
  int64_t code_bytes, param_bytes, k_codes, k_params, v_codes, v_params, head_block_bytes;
} SawPageLayout;

int saw_page_layout(const SawConfig* cfg, SawPageLayout* out);
// 1 when saw_decode (and the decode path of saw_attention_step) serves cfg, else 0; no CUDA
// call. Libraries before it served bf16 and int4 only (the runtime assumes so when it is absent).
int saw_decode_supported(const SawConfig* cfg);
const char* saw_error_string(int code);
// Last launcher error message (thread-local), more specific than saw_error_string.
const char* saw_last_error_message(void);

// Write K and V of `num_tokens` tokens into their slots (slot = page * page_size + offset;
// slot < 0: skip). qkv: [num_tokens, qkv_stride] in act_dtype, Q at column 0, K at Hq*D,
// V at (Hq+Hkv)*D (the fused projection output after RoPE). pool_layer: one layer's pool.
int saw_write_kv(const SawConfig* cfg, const void* qkv, int64_t qkv_stride,
                 const int32_t* slot_mapping, int32_t num_tokens, void* pool_layer,
                 cudaStream_t stream);

// Bytes of workspace the attention launchers need (split-KV partials). The workspace must be
// 16-byte aligned (the split merge reads the partials as float4; allocator and TensorRT
// workspaces are).
size_t saw_workspace_bytes(const SawConfig* cfg, int32_t num_seqs, int32_t num_tokens,
                           int32_t max_seq_len);

// Decode: one query token per sequence. q: [num_seqs, q_stride] (head h at column h*D),
// block_tables: [num_seqs, max_pages_per_seq], seq_lens: [num_seqs] tokens in the cache
// (the new token already written). out: [num_seqs, Hq*D].
int saw_decode(const SawConfig* cfg, const void* q, int64_t q_stride, const void* pool_layer,
               const int32_t* block_tables, int32_t max_pages_per_seq, const int32_t* seq_lens,
               int32_t num_seqs, int32_t max_seq_len, void* out, void* workspace,
               size_t workspace_bytes, cudaStream_t stream);

// Prefill / chunked prefill / mixed batch: sequence b owns query rows
// cu_q_lens[b] .. cu_q_lens[b+1]-1, which sit at the last (cu_q_lens[b+1]-cu_q_lens[b])
// positions of its seq_lens[b] cached tokens and attend causally.
int saw_prefill(const SawConfig* cfg, const void* q, int64_t q_stride, const void* pool_layer,
                const int32_t* block_tables, int32_t max_pages_per_seq, const int32_t* seq_lens,
                const int32_t* cu_q_lens, int32_t num_seqs, int32_t num_tokens,
                int32_t max_q_len, int32_t max_seq_len, void* out, void* workspace,
                size_t workspace_bytes, cudaStream_t stream);

// One attention layer for a mixed batch (what the TensorRT plugin's enqueue calls): derives
// each new token's slot from block_tables/seq_lens/cu_q_lens, writes its K/V, then runs
// attention for every new token. out: [num_tokens, Hq*D]. Decode path when max_q_len == 1 and
// num_tokens == num_seqs: token b is then sequence b's new token (every q_len must be 1).
int saw_attention_step(const SawConfig* cfg, const void* qkv, int64_t qkv_stride,
                       void* pool_layer, const int32_t* block_tables, int32_t max_pages_per_seq,
                       const int32_t* seq_lens, const int32_t* cu_q_lens, int32_t num_seqs,
                       int32_t num_tokens, int32_t max_q_len, int32_t max_seq_len, void* out,
                       void* workspace, size_t workspace_bytes, cudaStream_t stream);

// The q/k prologue of a decode step (Qwen3 / Llama attention between the q/k/v projection and
// attention), for saw_attention_step_qk. Every query and key head x (D elements) becomes
//   x = round(norm_w * round(x * rsqrt(mean(x^2) + norm_eps)))     when the weight is given
//   x = round(x * cos + rotate_half(x) * sin)                        when cos / sin are given
// in fp32 with rounding to act_dtype where shown (rotate_half(x) = [-x[D/2:], x[:D/2]]), as
// sawtrt.models.model's compiled layer work computes it.
typedef struct SawQKPrologue {
  const void* q_norm;    // [D] act_dtype RMSNorm weight of every query head, or NULL: no norm
  const void* k_norm;    // [D] act_dtype, of every key head, or NULL
  float norm_eps;
  const void* rope_cos;  // [num_tokens, rope_stride] act_dtype, row t = token t's cos, or NULL:
  const void* rope_sin;  //   no RoPE (both or neither)
  int64_t rope_stride;   // elements between two tokens' rows, >= D
} SawQKPrologue;

// saw_attention_step on the raw projection: applies `prologue` to every query and key head,
// writes them back into qkv (q then feeds attention from there; V is not touched), then writes
// K/V and attends as saw_attention_step does. One kernel does the prologue, the slots and the
// write. qkv and the prologue's tensors 16-byte aligned for the vector path (else scalar).
int saw_attention_step_qk(const SawConfig* cfg, void* qkv, int64_t qkv_stride,
                          const SawQKPrologue* prologue, void* pool_layer,
                          const int32_t* block_tables, int32_t max_pages_per_seq,
                          const int32_t* seq_lens, const int32_t* cu_q_lens, int32_t num_seqs,
                          int32_t num_tokens, int32_t max_q_len, int32_t max_seq_len, void* out,
                          void* workspace, size_t workspace_bytes, cudaStream_t stream);

// Dense-prefill helper: dequantize positions 0 .. prefix_lens[b]-1 of each sequence b into rows
// row_starts[b] + p of k_out / v_out ([rows, out_stride] in act_dtype, head h at column h*D),
// in the original basis (the BDR rotation undone: K always, V when rotate_v). max_prefix_len:
// host-side upper bound of prefix_lens (grid sizing).
int saw_gather_kv(const SawConfig* cfg, const void* pool_layer, const int32_t* block_tables,
                  int32_t max_pages_per_seq, const int32_t* prefix_lens,
                  const int32_t* row_starts, int32_t num_seqs, int32_t max_prefix_len,
                  void* k_out, void* v_out, int64_t out_stride, cudaStream_t stream);

// Skinny GEMM for decode steps: y[m, n] = x[m, k] w[n, k]^T (+ bias[n]) in dtype (SawDtype),
// fp32 accumulation, one rounding. 1 <= m <= SAW_LINEAR_MAX_M; k % 8 == 0; m * k * 2 bytes <=
// SAW_LINEAR_MAX_X_BYTES (x is staged in shared memory); x and w 16-byte aligned, x_stride % 8
// == 0 (strides in elements); bias: [n] or NULL; y must not overlap x. Launched with
// programmatic dependent launch: w's first rows are read before the kernel waits for the one
// before it on the stream, so that kernel must not write w (x and bias are read after the
// wait). Measured faster than cuBLAS at m = 1 on Qwen3-4B's layer GEMMs; at m = 2 only on the
// 100 MB gate_up (sawtrt.bench.linear).
#define SAW_LINEAR_MAX_M 8
#define SAW_LINEAR_MAX_X_BYTES (160 * 1024)
int saw_linear(int32_t dtype, const void* x, int64_t x_stride, const void* w, const void* bias,
               void* y, int64_t y_stride, int32_t m, int32_t n, int32_t k, cudaStream_t stream);

// What saw_linear_fused does around the product; NULL members: nothing.
//   norm_weight [k]: each staged x row RMS-normalized first, dtype(norm_weight * dtype(x *
//     rsqrt(mean(x^2) + norm_eps))) (Llama / Qwen3 RMSNorm; every CTA reduces its own copy)
//   residual [m, residual_stride]: y = dtype(residual + dtype(x w^T + bias)), the projection
//     rounded before the add as a separate add would see it; may be y itself (in place). y
//     must not overlap x: other CTAs may still be staging x while one stores
typedef struct SawLinearFusion {
  const void* norm_weight;
  float norm_eps;
  const void* residual;
  int64_t residual_stride;
} SawLinearFusion;

// saw_linear with a decoder layer's neighbours folded in, so that a decode step's layer is a
// chain of kernels with nothing between them. glu != 0: x = gu [m, x_stride >= 2k] and the
// staged row is silu(gu[:, :k]) * gu[:, k:2k] rounded to dtype once (the gated MLP's down
// projection), not combinable with norm_weight. fusion: NULL or as above.
int saw_linear_fused(int32_t dtype, const void* x, int64_t x_stride, const void* w,
                     const void* bias, void* y, int64_t y_stride, int32_t m, int32_t n,
                     int32_t k, int32_t glu, const SawLinearFusion* fusion,
                     cudaStream_t stream);

#ifdef __cplusplus
}
#endif
