// Split-KV paged decode attention: launchers for saw/decode.cuh (see saw/launchers.h).
#include <algorithm>
#include <cmath>
#include <cstdlib>

#include <cuda_runtime.h>

#include "saw/c_api.h"
#include "saw/decode.cuh"
#include "saw/dispatch.cuh"
#include "saw/launch.cuh"
#include "saw/launchers.h"
#include "saw/layout.cuh"

namespace saw {
namespace {

// A split never covers fewer than kMinChunk tokens: its partial costs Hq/Hkv * (D+1) * 8 bytes
// (write + read back), ~2 % of its KV bytes at 256 tokens. SAWTRT_DECODE_MIN_CHUNK overrides it
// (tuning runs only).
constexpr int kMinChunkDefault = 256;
constexpr int kChunkAlign = 64;  // 4 warps x 16-token tiles

int MinChunk() {
  static const int v = [] {
    const char* e = std::getenv("SAWTRT_DECODE_MIN_CHUNK");
    const int x = e ? std::atoi(e) : 0;
    return x >= kChunkAlign ? x : kMinChunkDefault;
  }();
  return v;
}

struct SplitPlan {
  int splits, chunk;
};

// Splits per sequence: the fewest that make the grid fill whole waves of resident CTAs
// (>= 90 % of the last wave). First H200 run, batch 32 x 16K, fixed 16 CTAs per SM: 2304 CTAs
// = 4.4 waves of 528 and 60 % of copy bandwidth; the tail wave and per-CTA prologues cost most
// of the gap.
SplitPlan PlanSplits(int num_seqs, int num_kv_heads, int max_seq_len, int ctas_per_sm) {
  const int len = std::max(max_seq_len, 1);
  const int base = std::max(1, num_seqs * num_kv_heads);
  const int slots = std::max(1, SmCount() * std::max(ctas_per_sm, 1));
  const int cap = std::min(kDecodeMaxSplits, (len + MinChunk() - 1) / MinChunk());
  SplitPlan best{1, (len + kChunkAlign - 1) / kChunkAlign * kChunkAlign};
  double best_eff = -1.0;
  for (int s = 1; s <= std::max(cap, 1); ++s) {
    int chunk = (len + s - 1) / s;
    chunk = (chunk + kChunkAlign - 1) / kChunkAlign * kChunkAlign;
    const int splits = (len + chunk - 1) / chunk;
    const long n = long(base) * splits;
    const long waves = (n + slots - 1) / slots;
    const double eff = double(n) / double(waves * slots);
    if (eff > best_eff + 0.02) {
      best_eff = eff;
      best = {splits, chunk};
    }
    if (best_eff >= 0.9) break;
  }
  return best;
}

size_t PartialBytes(int num_seqs, int num_q_heads, int head_dim, const SplitPlan& plan) {
  if (plan.splits <= 1) return 0;
  const size_t rows = size_t(num_seqs) * num_q_heads * plan.splits;
  return rows * head_dim * sizeof(float) + rows * sizeof(float);
}

template <int D, int KIND, int NT>
struct TraitsOf {
  using type = DecodeTraits<D, KIND == SAW_KIND_INT4, NT>;
};
template <int D, int NT>
struct TraitsOf<D, SAW_KIND_INT8, NT> {
  using type = DecodeTraitsInt8<D, NT>;
};

template <int D, int KIND, int NT, typename T>
struct Instance {
  using TR = typename TraitsOf<D, KIND, NT>::type;
  static constexpr auto kernel = DecodeKernel<TR, T>;
  static_assert(D % 4 == 0 && D <= kDecodeReduceMaxD,
                "the split reducer stages a head in shared memory as float4 columns");

  static cudaError_t Configure() {  // once per instantiation (not a stream operation)
    static cudaError_t status = cudaFuncSetAttribute(
        kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, TR::kSmemBytes);
    return status;
  }
  static int CtasPerSm() {
    static int n = [] {
      int blocks = 0;
      if (Configure() != cudaSuccess ||
          cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, TR::kThreads,
                                                        TR::kSmemBytes) != cudaSuccess) {
        cudaGetLastError();
        blocks = TR::kMinBlocks;
      }
      return std::max(blocks, 1);
    }();
    return n;
  }
  static cudaError_t Launch(const DecodeParams& p, int num_seqs, bool programmatic,
                            cudaStream_t stream) {
    cudaError_t e = Configure();
    if (e != cudaSuccess) return e;
    dim3 grid(p.num_splits, p.num_kv_heads, num_seqs);
    if (programmatic) {
      e = LaunchProgrammatic(kernel, grid, dim3(TR::kThreads), TR::kSmemBytes, stream, p);
      if (e != cudaSuccess) return e;
    } else {
      kernel<<<grid, TR::kThreads, TR::kSmemBytes, stream>>>(p);
    }
    if (p.num_splits > 1) {  // the reducer's launch overlaps the main grid's tail
      e = LaunchProgrammatic(DecodeReduceKernel<T>, dim3(p.group * p.num_kv_heads, num_seqs),
                             dim3(kDecodeReduceThreads), 0, stream, p, int(D));
      if (e != cudaSuccess) return e;
    }
    return cudaGetLastError();
  }
};

// Calls f.template operator()<D, KIND, NT, T>() for the configuration, or sets an error.
template <class F>
cudaError_t Dispatch(const SawConfig& cfg, F&& f) {
  if (cfg.num_kv_heads <= 0 || cfg.num_q_heads % cfg.num_kv_heads)
    return SetError(SAW_ERR_BAD_ARGUMENT, "decode: %d query heads over %d KV heads",
                    cfg.num_q_heads, cfg.num_kv_heads);
  const int group = cfg.num_q_heads / cfg.num_kv_heads;
  if (group < 1 || group > 16)
    return SetError(SAW_ERR_UNSUPPORTED, "decode: GQA group %d not supported (1..16)", group);
  SAW_DISPATCH_DTYPE(cfg.act_dtype, T, {
    SAW_DISPATCH_HEAD_DIM(cfg.head_dim, D, {
      SAW_DISPATCH_KIND(cfg.kind, KIND, {
        return group <= 8 ? f.template operator()<D, KIND, 1, T>()
                          : f.template operator()<D, KIND, 2, T>();
      });
    });
  });
  return cudaSuccess;
}

struct GetOccupancy {
  int* out;
  template <int D, int KIND, int NT, typename T>
  cudaError_t operator()() const {
    *out = Instance<D, KIND, NT, T>::CtasPerSm();
    return cudaSuccess;
  }
};

struct DoLaunch {
  const DecodeParams* p;
  int num_seqs;
  bool programmatic;
  cudaStream_t stream;
  template <int D, int KIND, int NT, typename T>
  cudaError_t operator()() const {
    return Instance<D, KIND, NT, T>::Launch(*p, num_seqs, programmatic, stream);
  }
};

struct Probe {  // Dispatch reaches an instantiation: nothing to launch
  template <int D, int KIND, int NT, typename T>
  cudaError_t operator()() const { return cudaSuccess; }
};

SplitPlan Plan(const SawConfig& cfg, int32_t num_seqs, int32_t max_seq_len) {
  int occ = 4;
  if (Dispatch(cfg, GetOccupancy{&occ}) != cudaSuccess) occ = 4;
  return PlanSplits(num_seqs, cfg.num_kv_heads, max_seq_len, occ);
}

}  // namespace

int SmCount() {
  int dev = 0, n = 132;
  if (cudaGetDevice(&dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess) {
    cudaGetLastError();
    n = 132;
  }
  return n;
}

bool DecodeSupported(const SawConfig& cfg) {
  const int P = cfg.page_size;
  return P >= 16 && !(P & (P - 1)) && Dispatch(cfg, Probe{}) == cudaSuccess;
}

// The most any batch of 1 .. num_seqs sequences needs: fewer sequences get more splits each, so
// the need is not monotone in the batch, and callers size the workspace once for their largest
// batch (the TensorRT plugin at its profile's maxima).
size_t DecodeWorkspaceBytes(const SawConfig& cfg, int32_t num_seqs, int32_t max_seq_len) {
  if (num_seqs <= 0 || cfg.num_kv_heads <= 0) return 0;
  int occ = 4;
  if (Dispatch(cfg, GetOccupancy{&occ}) != cudaSuccess) occ = 4;
  size_t bytes = 0;
  for (int b = 1; b <= num_seqs; ++b)
    bytes = std::max(bytes, PartialBytes(b, cfg.num_q_heads, cfg.head_dim,
                                         PlanSplits(b, cfg.num_kv_heads, max_seq_len, occ)));
  return bytes;
}

cudaError_t LaunchDecode(const SawConfig& cfg, const void* q, int64_t q_stride,
                         const void* pool_layer, const int32_t* block_tables,
                         int32_t max_pages_per_seq, const int32_t* seq_lens, int32_t num_seqs,
                         int32_t max_seq_len, void* out, void* workspace, size_t workspace_bytes,
                         cudaStream_t stream, bool after_write) {
  if (num_seqs <= 0) return cudaSuccess;
  const int P = cfg.page_size;
  if (P < 16 || (P & (P - 1)))
    return SetError(SAW_ERR_UNSUPPORTED, "decode: page_size %d (16..128, power of two)", P);
  SplitPlan plan = Plan(cfg, num_seqs, max_seq_len);
  if (PartialBytes(num_seqs, cfg.num_q_heads, cfg.head_dim, plan) > workspace_bytes ||
      workspace == nullptr)
    plan = {1, plan.splits * plan.chunk};  // no room for partials: one split per sequence
  const int D = cfg.head_dim;

  DecodeParams p{};
  p.q = q;
  p.q_stride = q_stride;
  p.pool = static_cast<const uint8_t*>(pool_layer);
  p.head_block_bytes = PageLayout(cfg.kind, D, P).head_block_bytes;
  p.block_tables = block_tables;
  p.max_pages = max_pages_per_seq;
  p.seq_lens = seq_lens;
  p.out = out;
  const size_t rows = size_t(num_seqs) * cfg.num_q_heads * plan.splits;
  p.part_o = static_cast<float*>(workspace);
  p.part_lse = plan.splits > 1 ? static_cast<float*>(workspace) + rows * D : nullptr;
  p.num_kv_heads = cfg.num_kv_heads;
  p.group = cfg.num_q_heads / cfg.num_kv_heads;
  p.page_size = P;
  p.page_shift = 0;
  while ((1 << p.page_shift) < P) ++p.page_shift;
  p.num_splits = plan.splits;
  p.chunk = plan.chunk;
  p.rot_block = cfg.kind == SAW_KIND_INT4 ? cfg.rotation_block : 0;  // int8 is never rotated
  p.rotate_v = cfg.rotate_v;
  p.signs = cfg.signs;
  p.q_scale = cfg.sm_scale * 1.4426950408889634f;  // log2(e): softmax runs on exp2
  // after the write kernel only: it reads none of what the kernel reads before its wait (the
  // block table, seq_lens), which another kernel before a standalone saw_decode might write
  return Dispatch(cfg, DoLaunch{&p, num_seqs, after_write, stream});
}

}  // namespace saw
