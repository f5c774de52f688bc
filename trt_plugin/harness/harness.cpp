// Drives libsawtrt_trt_plugin.so the way a TensorRT process does, without libnvinfer: dlopen,
// setLoggerFinder, getCreators, createPlugin from a PluginFieldCollection, the build and runtime
// interfaces through getCapabilityInterface, a minimal IExprBuilder for getOutputShapes.
//
//   harness PLUGIN.so < commands        (one command per line, one answer line each)
//
// Built with -DHARNESS_LIBRARY -shared it is a library instead (harness_open / harness_call /
// harness_enqueue), which the GPU test loads into its own process so that enqueue gets real
// device buffers made by torch.
//
// tests/test_trt_plugin_lib.py compiles it, sends commands and compares the answers with the
// Python plugin's functions. Commands (TENSOR = TYPE@d0,d1[@max0,max1], '?' = unknown dim):
//   identity | field_names | create PHASE NAME=K:V... | serialize | roundtrip | clone
//   formats POS NB_IN TYPE:FORMAT... | outtypes TYPE... | shapes DIMS;DIMS;...
//   configure TENSOR x6 | workspace TENSOR x6 | shapechange TENSOR x6 | enqueue TENSOR x6
//   timing | meta | signs SEED D
// Field values K:V: i int32 list, I int64, f float32 list, d float64, b int8 list, c text
// (%XX escapes), t TYPE=n (n bytes of a PluginFieldType) for type errors.
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <iostream>
#include <limits>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include <NvInferRuntime.h>

using namespace nvinfer1;

namespace {

std::vector<std::string> Split(const std::string& s, char sep) {
  std::vector<std::string> out;
  std::string cur;
  std::istringstream in(s);
  while (std::getline(in, cur, sep)) out.push_back(cur);
  if (!s.empty() && s.back() == sep) out.push_back("");
  return out;
}

// -- logger ---------------------------------------------------------------------------------
struct CaptureLogger : ILogger {
  std::string last;
  void log(Severity severity, const char* msg) noexcept override {
    if (severity <= Severity::kWARNING) last = msg;
  }
};
struct Finder : ILoggerFinder {
  CaptureLogger logger;
  ILogger* findLogger() override { return &logger; }
};

// -- a minimal IExprBuilder -------------------------------------------------------------------
struct ExprImpl : apiv::VDimensionExpr {
  bool constant;
  int64_t value;
  bool isConstant() const override { return constant; }
  int64_t getConstantValue() const override {
    return constant ? value : std::numeric_limits<int64_t>::min();
  }
  bool isSizeTensor() const override { return false; }
};
struct Expr : IDimensionExpr {
  ExprImpl impl;
  Expr(bool constant, int64_t value) : impl{} {
    impl.constant = constant;
    impl.value = value;
    mImpl = &impl;
  }
  ~Expr() noexcept override = default;
};
struct BuilderImpl : apiv::VExprBuilder {
  std::vector<std::unique_ptr<Expr>> pool;
  const IDimensionExpr* Make(bool c, int64_t v) {
    pool.push_back(std::make_unique<Expr>(c, v));
    return pool.back().get();
  }
  const IDimensionExpr* constant(int64_t v) override { return Make(true, v); }
  const IDimensionExpr* operation(DimensionOperation op, const IDimensionExpr& a,
                                  const IDimensionExpr& b) override {
    if (!a.isConstant() || !b.isConstant()) return Make(false, 0);
    const int64_t x = a.getConstantValue(), y = b.getConstantValue();
    switch (op) {
      case DimensionOperation::kSUM: return Make(true, x + y);
      case DimensionOperation::kPROD: return Make(true, x * y);
      case DimensionOperation::kSUB: return Make(true, x - y);
      default: return Make(false, 0);
    }
  }
  const IDimensionExpr* declareSizeTensor(int32_t, const IDimensionExpr&,
                                          const IDimensionExpr&) override {
    return nullptr;
  }
};
struct ExprBuilder : IExprBuilder {
  BuilderImpl impl;
  ExprBuilder() { mImpl = &impl; }
  ~ExprBuilder() noexcept override = default;
};

// -- names ------------------------------------------------------------------------------------
const char* const kTypeNames[] = {"FLOAT", "HALF", "INT8", "INT32", "BOOL", "UINT8",
                                  "FP8", "BF16", "INT64", "INT4", "FP4", "E8M0"};
DataType ParseType(const std::string& s) {
  for (int i = 0; i < 12; ++i)
    if (s == kTypeNames[i]) return DataType(i);
  throw std::runtime_error("bad type " + s);
}
const char* TypeName(DataType t) { return kTypeNames[int(t)]; }
TensorFormat ParseFormat(const std::string& s) {
  if (s == "LINEAR") return TensorFormat::kLINEAR;
  if (s == "CHW2") return TensorFormat::kCHW2;
  if (s == "HWC8") return TensorFormat::kHWC8;
  if (s == "CHW32") return TensorFormat::kCHW32;
  throw std::runtime_error("bad format " + s);
}
const char* const kFieldTypeNames[] = {"FLOAT16", "FLOAT32", "FLOAT64", "INT8", "INT16",
                                       "INT32", "CHAR", "DIMS", "UNKNOWN", "BF16",
                                       "INT64", "FP8", "INT4", "FP4"};

Dims ParseDims(const std::string& s) {
  Dims d{};
  if (s.empty()) return d;
  for (const std::string& x : Split(s, ',')) d.d[d.nbDims++] = x == "?" ? -1 : atoll(x.c_str());
  return d;
}
struct Tensor {
  DynamicPluginTensorDesc dyn{};
};
Tensor ParseTensor(const std::string& tok) {
  const auto parts = Split(tok, '@');
  Tensor t;
  t.dyn.desc.type = ParseType(parts.at(0));
  t.dyn.desc.format = TensorFormat::kLINEAR;
  t.dyn.desc.dims = ParseDims(parts.size() > 1 ? parts[1] : "");
  t.dyn.max = parts.size() > 2 ? ParseDims(parts[2]) : t.dyn.desc.dims;
  t.dyn.min = t.dyn.opt = t.dyn.max;
  return t;
}

std::string Unescape(const std::string& s) {
  std::string out;
  for (size_t i = 0; i < s.size(); ++i) {
    if (s[i] == '%' && i + 2 < s.size()) {
      out += char(strtol(s.substr(i + 1, 2).c_str(), nullptr, 16));
      i += 2;
    } else {
      out += s[i];
    }
  }
  return out;
}

// Owns the storage of one PluginFieldCollection built from NAME=K:V tokens.
struct Fields {
  std::vector<std::string> names;
  std::vector<std::vector<char>> data;
  std::vector<PluginField> fields;
  PluginFieldCollection fc{};
  explicit Fields(const std::vector<std::string>& toks) {
    struct Item { std::string name; std::vector<char> bytes; PluginFieldType type; int32_t n; };
    std::vector<Item> items;
    for (const std::string& tok : toks) {
      const size_t eq = tok.find('='), colon = tok.find(':', eq);
      Item it{tok.substr(0, eq), {}, PluginFieldType::kUNKNOWN, 0};
      const char k = tok[eq + 1];
      const std::string v = tok.substr(colon + 1);
      auto push = [&](const void* p, size_t n) {
        it.bytes.insert(it.bytes.end(), (const char*)p, (const char*)p + n);
      };
      if (k == 'c') {
        const std::string text = Unescape(v);
        push(text.data(), text.size());
        it.type = PluginFieldType::kCHAR;
        it.n = int32_t(text.size());
      } else if (k == 't') {  // t:TYPE=n
        const auto tv = Split(v, '=');
        for (int i = 0; i < 14; ++i)
          if (tv[0] == kFieldTypeNames[i]) it.type = PluginFieldType(i);
        it.n = atoi(tv[1].c_str());
        it.bytes.assign(64, 0);
      } else {
        for (const std::string& x : v.empty() ? std::vector<std::string>{} : Split(v, ',')) {
          if (k == 'i') { int32_t y = int32_t(atoll(x.c_str())); push(&y, 4); it.type = PluginFieldType::kINT32; }
          if (k == 'I') { int64_t y = atoll(x.c_str()); push(&y, 8); it.type = PluginFieldType::kINT64; }
          if (k == 'b') { int8_t y = int8_t(atoi(x.c_str())); push(&y, 1); it.type = PluginFieldType::kINT8; }
          if (k == 'f') { float y = strtof(x.c_str(), nullptr); push(&y, 4); it.type = PluginFieldType::kFLOAT32; }
          if (k == 'd') { double y = strtod(x.c_str(), nullptr); push(&y, 8); it.type = PluginFieldType::kFLOAT64; }
          ++it.n;
        }
        if (it.type == PluginFieldType::kUNKNOWN)
          it.type = k == 'f' ? PluginFieldType::kFLOAT32 : PluginFieldType::kINT32;
      }
      items.push_back(it);
    }
    names.reserve(items.size());
    data.reserve(items.size());
    for (auto& it : items) {
      names.push_back(it.name);
      data.push_back(it.bytes);
      fields.emplace_back(names.back().c_str(), data.back().empty() ? nullptr : data.back().data(),
                          it.type, it.n);
    }
    fc.nbFields = int32_t(fields.size());
    fc.fields = fields.data();
  }
};

std::string FieldsText(const PluginFieldCollection* fc) {
  std::string s;
  for (int i = 0; i < fc->nbFields; ++i) {
    const PluginField& f = fc->fields[i];
    s += (i ? ";" : "") + std::string(f.name) + "=" + kFieldTypeNames[int(f.type)] + ":";
    char buf[64];
    if (f.type == PluginFieldType::kCHAR) {
      s += std::string(static_cast<const char*>(f.data), f.length);
    } else if (f.type == PluginFieldType::kINT32) {
      for (int k = 0; k < f.length; ++k)
        s += (k ? "," : "") + std::to_string(static_cast<const int32_t*>(f.data)[k]);
    } else if (f.type == PluginFieldType::kFLOAT32) {
      for (int k = 0; k < f.length; ++k) {
        snprintf(buf, sizeof(buf), "%.9g", static_cast<const float*>(f.data)[k]);
        s += (k ? "," : "") + std::string(buf);
      }
    } else {
      s += "?" + std::to_string(f.length);
    }
  }
  return s;
}

struct Plugin {
  IPluginV3* v3 = nullptr;
  IPluginV3OneCore* core = nullptr;
  IPluginV3OneBuild* build = nullptr;
  IPluginV3OneRuntime* runtime = nullptr;
  explicit Plugin(IPluginV3* p) : v3(p) {
    if (!p) return;
    core = static_cast<IPluginV3OneCore*>(p->getCapabilityInterface(PluginCapabilityType::kCORE));
    build = static_cast<IPluginV3OneBuild*>(p->getCapabilityInterface(PluginCapabilityType::kBUILD));
    runtime = static_cast<IPluginV3OneRuntime*>(
        p->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
  }
  ~Plugin() { delete v3; }
};

struct Harness {
  void* lib = nullptr;
  Finder finder;
  int32_t nb = 0;
  IPluginCreatorInterface* const* creators = nullptr;
  IPluginCreatorV3One* creator = nullptr;
  void (*signs)(int32_t, int32_t, float*) = nullptr;
  std::unique_ptr<Plugin> cur;
  std::string answer;
};
Harness* g = nullptr;

std::string Open(const char* path) {
  delete g;
  g = new Harness;
  // A library the process has loaded before the plugin (a stand-in libnvinfer).
  if (const char* pre = getenv("HARNESS_PRELOAD"); pre && *pre && !dlopen(pre, RTLD_NOW))
    return std::string("error preload: ") + dlerror();
  g->lib = dlopen(path, RTLD_NOW | RTLD_LOCAL);
  if (!g->lib) return std::string("error dlopen: ") + dlerror();
  using GetCreators = IPluginCreatorInterface* const* (*)(int32_t&);
  using SetFinder = void (*)(ILoggerFinder*);
  auto get_creators = reinterpret_cast<GetCreators>(dlsym(g->lib, "getCreators"));
  auto set_finder = reinterpret_cast<SetFinder>(dlsym(g->lib, "setLoggerFinder"));
  g->signs = reinterpret_cast<void (*)(int32_t, int32_t, float*)>(
      dlsym(g->lib, "sawtrt_plugin_signs"));
  if (!get_creators || !set_finder) return "error: getCreators/setLoggerFinder not exported";
  set_finder(&g->finder);
  g->creators = get_creators(g->nb);
  g->creator = g->nb > 0 ? dynamic_cast<IPluginCreatorV3One*>(g->creators[0]) : nullptr;
  if (g->nb > 0 && !g->creator) return "error: creator 0 is not an IPluginCreatorV3One";
  return "ok";
}

// Device addresses for enqueue (GPU test); null: fake addresses (the recording kernels).
struct Pointers {
  const uint64_t* inputs;
  uint64_t output, workspace, stream;
};

std::string Run(const std::string& line, const Pointers* ptrs) {
  auto& finder = g->finder;
  auto* creator = g->creator;
  auto& cur = g->cur;
  std::istringstream in(line);
  std::string cmd;
  in >> cmd;
  std::vector<std::string> args;
  for (std::string a; in >> a;) args.push_back(a);
  finder.logger.last.clear();
  std::string answer;
  try {
    if (cmd == "identity" && g->nb == 0) {
      answer = "creators=0";
    } else if (!creator && cmd != "signs") {
      answer = "error no creator";
    } else if (cmd == "identity") {
      const InterfaceInfo info = g->creators[0]->getInterfaceInfo();
      answer = "creators=" + std::to_string(g->nb) + " name=" + creator->getPluginName() +
               " version=" + creator->getPluginVersion() + " namespace=" +
               creator->getPluginNamespace() + " interface=" + info.kind + "/" +
               std::to_string(info.major) + "." + std::to_string(info.minor);
    } else if (cmd == "field_names") {
      const PluginFieldCollection* fc = creator->getFieldNames();
      for (int i = 0; i < fc->nbFields; ++i)
        answer += (i ? " " : "") + std::string(fc->fields[i].name) + ":" +
                  kFieldTypeNames[int(fc->fields[i].type)] + ":" +
                  std::to_string(fc->fields[i].length);
    } else if (cmd == "create") {
      const TensorRTPhase phase = args.at(0) == "RUNTIME" ? TensorRTPhase::kRUNTIME
                                                          : TensorRTPhase::kBUILD;
      Fields f(std::vector<std::string>(args.begin() + 1, args.end()));
      IPluginV3* p = creator->createPlugin("SawAttention", &f.fc, phase);
      if (p == nullptr) {
        answer = "error " + finder.logger.last;
      } else {
        cur = std::make_unique<Plugin>(p);
        const bool ok = cur->core && cur->build && cur->runtime &&
                        std::string(cur->core->getPluginName()) == "SawAttention" &&
                        std::string(cur->core->getPluginNamespace()) == "sawtrt" &&
                        std::string(cur->core->getPluginVersion()) == "1" &&
                        cur->build->getNbOutputs() == 1;
        answer = ok ? "ok" : "error capability interfaces or identity wrong";
      }
    } else if (cmd == "serialize") {
      answer = FieldsText(cur->runtime->getFieldsToSerialize());
    } else if (cmd == "roundtrip") {
      const std::string before = FieldsText(cur->runtime->getFieldsToSerialize());
      Plugin again(creator->createPlugin("SawAttention", cur->runtime->getFieldsToSerialize(),
                                         TensorRTPhase::kRUNTIME));
      if (!again.v3) throw std::runtime_error("re-create failed: " + finder.logger.last);
      const std::string after = FieldsText(again.runtime->getFieldsToSerialize());
      answer = before == after ? "same " + after : "differ " + before + " | " + after;
    } else if (cmd == "clone") {
      Plugin a(cur->v3->clone());
      Plugin b(cur->runtime->attachToContext(nullptr));
      const std::string s0 = FieldsText(cur->runtime->getFieldsToSerialize());
      const bool same = a.v3 && b.v3 && a.v3 != cur->v3 && b.v3 != cur->v3 &&
                        FieldsText(a.runtime->getFieldsToSerialize()) == s0 &&
                        FieldsText(b.runtime->getFieldsToSerialize()) == s0;
      answer = same ? "same" : "differ";
    } else if (cmd == "formats") {
      const int pos = atoi(args.at(0).c_str()), nb_in = atoi(args.at(1).c_str());
      std::vector<DynamicPluginTensorDesc> descs;
      for (size_t i = 2; i < args.size(); ++i) {
        const auto tf = Split(args[i], ':');
        DynamicPluginTensorDesc d{};
        d.desc.type = ParseType(tf.at(0));
        d.desc.format = ParseFormat(tf.at(1));
        descs.push_back(d);
      }
      const int nb_out = int(descs.size()) - nb_in;
      answer = cur->build->supportsFormatCombination(pos, descs.data(), nb_in, nb_out) ? "1"
                                                                                        : "0";
    } else if (cmd == "outtypes") {
      std::vector<DataType> in;
      for (auto& a : args) in.push_back(ParseType(a));
      DataType out = DataType::kFLOAT;
      const int rc = cur->build->getOutputDataTypes(&out, 1, in.data(), int32_t(in.size()));
      answer = rc == 0 ? std::string("ok ") + TypeName(out) : "error " + finder.logger.last;
    } else if (cmd == "shapes") {
      ExprBuilder eb;
      std::vector<DimsExprs> in;
      for (const std::string& t : Split(args.at(0), ';')) {
        DimsExprs e{};
        for (const std::string& x : t.empty() ? std::vector<std::string>{} : Split(t, ','))
          e.d[e.nbDims++] = x == "?" ? eb.impl.Make(false, 0) : eb.constant(atoll(x.c_str()));
        in.push_back(e);
      }
      DimsExprs out{};
      const int rc = cur->build->getOutputShapes(in.data(), int32_t(in.size()), nullptr, 0,
                                                 &out, 1, eb);
      if (rc != 0) {
        answer = "error " + finder.logger.last;
      } else {
        answer = "ok [";
        for (int i = 0; i < out.nbDims; ++i) {
          const bool same_as_tokens = in.size() && out.d[i] == in[0].d[0];
          answer += (i ? ", " : "") +
                    (same_as_tokens ? std::string("qkv[0]")
                     : out.d[i]->isConstant() ? std::to_string(out.d[i]->getConstantValue())
                                              : std::string("?"));
        }
        answer += "]";
      }
    } else if (cmd == "configure" || cmd == "workspace" || cmd == "shapechange" ||
               cmd == "enqueue") {
      std::vector<Tensor> ts;
      for (auto& a : args) ts.push_back(ParseTensor(a));
      const int nb_out = 1, nb_in = int(ts.size()) - nb_out;
      std::vector<DynamicPluginTensorDesc> dyn;
      std::vector<PluginTensorDesc> plain;
      for (auto& t : ts) {
        dyn.push_back(t.dyn);
        plain.push_back(t.dyn.desc);
      }
      if (cmd == "configure") {
        const int rc = cur->build->configurePlugin(dyn.data(), nb_in, dyn.data() + nb_in, nb_out);
        answer = rc == 0 ? "ok" : "error " + finder.logger.last;
      } else if (cmd == "workspace") {
        const size_t ws = cur->build->getWorkspaceSize(dyn.data(), nb_in, dyn.data() + nb_in,
                                                       nb_out);
        answer = finder.logger.last.empty() ? "ok " + std::to_string(ws)
                                            : "error " + finder.logger.last;
      } else if (cmd == "shapechange") {
        const int rc = cur->runtime->onShapeChange(plain.data(), nb_in, plain.data() + nb_in,
                                                   nb_out);
        answer = rc == 0 ? "ok" : "error " + finder.logger.last;
      } else {
        // Fake addresses: the recording kernel library only reports them.
        // Fake addresses unless the caller gave device buffers: the recording kernels only
        // report them.
        std::vector<const void*> in_ptrs;
        for (int i = 0; i < nb_in; ++i)
          in_ptrs.push_back(reinterpret_cast<void*>(ptrs ? ptrs->inputs[i] : 0x1000 * (i + 1)));
        void* out_ptr = reinterpret_cast<void*>(ptrs ? ptrs->output : 0x9000);
        const int rc = cur->runtime->enqueue(
            plain.data(), plain.data() + nb_in, in_ptrs.data(), &out_ptr,
            reinterpret_cast<void*>(ptrs ? ptrs->workspace : 0xA000),
            reinterpret_cast<cudaStream_t>(ptrs ? ptrs->stream : 0xB000));
        answer = rc == 0 ? "ok" : "error " + finder.logger.last;
      }
    } else if (cmd == "timing") {
      answer = cur->build->getTimingCacheID();
    } else if (cmd == "meta") {
      answer = cur->build->getMetadataString();
    } else if (cmd == "signs") {
      std::vector<float> out(atoi(args.at(1).c_str()));
      g->signs(atoi(args.at(0).c_str()), int32_t(out.size()), out.data());
      for (size_t i = 0; i < out.size(); ++i) answer += (i ? "," : "") + std::to_string(int(out[i]));
    } else {
      answer = "error unknown command " + cmd;
    }
  } catch (const std::exception& e) {
    answer = std::string("error harness: ") + e.what();
  }
  return answer;
}

}  // namespace

#ifdef HARNESS_LIBRARY
extern "C" __attribute__((visibility("default"))) const char* harness_open(const char* path) {
  static std::string answer;
  answer = Open(path);
  return answer.c_str();
}
extern "C" __attribute__((visibility("default"))) const char* harness_call(const char* line) {
  g->answer = Run(line, nullptr);
  return g->answer.c_str();
}
extern "C" __attribute__((visibility("default"))) const char* harness_enqueue(
    const char* tensors, const uint64_t* inputs, uint64_t output, uint64_t workspace,
    uint64_t stream) {
  const Pointers p{inputs, output, workspace, stream};
  g->answer = Run(std::string("enqueue ") + tensors, &p);
  return g->answer.c_str();
}
#else
int main(int argc, char** argv) {
  if (argc < 2) {
    fprintf(stderr, "usage: harness PLUGIN.so < commands\n");
    return 2;
  }
  const std::string opened = Open(argv[1]);
  if (opened != "ok") {
    printf("%s\n", opened.c_str());
    return 1;
  }
  std::string line;
  while (std::getline(std::cin, line)) {
    printf("%s\n", Run(line, nullptr).c_str());
    fflush(stdout);
  }
  g->cur.reset();
  return 0;
}
#endif
