#include "saw_attention.h"

#include <cuda_runtime_api.h>

#include <algorithm>
#include <vector>

#include "kernel_library.h"
#include "logging.h"

namespace sawtrt {

using nvinfer1::DataType;
using nvinfer1::Dims;
using nvinfer1::DynamicPluginTensorDesc;
using nvinfer1::PluginTensorDesc;
using nvinfer1::TensorFormat;
using nvinfer1::TensorRTPhase;

namespace {

enum Position { kQkv = 0, kPool, kBlockTables, kSeqLens, kCuQLens, kOut };
const char* const kIoNames[] = {"qkv", "pool", "block_tables", "seq_lens", "cu_q_lens", "out"};

std::string List(const Dims& d) {  // Python's list repr of dims
  std::string s = "[";
  for (int i = 0; i < d.nbDims; ++i) s += (i ? ", " : "") + std::to_string(d.d[i]);
  return s + "]";
}

const char* TypeName(DataType t) {  // trt.DataType member names
  switch (t) {
    case DataType::kFLOAT: return "FLOAT";
    case DataType::kHALF: return "HALF";
    case DataType::kINT8: return "INT8";
    case DataType::kINT32: return "INT32";
    case DataType::kBOOL: return "BOOL";
    case DataType::kUINT8: return "UINT8";
    case DataType::kFP8: return "FP8";
    case DataType::kBF16: return "BF16";
    case DataType::kINT64: return "INT64";
    case DataType::kINT4: return "INT4";
    case DataType::kFP4: return "FP4";
    case DataType::kE8M0: return "E8M0";
  }
  return "UNKNOWN";
}

bool IsActivation(DataType t) { return t == DataType::kHALF || t == DataType::kBF16; }

std::string ResolvedPolicy(const Params& p) {  // str(spec.PageLayout(...).policy)
  Params r = p;
  r.rotation_block = p.ResolvedBlock();
  return r.Policy();
}

std::string LayerPrefix(const Params& p) {
  return "SawAttention layer " + std::to_string(p.layer_index) + ": ";
}

// Runs f; an exception becomes a logged error and `fail`.
template <typename R, typename F>
R Guard(R fail, F&& f) noexcept {
  try {
    return f();
  } catch (const std::exception& e) {
    LogError(e.what());
  } catch (...) {
    LogError("SawAttention: unknown C++ exception");
  }
  return fail;
}

}  // namespace

int64_t StepShape::MaxSeqLen(const Params& p) const {
  if (max_pages < 0) return p.max_seq_len;
  return std::max<int64_t>(1, std::min<int64_t>(p.max_seq_len, max_pages * p.page_size));
}

// Each sequence has >= 1 new token, and its new tokens are among its cached ones.
int64_t StepShape::MaxQLen(const Params& p) const {
  return std::max<int64_t>(1, std::min(num_tokens - num_seqs + 1, MaxSeqLen(p)));
}

StepShape CheckShapes(const Params& p, const Dims* in, int32_t nb_in, const Dims* out,
                      int32_t nb_out) {
  if (nb_in != kNumInputs)
    throw ShapeError("SawAttention takes 5 inputs (qkv, pool, block_tables, seq_lens, "
                     "cu_q_lens), got " + std::to_string(nb_in));
  const Dims &qkv = in[kQkv], &pool = in[kPool], &bt = in[kBlockTables], &sl = in[kSeqLens],
             &cu = in[kCuQLens];
  // the message is built only on failure: this runs in every enqueue, per layer and step
  auto need = [&](bool ok, auto&& what) {
    if (!ok) throw ShapeError(LayerPrefix(p) + what());
  };
  auto eq = [](int64_t a, int64_t b) { return a < 0 || b < 0 || a == b; };
  const int64_t hbb = p.HeadBlockBytes();
  need(qkv.nbDims == 2 && eq(qkv.d[1], p.QkvWidth()), [&] {
    return "qkv must be [tokens, (Hq+2Hkv)*D = " + std::to_string(p.QkvWidth()) + "], got " +
           List(qkv);
  });
  if (pool.nbDims == 3) {
    need(eq(pool.d[1], p.num_kv_heads) && eq(pool.d[2], hbb), [&] {
      return "pool must be [pages, Hkv=" + std::to_string(p.num_kv_heads) +
             ", head_block_bytes=" + std::to_string(hbb) + "] for " + ResolvedPolicy(p) +
             " page_size=" + std::to_string(p.page_size) + ", got " + List(pool);
    });
  } else {
    need(pool.nbDims == 2 && eq(pool.d[1], p.PageBytes()), [&] {
      return "pool must be [pages, Hkv, " + std::to_string(hbb) + "] or [pages, " +
             std::to_string(p.PageBytes()) + "], got " + List(pool);
    });
  }
  need(bt.nbDims == 2, [&] { return "block_tables must be [batch, max_pages], got " + List(bt); });
  need(sl.nbDims == 1 && eq(sl.d[0], bt.d[0]), [&] {
    return "seq_lens must be [batch = " + std::to_string(bt.d[0]) + "], got " + List(sl);
  });
  need(cu.nbDims == 1 && (bt.d[0] < 0 || eq(cu.d[0], bt.d[0] + 1)), [&] {
    return "cu_q_lens must be [batch + 1 = " +
           (bt.d[0] >= 0 ? std::to_string(bt.d[0] + 1) : std::string("batch+1")) + "], got " +
           List(cu);
  });
  const int64_t batch = bt.d[0] >= 0   ? bt.d[0]
                        : sl.d[0] >= 0 ? sl.d[0]
                        : cu.d[0] > 0  ? cu.d[0] - 1
                                       : -1;
  need(batch < 0 || batch <= p.max_batch, [&] {
    return "batch " + std::to_string(batch) + " > max_batch=" + std::to_string(p.max_batch);
  });
  if (out != nullptr) {
    need(nb_out == kNumOutputs,
         [&] { return "one output expected, got " + std::to_string(nb_out); });
    const Dims& o = out[0];
    need(o.nbDims == 2 && eq(o.d[0], qkv.d[0]) && eq(o.d[1], p.OutWidth()), [&] {
      return "out must be [tokens = " + std::to_string(qkv.d[0]) + ", Hq*D = " +
             std::to_string(p.OutWidth()) + "], got " + List(o);
    });
  }
  return StepShape{qkv.d[0], batch, bt.d[1], pool.d[0]};
}

bool SupportsFormat(const Params& p, int32_t pos, const DataType* types,
                    const TensorFormat* formats, int32_t nb_inputs, int32_t nb_outputs) {
  if (nb_inputs != kNumInputs || nb_outputs != kNumOutputs || pos < 0 ||
      pos >= kNumInputs + kNumOutputs)
    return false;
  if (formats[pos] != TensorFormat::kLINEAR) return false;
  const DataType t = types[pos];
  switch (pos) {
    case kQkv:
      if (p.dtype == "fp16") return t == DataType::kHALF;
      if (p.dtype == "bf16") return t == DataType::kBF16;
      return IsActivation(t);
    case kPool: return t == DataType::kUINT8 || t == DataType::kINT8;
    case kBlockTables:
    case kSeqLens:
    case kCuQLens: return t == DataType::kINT32;
    default: return t == types[kQkv] && IsActivation(t);
  }
}

// -- the plugin -------------------------------------------------------------------------------

SawAttentionPlugin::SawAttentionPlugin(const Params& params, TensorRTPhase phase)
    : params_(params),
      phase_(phase),
      fields_(params),
      summary_(params.Summary()),
      timing_cache_id_([&] {
        Params p = params;
        p.layer_index = 0;  // layers differ only in layer_index: TensorRT times one of them
        return p.Summary();
      }()) {}

SawAttentionPlugin::~SawAttentionPlugin() {
  if (signs_ != nullptr) cudaFree(signs_);
}

nvinfer1::IPluginCapability* SawAttentionPlugin::getCapabilityInterface(
    nvinfer1::PluginCapabilityType type) noexcept {
  switch (type) {
    case nvinfer1::PluginCapabilityType::kCORE:
      return static_cast<nvinfer1::IPluginV3OneCore*>(this);
    case nvinfer1::PluginCapabilityType::kBUILD:
      return static_cast<nvinfer1::IPluginV3OneBuild*>(this);
    case nvinfer1::PluginCapabilityType::kRUNTIME:
      return static_cast<nvinfer1::IPluginV3OneRuntime*>(this);
  }
  return nullptr;
}

nvinfer1::IPluginV3* SawAttentionPlugin::clone() noexcept {
  // Same fields and phase; the copy makes its own signs buffer (nothing device-side is shared).
  return Guard<nvinfer1::IPluginV3*>(nullptr, [&] { return new SawAttentionPlugin(params_, phase_); });
}

int32_t SawAttentionPlugin::configurePlugin(const DynamicPluginTensorDesc* in, int32_t nb_in,
                                            const DynamicPluginTensorDesc* out,
                                            int32_t nb_out) noexcept {
  return Guard<int32_t>(-1, [&] {
    std::vector<Dims> ins, outs;
    for (int i = 0; i < nb_in; ++i) ins.push_back(in[i].desc.dims);
    for (int i = 0; i < nb_out; ++i) outs.push_back(out[i].desc.dims);
    CheckShapes(params_, ins.data(), nb_in, outs.data(), nb_out);
    // The workspace size and every enqueue need the kernels: fail the build now, not the run.
    std::string why;
    if (LoadKernelLibrary(&why) == nullptr) throw ShapeError(LayerPrefix(params_) + why);
    return 0;
  });
}

int32_t SawAttentionPlugin::getOutputDataTypes(DataType* output_types, int32_t nb_outputs,
                                               const DataType* input_types,
                                               int32_t nb_inputs) const noexcept {
  return Guard<int32_t>(-1, [&] {
    if (nb_inputs != kNumInputs)
      throw ShapeError("SawAttention takes 5 inputs, got " + std::to_string(nb_inputs));
    if (nb_outputs != kNumOutputs)
      throw ShapeError("SawAttention has 1 output, asked for " + std::to_string(nb_outputs));
    output_types[0] = input_types[kQkv];
    return 0;
  });
}

int32_t SawAttentionPlugin::getOutputShapes(const nvinfer1::DimsExprs* inputs, int32_t nb_inputs,
                                            const nvinfer1::DimsExprs*, int32_t,
                                            nvinfer1::DimsExprs* outputs, int32_t nb_outputs,
                                            nvinfer1::IExprBuilder& expr_builder) noexcept {
  return Guard<int32_t>(-1, [&] {
    if (nb_inputs != kNumInputs)
      throw ShapeError("SawAttention takes 5 inputs, got " + std::to_string(nb_inputs));
    if (nb_outputs != kNumOutputs)
      throw ShapeError("SawAttention has 1 output, asked for " + std::to_string(nb_outputs));
    const nvinfer1::DimsExprs& qkv = inputs[kQkv];
    if (qkv.nbDims != 2)
      throw ShapeError("SawAttention: qkv must have rank 2, got rank " +
                       std::to_string(qkv.nbDims));
    if (qkv.d[1]->isConstant() && qkv.d[1]->getConstantValue() != params_.QkvWidth())
      throw ShapeError(LayerPrefix(params_) + "qkv has " +
                       std::to_string(qkv.d[1]->getConstantValue()) +
                       " columns, the fields say (Hq+2Hkv)*D = " +
                       std::to_string(params_.QkvWidth()));
    outputs[0].nbDims = 2;
    outputs[0].d[0] = qkv.d[0];
    outputs[0].d[1] = expr_builder.constant(params_.OutWidth());
    return 0;
  });
}

bool SawAttentionPlugin::supportsFormatCombination(int32_t pos,
                                                   const DynamicPluginTensorDesc* in_out,
                                                   int32_t nb_inputs, int32_t nb_outputs) noexcept {
  return Guard<bool>(false, [&] {
    if (pos < 0 || pos >= nb_inputs + nb_outputs) return false;
    std::vector<DataType> types;
    std::vector<TensorFormat> formats;
    for (int i = 0; i <= pos; ++i) {  // positions after pos hold no decided values yet
      types.push_back(in_out[i].desc.type);
      formats.push_back(in_out[i].desc.format);
    }
    return SupportsFormat(params_, pos, types.data(), formats.data(), nb_inputs, nb_outputs);
  });
}

namespace {
SawConfig MakeConfig(const Params& p, DataType act, const float* signs) {
  SawConfig c{};
  c.num_q_heads = int32_t(p.num_q_heads);  // ParseFields checked the int32 range
  c.num_kv_heads = int32_t(p.num_kv_heads);
  c.head_dim = int32_t(p.head_dim);
  c.page_size = int32_t(p.page_size);
  c.kind = p.KindCode();
  c.rotation_block = p.ResolvedBlock();
  c.rotate_v = int32_t(p.rotate_v);
  c.act_dtype = act == DataType::kBF16 ? SAW_DTYPE_BF16 : SAW_DTYPE_FP16;
  c.sm_scale = p.Scale();
  c.signs = signs;
  return c;
}
}  // namespace

size_t SawAttentionPlugin::getWorkspaceSize(const DynamicPluginTensorDesc* in, int32_t nb_in,
                                            const DynamicPluginTensorDesc*, int32_t) const noexcept {
  return Guard<size_t>(0, [&]() -> size_t {
    if (nb_in != kNumInputs)
      throw ShapeError("SawAttention takes 5 inputs, got " + std::to_string(nb_in));
    // The requirement at the profile's maxima: it grows with every argument, so smaller calls fit.
    const int64_t tokens = in[kQkv].max.d[0], batch = in[kSeqLens].max.d[0];
    if (tokens < 0 || batch < 0)
      throw ShapeError("SawAttention: workspace asked for without profile maxima (qkv max " +
                       List(in[kQkv].max) + ", seq_lens max " + List(in[kSeqLens].max) + ")");
    const StepShape shape{tokens, std::min<int64_t>(batch, params_.max_batch),
                          in[kBlockTables].max.d[1], -1};
    if (shape.num_seqs <= 0 || shape.num_tokens <= 0) return 0;
    std::string why;
    const KernelLibrary* lib = LoadKernelLibrary(&why);
    if (lib == nullptr) throw ShapeError(LayerPrefix(params_) + why);
    const DataType act = IsActivation(in[kQkv].desc.type) ? in[kQkv].desc.type : DataType::kHALF;
    const SawConfig cfg = MakeConfig(params_, act, nullptr);  // the signs change no size
    return lib->workspace_bytes(&cfg, int32_t(shape.num_seqs), int32_t(shape.num_tokens),
                                int32_t(shape.MaxSeqLen(params_)));
  });
}

int32_t SawAttentionPlugin::onShapeChange(const PluginTensorDesc* in, int32_t nb_in,
                                          const PluginTensorDesc* out, int32_t nb_out) noexcept {
  return Guard<int32_t>(-1, [&] {
    std::vector<Dims> ins, outs;
    for (int i = 0; i < nb_in; ++i) ins.push_back(in[i].dims);
    for (int i = 0; i < nb_out; ++i) outs.push_back(out[i].dims);
    CheckShapes(params_, ins.data(), nb_in, outs.data(), nb_out);
    return 0;
  });
}

const float* SawAttentionPlugin::Signs(cudaStream_t stream) {
  int device = 0;
  cudaError_t e = cudaGetDevice(&device);
  if (e == cudaSuccess && signs_ != nullptr && device == signs_device_) return signs_;
  if (e == cudaSuccess && signs_ != nullptr) {
    cudaFree(signs_);
    signs_ = nullptr;
  }
  std::vector<float> host(size_t(params_.head_dim));
  SignsOf(int32_t(params_.sign_seed), int32_t(params_.head_dim), host.data());
  if (e == cudaSuccess) e = cudaMalloc(reinterpret_cast<void**>(&signs_), host.size() * 4);
  // Pageable source: the copy has read `host` when cudaMemcpyAsync returns.
  if (e == cudaSuccess)
    e = cudaMemcpyAsync(signs_, host.data(), host.size() * 4, cudaMemcpyHostToDevice, stream);
  if (e != cudaSuccess) {
    if (signs_ != nullptr) cudaFree(signs_);
    signs_ = nullptr;
    throw ShapeError(LayerPrefix(params_) + "sign_seed=" + std::to_string(params_.sign_seed) +
                     " needs the signs device buffer, which could not be made: " +
                     cudaGetErrorString(e));
  }
  signs_device_ = device;
  return signs_;
}

void SawAttentionPlugin::Enqueue(const PluginTensorDesc* input_desc,
                                 const PluginTensorDesc* output_desc, const void* const* inputs,
                                 void* const* outputs, void* workspace, cudaStream_t stream) {
  Dims ins[kNumInputs], outs[kNumOutputs];
  DataType types[kNumInputs + kNumOutputs];
  TensorFormat formats[kNumInputs + kNumOutputs];
  for (int i = 0; i < kNumInputs; ++i) {
    ins[i] = input_desc[i].dims;
    types[i] = input_desc[i].type;
    formats[i] = TensorFormat::kLINEAR;  // TensorRT hands the negotiated (LINEAR) format
  }
  outs[0] = output_desc[0].dims;
  types[kOut] = output_desc[0].type;
  formats[kOut] = TensorFormat::kLINEAR;
  const StepShape shape = CheckShapes(params_, ins, kNumInputs, outs, kNumOutputs);
  for (int pos = 0; pos < kNumInputs + kNumOutputs; ++pos)
    if (!SupportsFormat(params_, pos, types, formats, kNumInputs, kNumOutputs))
      throw ShapeError(LayerPrefix(params_) + "unsupported type " + TypeName(types[pos]) +
                       " at position " + std::to_string(pos) + " (" + kIoNames[pos] + ")");
  if (shape.num_tokens == 0 || shape.num_seqs == 0) return;
  if (shape.num_tokens < shape.num_seqs)
    throw ShapeError(LayerPrefix(params_) + std::to_string(shape.num_tokens) + " tokens for " +
                     std::to_string(shape.num_seqs) +
                     " sequences (each sequence needs >= 1 new token)");
  std::string why;
  const KernelLibrary* lib = LoadKernelLibrary(&why);
  if (lib == nullptr) throw ShapeError(LayerPrefix(params_) + why);
  const float* signs = params_.NeedsSigns() ? Signs(stream) : nullptr;
  const SawConfig cfg = MakeConfig(params_, types[kQkv], signs);
  const int32_t max_seq_len = int32_t(shape.MaxSeqLen(params_));
  const size_t ws = lib->workspace_bytes(&cfg, int32_t(shape.num_seqs),
                                         int32_t(shape.num_tokens), max_seq_len);
  const int code = lib->attention_step(
      &cfg, inputs[kQkv], params_.QkvWidth(), const_cast<void*>(inputs[kPool]),
      static_cast<const int32_t*>(inputs[kBlockTables]), int32_t(shape.max_pages),
      static_cast<const int32_t*>(inputs[kSeqLens]), static_cast<const int32_t*>(inputs[kCuQLens]),
      int32_t(shape.num_seqs), int32_t(shape.num_tokens), int32_t(shape.MaxQLen(params_)), max_seq_len,
      outputs[0], workspace, ws, stream);
  if (code != 0) {
    const char* msg = lib->last_error_message();
    throw ShapeError(LayerPrefix(params_) + "saw_attention_step failed: [" +
                     std::to_string(code) + "] " +
                     (msg && *msg ? msg : lib->error_string(code)));
  }
}

int32_t SawAttentionPlugin::enqueue(const PluginTensorDesc* input_desc,
                                    const PluginTensorDesc* output_desc, const void* const* inputs,
                                    void* const* outputs, void* workspace,
                                    cudaStream_t stream) noexcept {
  // The builder times enqueue on uninitialized inputs: garbage block tables would address
  // memory outside the pool, so the BUILD phase launches nothing.
  if (phase_ == TensorRTPhase::kBUILD) return 0;
  return Guard<int32_t>(-1, [&] {
    Enqueue(input_desc, output_desc, inputs, outputs, workspace, stream);
    return 0;
  });
}

// -- the creator ------------------------------------------------------------------------------

SawAttentionCreator::SawAttentionCreator() {
  for (int k = 0; k < kNumFields; ++k) {
    const FieldSpec& f = kFields[k];
    const auto type = f.kind == FieldKind::kInt32     ? nvinfer1::PluginFieldType::kINT32
                      : f.kind == FieldKind::kFloat32 ? nvinfer1::PluginFieldType::kFLOAT32
                                                      : nvinfer1::PluginFieldType::kCHAR;
    fields_.emplace_back(f.name, nullptr, type, f.kind == FieldKind::kChar ? 0 : 1);
  }
  names_.nbFields = int32_t(fields_.size());
  names_.fields = fields_.data();
}

nvinfer1::IPluginV3* SawAttentionCreator::createPlugin(const char*,
                                                       const nvinfer1::PluginFieldCollection* fc,
                                                       TensorRTPhase phase) noexcept {
  return Guard<nvinfer1::IPluginV3*>(nullptr, [&] {
    return static_cast<nvinfer1::IPluginV3*>(new SawAttentionPlugin(ParseFields(fc), phase));
  });
}

}  // namespace sawtrt
