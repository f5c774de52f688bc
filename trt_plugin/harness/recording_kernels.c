/* A stand-in for libsawtrt_kernels.so that records what the plugin passes to the C ABI, for the
 * CPU tests of the plugin's enqueue (tests/test_trt_plugin_lib.py): every call prints one
 * "call ..." line to stdout, which the harness shares. The workspace size is a recognisable
 * function of its arguments. num_seqs == 7 makes saw_attention_step fail. */
#include <stdio.h>

#include "saw/c_api.h"

static char g_message[256] = "";

static void print_cfg(const SawConfig* c) {
  printf(" cfg=%d,%d,%d,%d,%d,%d,%d,%d,%.9g,%d", c->num_q_heads, c->num_kv_heads, c->head_dim,
         c->page_size, c->kind, c->rotation_block, c->rotate_v, c->act_dtype, c->sm_scale,
         c->signs != NULL);
}

size_t saw_workspace_bytes(const SawConfig* cfg, int32_t num_seqs, int32_t num_tokens,
                           int32_t max_seq_len) {
  printf("call workspace");
  print_cfg(cfg);
  printf(" B=%d T=%d L=%d\n", num_seqs, num_tokens, max_seq_len);
  fflush(stdout);
  return 1000000u + 1000u * (size_t)num_seqs + 10u * (size_t)num_tokens + (size_t)max_seq_len;
}

int saw_attention_step(const SawConfig* cfg, const void* qkv, int64_t qkv_stride,
                       void* pool_layer, const int32_t* block_tables, int32_t max_pages_per_seq,
                       const int32_t* seq_lens, const int32_t* cu_q_lens, int32_t num_seqs,
                       int32_t num_tokens, int32_t max_q_len, int32_t max_seq_len, void* out,
                       void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  printf("call step");
  print_cfg(cfg);
  printf(" ptrs=%p,%p,%p,%p,%p,%p,%p,%p stride=%lld max_pages=%d B=%d T=%d max_q=%d L=%d ws=%zu\n",
         qkv, pool_layer, (const void*)block_tables, (const void*)seq_lens,
         (const void*)cu_q_lens, out, workspace, (void*)stream, (long long)qkv_stride,
         max_pages_per_seq, num_seqs, num_tokens, max_q_len, max_seq_len, workspace_bytes);
  fflush(stdout);
  if (num_seqs == 7) {
    snprintf(g_message, sizeof(g_message), "recording kernels: refused num_seqs %d", num_seqs);
    return SAW_ERR_BAD_ARGUMENT;
  }
  return 0;
}

const char* saw_error_string(int code) { return code ? "error" : "success"; }
const char* saw_last_error_message(void) { return g_message; }
