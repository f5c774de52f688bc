// SawAttention fields: the C++ mirror of sawtrt/trt/params.py (see params.h).
#include "params.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <algorithm>

#include "saw/c_api.h"
#include "saw/layout.cuh"

namespace sawtrt {

using nvinfer1::PluginField;
using nvinfer1::PluginFieldCollection;
using nvinfer1::PluginFieldType;

const FieldSpec kFields[] = {
    {"num_q_heads", FieldKind::kInt32, true},
    {"num_kv_heads", FieldKind::kInt32, true},
    {"head_dim", FieldKind::kInt32, true},
    {"page_size", FieldKind::kInt32, false},
    {"kv_kind", FieldKind::kChar, false},
    {"rotation_block", FieldKind::kInt32, false},
    {"rotate_v", FieldKind::kInt32, false},
    {"sign_seed", FieldKind::kInt32, false},
    {"layer_index", FieldKind::kInt32, false},
    {"max_seq_len", FieldKind::kInt32, false},
    {"max_batch", FieldKind::kInt32, false},
    {"dtype", FieldKind::kChar, false},
    {"sm_scale", FieldKind::kFloat32, false},
};
const int kNumFields = sizeof(kFields) / sizeof(kFields[0]);

namespace {

constexpr int64_t kInt32Max = 2147483647;
constexpr int kMinBlock = 16, kMaxBlock = 256, kDefaultBlock = 128;

std::string Fmt(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
std::string Fmt(const char* fmt, ...) {
  char buf[1024];
  va_list args;
  va_start(args, fmt);
  vsnprintf(buf, sizeof(buf), fmt, args);
  va_end(args);
  return buf;
}

// Python's repr() of an ASCII str.
std::string PyRepr(const std::string& s) {
  const char q = (s.find('\'') != std::string::npos && s.find('"') == std::string::npos) ? '"'
                                                                                          : '\'';
  std::string out(1, q);
  for (unsigned char c : s) {
    if (c == '\\' || c == q) {
      out += '\\';
      out += char(c);
    } else if (c == '\n') {
      out += "\\n";
    } else if (c == '\r') {
      out += "\\r";
    } else if (c == '\t') {
      out += "\\t";
    } else if (c < 0x20 || c >= 0x7f) {
      out += Fmt("\\x%02x", c);
    } else {
      out += char(c);
    }
  }
  return out + q;
}

bool IsPyWhitespace(unsigned char c) {
  return c == ' ' || (c >= '\t' && c <= '\r') || (c >= 0x1c && c <= 0x1f);
}

// Shortest decimal digits that read back as v (as a float32 when `single`), in Python's
// repr layout: positional for exponents -4..15, else d.ddde+XX.
std::string ShortestRepr(double v, bool single) {
  if (isnan(v)) return "nan";
  if (isinf(v)) return v < 0 ? "-inf" : "inf";
  if (v == 0) return signbit(v) ? "-0.0" : "0.0";
  char buf[64];
  for (int prec = 1; prec <= 17; ++prec) {
    snprintf(buf, sizeof(buf), "%.*e", prec - 1, v);
    const double back = strtod(buf, nullptr);
    if (single ? float(back) == float(v) : back == v) break;
  }
  // buf: [-]d[.ddd]e[+-]XX
  std::string s(buf);
  const bool neg = s[0] == '-';
  if (neg) s = s.substr(1);
  const size_t e = s.find('e');
  const int exp = atoi(s.c_str() + e + 1);
  std::string digits;
  for (size_t i = 0; i < e; ++i)
    if (s[i] != '.') digits += s[i];
  while (digits.size() > 1 && digits.back() == '0') digits.pop_back();
  std::string out;
  if (exp >= -4 && exp < 16) {
    if (exp < 0) {
      out = "0." + std::string(-exp - 1, '0') + digits;
    } else if (int(digits.size()) <= exp + 1) {
      out = digits + std::string(exp + 1 - digits.size(), '0') + ".0";
    } else {
      out = digits.substr(0, exp + 1) + "." + digits.substr(exp + 1);
    }
  } else {
    out = digits.substr(0, 1);
    if (digits.size() > 1) out += "." + digits.substr(1);
    out += Fmt("e%c%02d", exp < 0 ? '-' : '+', exp < 0 ? -exp : exp);
  }
  return neg ? "-" + out : out;
}

const char* TypeName(PluginFieldType t) {
  switch (t) {
    case PluginFieldType::kFLOAT16: return "FLOAT16";
    case PluginFieldType::kFLOAT32: return "FLOAT32";
    case PluginFieldType::kFLOAT64: return "FLOAT64";
    case PluginFieldType::kINT8: return "INT8";
    case PluginFieldType::kINT16: return "INT16";
    case PluginFieldType::kINT32: return "INT32";
    case PluginFieldType::kCHAR: return "CHAR";
    case PluginFieldType::kDIMS: return "DIMS";
    case PluginFieldType::kUNKNOWN: return "UNKNOWN";
    case PluginFieldType::kBF16: return "BF16";
    case PluginFieldType::kINT64: return "INT64";
    case PluginFieldType::kFP8: return "FP8";
    case PluginFieldType::kINT4: return "INT4";
    case PluginFieldType::kFP4: return "FP4";
  }
  return "?";
}

struct Number {
  double value;
  bool integral;     // the value is an integer (always so for integer types)
  int64_t integer;   // the value when integral
  std::string text;  // str() of the numpy scalar, for messages
};

Number ReadNumber(const FieldSpec& f, const PluginField& pf) {
  const PluginFieldType t = pf.type;
  const bool numeric = t == PluginFieldType::kINT8 || t == PluginFieldType::kINT16 ||
                       t == PluginFieldType::kINT32 || t == PluginFieldType::kINT64 ||
                       t == PluginFieldType::kFLOAT32 || t == PluginFieldType::kFLOAT64 ||
                       t == PluginFieldType::kCHAR;
  if (!numeric)
    throw ParamError(Fmt("SawAttention: field %s has PluginFieldType %s, expected a number "
                         "(INT32 or FLOAT32)", f.name, TypeName(t)));
  if (pf.length != 1)
    throw ParamError(Fmt("SawAttention: field %s needs exactly 1 value, got %d", f.name,
                         pf.length < 0 ? 0 : pf.length));
  if (pf.data == nullptr) throw ParamError(Fmt("SawAttention: field %s has no data", f.name));
  Number n{};
  switch (t) {
    case PluginFieldType::kINT8:
    case PluginFieldType::kCHAR: n.integer = *static_cast<const int8_t*>(pf.data); break;
    case PluginFieldType::kINT16: n.integer = *static_cast<const int16_t*>(pf.data); break;
    case PluginFieldType::kINT32: n.integer = *static_cast<const int32_t*>(pf.data); break;
    case PluginFieldType::kINT64: n.integer = *static_cast<const int64_t*>(pf.data); break;
    case PluginFieldType::kFLOAT32: {
      const float v = *static_cast<const float*>(pf.data);
      n.value = v;
      n.text = ShortestRepr(v, true);
      break;
    }
    default: {
      const double v = *static_cast<const double*>(pf.data);
      n.value = v;
      n.text = ShortestRepr(v, false);
    }
  }
  if (t == PluginFieldType::kFLOAT32 || t == PluginFieldType::kFLOAT64) {
    n.integral = isfinite(n.value) && n.value == floor(n.value) && fabs(n.value) < 9.2e18;
    if (n.integral) n.integer = int64_t(n.value);
  } else {
    n.integral = true;
    n.value = double(n.integer);
    n.text = std::to_string(n.integer);
  }
  return n;
}

std::string ReadText(const FieldSpec& f, const PluginField& pf) {
  if (pf.type != PluginFieldType::kCHAR && pf.type != PluginFieldType::kINT8)
    throw ParamError(Fmt("SawAttention: field %s has PluginFieldType %s, expected CHAR text",
                         f.name, TypeName(pf.type)));
  const int n = std::max(pf.length, 0);
  if (n > 0 && pf.data == nullptr) throw ParamError(Fmt("SawAttention: field %s has no data",
                                                        f.name));
  std::string raw(static_cast<const char*>(pf.data), n);
  raw = raw.substr(0, raw.find('\0'));
  for (unsigned char c : raw)
    if (c >= 0x80) throw ParamError(Fmt("SawAttention: field %s is not ASCII text", f.name));
  size_t b = 0, e = raw.size();
  while (b < e && IsPyWhitespace(raw[b])) ++b;
  while (e > b && IsPyWhitespace(raw[e - 1])) --e;
  return raw.substr(b, e - b);
}

int64_t* IntSlot(Params& p, const std::string& name) {
  if (name == "num_q_heads") return &p.num_q_heads;
  if (name == "num_kv_heads") return &p.num_kv_heads;
  if (name == "head_dim") return &p.head_dim;
  if (name == "page_size") return &p.page_size;
  if (name == "rotation_block") return &p.rotation_block;
  if (name == "rotate_v") return &p.rotate_v;
  if (name == "sign_seed") return &p.sign_seed;
  if (name == "layer_index") return &p.layer_index;
  if (name == "max_seq_len") return &p.max_seq_len;
  if (name == "max_batch") return &p.max_batch;
  return nullptr;
}

std::string* TextSlot(Params& p, const std::string& name) {
  if (name == "kv_kind") return &p.kv_kind;
  if (name == "dtype") return &p.dtype;
  return nullptr;
}

// The KV policy and page-layout checks of spec.KVPolicy / spec.PageLayout / hadamard.check_block
// for these fields; returns the error text (empty when fine).
std::string PolicyProblem(const Params& p) {
  static const char* kKinds[] = {"bf16", "int8", "int4", "int4-bdr"};
  if (std::find_if(std::begin(kKinds), std::end(kKinds),
                   [&](const char* k) { return p.kv_kind == k; }) == std::end(kKinds))
    return "unknown KV policy " + PyRepr(p.kv_kind) + "; choose one of bf16, int8, int4, int4-bdr";
  if (!p.Rotated() && (p.rotation_block != 0 || p.rotate_v || p.sign_seed >= 0))
    return "policy " + p.kv_kind + " takes no rotation options";
  const int64_t b = p.rotation_block;
  if (b != 0 && (b < kMinBlock || b > kMaxBlock || (b & (b - 1))))
    return Fmt("rotation block h=%lld must be a power of two in [16, 256]", (long long)b);
  if (p.Rotated()) {
    const int64_t block = p.ResolvedBlock();
    if (block < kMinBlock || block > kMaxBlock || (block & (block - 1)))
      return Fmt("rotation block h=%lld must be a power of two in [%d, %d]", (long long)block,
                 kMinBlock, kMaxBlock);
    if (p.head_dim % block)
      return Fmt("rotation block h=%lld does not divide head_dim D=%lld", (long long)block,
                 (long long)p.head_dim);
  }
  return "";
}

}  // namespace

std::string ReprDouble(double v) { return ShortestRepr(v, false); }
std::string ReprFloat32(float v) { return ShortestRepr(v, true); }

void SignsOf(int32_t seed, int32_t head_dim, float* out) {
  for (int32_t i = 0; i < head_dim; ++i) {
    uint64_t x = (uint64_t(uint32_t(seed)) << 32) + uint64_t(i);
    x += 0x9E3779B97F4A7C15ull;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
    x ^= x >> 31;
    out[i] = (x & 1) ? -1.f : 1.f;
  }
}

int32_t Params::ResolvedBlock() const {
  if (!Rotated()) return 0;
  return int32_t(rotation_block ? rotation_block : std::min<int64_t>(kDefaultBlock, head_dim));
}

int32_t Params::KindCode() const {
  if (kv_kind == "bf16") return SAW_KIND_BF16;
  if (kv_kind == "int8") return SAW_KIND_INT8;
  return SAW_KIND_INT4;
}

int64_t Params::HeadBlockBytes() const {
  return saw::PageLayout(KindCode(), int(head_dim), int(page_size)).head_block_bytes;
}

float Params::Scale() const {
  return sm_scale != 0.f ? sm_scale : float(1.0 / sqrt(double(head_dim)));
}

std::string Params::Policy() const {
  std::string opts;
  auto add = [&](const std::string& o) { opts += (opts.empty() ? "" : ",") + o; };
  if (rotation_block) add("h=" + std::to_string(rotation_block));
  if (rotate_v) add("kv");
  if (sign_seed >= 0) add("seed=" + std::to_string(sign_seed));
  return kv_kind + (opts.empty() ? "" : ":" + opts);
}

std::string Params::Summary() const {
  return Fmt("SawAttention(layer=%lld, Hq=%lld, Hkv=%lld, D=%lld, page=%lld, kv=%s, dtype=%s)",
             (long long)layer_index, (long long)num_q_heads, (long long)num_kv_heads,
             (long long)head_dim, (long long)page_size, Policy().c_str(), dtype.c_str());
}

void Params::Validate() const {
  const int64_t hq = num_q_heads, hkv = num_kv_heads, d = head_dim;
  if (hq < 1 || hkv < 1)
    throw ParamError(Fmt("SawAttention: num_q_heads=%lld and num_kv_heads=%lld must be >= 1",
                         (long long)hq, (long long)hkv));
  if (hq % hkv)
    throw ParamError(Fmt("SawAttention: num_q_heads=%lld is not a multiple of num_kv_heads=%lld",
                         (long long)hq, (long long)hkv));
  if (hq / hkv > kMaxGroup)
    throw ParamError(Fmt("SawAttention: GQA group %lld > %d (num_q_heads / num_kv_heads) has no "
                         "kernel instantiation", (long long)(hq / hkv), kMaxGroup));
  if (d != 64 && d != 128 && d != 256)
    throw ParamError(Fmt("SawAttention: head_dim=%lld not in (64, 128, 256)", (long long)d));
  if (page_size != 16 && page_size != 32 && page_size != 64 && page_size != 128)
    throw ParamError(Fmt("SawAttention: page_size=%lld not in (16, 32, 64, 128)", (long long)page_size));
  if (rotate_v != 0 && rotate_v != 1)
    throw ParamError(Fmt("SawAttention: rotate_v=%lld must be 0 or 1", (long long)rotate_v));
  if (sign_seed < -1 || sign_seed > kInt32Max)
    throw ParamError(Fmt("SawAttention: sign_seed=%lld must be -1 (none) or in [0, %lld]",
                         (long long)sign_seed, (long long)kInt32Max));
  if (rotation_block < 0)
    throw ParamError(Fmt("SawAttention: rotation_block=%lld < 0", (long long)rotation_block));
  if (layer_index < 0)
    throw ParamError(Fmt("SawAttention: layer_index=%lld < 0", (long long)layer_index));
  if (max_seq_len < 1)
    throw ParamError(Fmt("SawAttention: max_seq_len=%lld must be >= 1", (long long)max_seq_len));
  if (max_batch < 1)
    throw ParamError(Fmt("SawAttention: max_batch=%lld must be >= 1", (long long)max_batch));
  if (dtype != "auto" && dtype != "fp16" && dtype != "bf16")
    throw ParamError("SawAttention: dtype=" + PyRepr(dtype) + " not in ('auto', 'fp16', 'bf16')");
  if (!(isfinite(sm_scale) && sm_scale >= 0))
    throw ParamError("SawAttention: sm_scale=" + ShortestRepr(sm_scale, false) +
                     " must be finite and >= 0 (0 = 1/sqrt(D))");
  const std::string why = PolicyProblem(*this);
  if (!why.empty()) throw ParamError("SawAttention: bad KV policy fields: " + why);
}

Params ParseFields(const PluginFieldCollection* fc) {
  Params p;
  std::vector<std::string> seen;
  const int n = fc ? fc->nbFields : 0;
  if (n > 0 && fc->fields == nullptr)
    throw ParamError("SawAttention: PluginFieldCollection has fields but no array");
  for (int i = 0; i < n; ++i) {
    const PluginField& pf = fc->fields[i];
    const std::string name = pf.name ? pf.name : "";
    const FieldSpec* f = nullptr;
    for (int k = 0; k < kNumFields; ++k)
      if (name == kFields[k].name) f = &kFields[k];
    if (f == nullptr) {
      std::string known;
      for (int k = 0; k < kNumFields; ++k) known += (k ? ", " : "") + std::string(kFields[k].name);
      throw ParamError("SawAttention: unknown field " + PyRepr(name) + "; known fields: " + known);
    }
    if (std::find(seen.begin(), seen.end(), name) != seen.end())
      throw ParamError("SawAttention: field " + PyRepr(name) + " given twice");
    seen.push_back(name);
    if (f->kind == FieldKind::kChar) {
      *TextSlot(p, name) = ReadText(*f, pf);
      continue;
    }
    const Number v = ReadNumber(*f, pf);
    if (f->kind == FieldKind::kFloat32) {
      p.sm_scale = float(v.value);
      continue;
    }
    if (!v.integral)
      throw ParamError(Fmt("SawAttention: field %s=%s is not an integer", f->name, v.text.c_str()));
    *IntSlot(p, name) = v.integer;
  }
  std::string missing;
  for (int k = 0; k < kNumFields; ++k)
    if (kFields[k].required && std::find(seen.begin(), seen.end(), kFields[k].name) == seen.end())
      missing += (missing.empty() ? "" : ", ") + PyRepr(kFields[k].name);
  if (!missing.empty())
    throw ParamError("SawAttention: missing required field(s) [" + missing + "]");
  p.Validate();
  // The Python plugin's checks leave some int32 fields unbounded; the serialized form is int32.
  for (int k = 0; k < kNumFields; ++k) {
    if (kFields[k].kind != FieldKind::kInt32) continue;
    const int64_t v = *IntSlot(p, kFields[k].name);
    if (v > kInt32Max || v < -kInt32Max - 1)
      throw ParamError(Fmt("SawAttention: field %s=%lld does not fit in int32", kFields[k].name,
                           (long long)v));
  }
  return p;
}

SerializedFields::SerializedFields(const Params& p) {
  Params copy = p;
  ints_.reserve(kNumFields);
  floats_.reserve(kNumFields);
  texts_.reserve(kNumFields);
  for (int k = 0; k < kNumFields; ++k) {
    const FieldSpec& f = kFields[k];
    if (f.kind == FieldKind::kChar) {
      texts_.push_back(*TextSlot(copy, f.name));
      fields_.emplace_back(f.name, texts_.back().data(), PluginFieldType::kCHAR,
                           int32_t(texts_.back().size()));
    } else if (f.kind == FieldKind::kFloat32) {
      floats_.push_back(copy.sm_scale);
      fields_.emplace_back(f.name, &floats_.back(), PluginFieldType::kFLOAT32, 1);
    } else {
      ints_.push_back(int32_t(*IntSlot(copy, f.name)));
      fields_.emplace_back(f.name, &ints_.back(), PluginFieldType::kINT32, 1);
    }
  }
  fc_.nbFields = int32_t(fields_.size());
  fc_.fields = fields_.data();
}

}  // namespace sawtrt
