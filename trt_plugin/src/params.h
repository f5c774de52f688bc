// SawAttention's plugin fields: parsing, validation and the serialized form.
//
// The definition is FIELDS in sawtrt/trt/params.py; this file mirrors it (names, types, order,
// defaults, checks and their messages) and tests/test_trt_plugin_lib.py checks that the two agree
// through the compiled library.
#pragma once
#include <stdint.h>

#include <stdexcept>
#include <string>
#include <vector>

#include <NvInferRuntime.h>

namespace sawtrt {

constexpr char kPluginName[] = "SawAttention";
constexpr char kPluginNamespace[] = "sawtrt";
constexpr char kPluginVersion[] = "1";
constexpr int kNumInputs = 5;   // qkv, pool, block_tables, seq_lens, cu_q_lens
constexpr int kNumOutputs = 1;  // out
constexpr int kMaxGroup = 16;   // Hq / Hkv served from one K/V load

// A field value the plugin cannot honour; what() names the field.
class ParamError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

enum class FieldKind { kInt32, kFloat32, kChar };

struct FieldSpec {
  const char* name;
  FieldKind kind;
  bool required;  // optional fields default to Params' initializers
};

extern const FieldSpec kFields[];
extern const int kNumFields;

// Integer fields are held as int64 so that the checks (and their messages) see the value given;
// ParseFields then requires every one to fit the int32 it is serialized as.
struct Params {
  int64_t num_q_heads = 0;
  int64_t num_kv_heads = 0;
  int64_t head_dim = 0;
  int64_t page_size = 64;
  std::string kv_kind = "int4-bdr";
  int64_t rotation_block = 0;
  int64_t rotate_v = 0;
  int64_t sign_seed = -1;
  int64_t layer_index = 0;
  int64_t max_seq_len = 4096;
  int64_t max_batch = 256;
  std::string dtype = "auto";
  float sm_scale = 0.f;

  // Throws ParamError with the message sawtrt.trt.params.AttentionParams raises.
  void Validate() const;

  bool Rotated() const { return kv_kind == "int4-bdr"; }
  int32_t ResolvedBlock() const;  // 0 when not rotated
  int32_t KindCode() const;       // SawKind
  bool NeedsSigns() const { return Rotated() && sign_seed >= 0; }
  int64_t QkvWidth() const { return int64_t(num_q_heads + 2 * num_kv_heads) * head_dim; }
  int64_t OutWidth() const { return int64_t(num_q_heads) * head_dim; }
  int64_t HeadBlockBytes() const;
  int64_t PageBytes() const { return HeadBlockBytes() * num_kv_heads; }
  float Scale() const;
  std::string Policy() const;  // str(spec.KVPolicy) of the fields
  std::string Summary() const;  // AttentionParams.summary()
};

// Parse a PluginFieldCollection (creator input or deserialized fields). Throws ParamError.
Params ParseFields(const nvinfer1::PluginFieldCollection* fc);

// Every field of a Params as a PluginFieldCollection that owns its data.
class SerializedFields {
 public:
  explicit SerializedFields(const Params& p);
  SerializedFields(const SerializedFields&) = delete;
  SerializedFields& operator=(const SerializedFields&) = delete;
  const nvinfer1::PluginFieldCollection* collection() const { return &fc_; }

 private:
  std::vector<int32_t> ints_;
  std::vector<float> floats_;
  std::vector<std::string> texts_;
  std::vector<nvinfer1::PluginField> fields_;
  nvinfer1::PluginFieldCollection fc_{};
};

// Python's repr() of a float (shortest round trip), and of a float32 (numpy's str()).
std::string ReprDouble(double v);
std::string ReprFloat32(float v);
// spec.KVPolicy.signs: bit 0 of splitmix64(seed * 2^32 + i) picks -1.
void SignsOf(int32_t seed, int32_t head_dim, float* out);

}  // namespace sawtrt
