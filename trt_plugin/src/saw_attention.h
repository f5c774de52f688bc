// sawtrt::SawAttention v1: SAW-INT4 paged attention as a compiled TensorRT IPluginV3, and its
// IPluginCreatorV3One. trt_plugin/README.md documents the fields, I/O, formats, workspace and
// value contract; the Python plugin (sawtrt/trt/plugin.py) implements the same contract and
// tests/test_trt_plugin_lib.py checks that the two agree.
#pragma once
#include <memory>
#include <string>

#include <NvInferRuntime.h>

#include "params.h"

namespace sawtrt {

// Why a check failed; the message names the input and the expected shape.
class ShapeError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

struct StepShape {
  int64_t num_tokens, num_seqs, max_pages, num_pages;  // -1 where still unknown
  int64_t MaxSeqLen(const Params& p) const;
  int64_t MaxQLen(const Params& p) const;  // min(T - B + 1, MaxSeqLen)
};

// core.check_shapes: validates dims against the fields (-1 entries skipped).
StepShape CheckShapes(const Params& p, const nvinfer1::Dims* in, int32_t nb_in,
                      const nvinfer1::Dims* out, int32_t nb_out);
// core.supports_format over the descriptions of positions 0..pos.
bool SupportsFormat(const Params& p, int32_t pos, const nvinfer1::DataType* types,
                    const nvinfer1::TensorFormat* formats, int32_t nb_inputs, int32_t nb_outputs);

class SawAttentionPlugin final : public nvinfer1::IPluginV3,
                                 public nvinfer1::IPluginV3OneCore,
                                 public nvinfer1::IPluginV3OneBuild,
                                 public nvinfer1::IPluginV3OneRuntime {
 public:
  SawAttentionPlugin(const Params& params, nvinfer1::TensorRTPhase phase);
  ~SawAttentionPlugin() override;

  // IPluginV3
  nvinfer1::IPluginCapability* getCapabilityInterface(
      nvinfer1::PluginCapabilityType type) noexcept override;
  nvinfer1::IPluginV3* clone() noexcept override;

  // IPluginV3OneCore
  const char* getPluginName() const noexcept override { return kPluginName; }
  const char* getPluginVersion() const noexcept override { return kPluginVersion; }
  const char* getPluginNamespace() const noexcept override { return kPluginNamespace; }

  // IPluginV3OneBuild
  int32_t configurePlugin(const nvinfer1::DynamicPluginTensorDesc* in, int32_t nb_in,
                          const nvinfer1::DynamicPluginTensorDesc* out,
                          int32_t nb_out) noexcept override;
  int32_t getOutputDataTypes(nvinfer1::DataType* output_types, int32_t nb_outputs,
                             const nvinfer1::DataType* input_types,
                             int32_t nb_inputs) const noexcept override;
  int32_t getOutputShapes(const nvinfer1::DimsExprs* inputs, int32_t nb_inputs,
                          const nvinfer1::DimsExprs* shape_inputs, int32_t nb_shape_inputs,
                          nvinfer1::DimsExprs* outputs, int32_t nb_outputs,
                          nvinfer1::IExprBuilder& expr_builder) noexcept override;
  bool supportsFormatCombination(int32_t pos, const nvinfer1::DynamicPluginTensorDesc* in_out,
                                 int32_t nb_inputs, int32_t nb_outputs) noexcept override;
  int32_t getNbOutputs() const noexcept override { return kNumOutputs; }
  size_t getWorkspaceSize(const nvinfer1::DynamicPluginTensorDesc* in, int32_t nb_in,
                          const nvinfer1::DynamicPluginTensorDesc* out,
                          int32_t nb_out) const noexcept override;
  const char* getTimingCacheID() noexcept override { return timing_cache_id_.c_str(); }
  const char* getMetadataString() noexcept override { return summary_.c_str(); }

  // IPluginV3OneRuntime
  int32_t setTactic(int32_t) noexcept override { return 0; }
  int32_t onShapeChange(const nvinfer1::PluginTensorDesc* in, int32_t nb_in,
                        const nvinfer1::PluginTensorDesc* out, int32_t nb_out) noexcept override;
  int32_t enqueue(const nvinfer1::PluginTensorDesc* input_desc,
                  const nvinfer1::PluginTensorDesc* output_desc, const void* const* inputs,
                  void* const* outputs, void* workspace, cudaStream_t stream) noexcept override;
  nvinfer1::IPluginV3* attachToContext(nvinfer1::IPluginResourceContext*) noexcept override {
    return clone();
  }
  const nvinfer1::PluginFieldCollection* getFieldsToSerialize() noexcept override {
    return fields_.collection();
  }

  const Params& params() const { return params_; }

 private:
  const float* Signs(cudaStream_t stream);  // nullptr on failure (logged)
  void Enqueue(const nvinfer1::PluginTensorDesc* input_desc,
               const nvinfer1::PluginTensorDesc* output_desc, const void* const* inputs,
               void* const* outputs, void* workspace, cudaStream_t stream);

  const Params params_;
  const nvinfer1::TensorRTPhase phase_;
  const SerializedFields fields_;
  const std::string summary_, timing_cache_id_;
  float* signs_ = nullptr;  // device float32 [D], made on the first enqueue when needed
  int signs_device_ = -1;
};

class SawAttentionCreator final : public nvinfer1::IPluginCreatorV3One {
 public:
  SawAttentionCreator();
  nvinfer1::IPluginV3* createPlugin(const char* name, const nvinfer1::PluginFieldCollection* fc,
                                    nvinfer1::TensorRTPhase phase) noexcept override;
  const nvinfer1::PluginFieldCollection* getFieldNames() noexcept override { return &names_; }
  const char* getPluginName() const noexcept override { return kPluginName; }
  const char* getPluginVersion() const noexcept override { return kPluginVersion; }
  const char* getPluginNamespace() const noexcept override { return kPluginNamespace; }

 private:
  std::vector<nvinfer1::PluginField> fields_;
  nvinfer1::PluginFieldCollection names_{};
};

}  // namespace sawtrt
