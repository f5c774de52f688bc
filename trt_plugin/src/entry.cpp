// The dynamic plugin-library entry points that IPluginRegistry::loadLibrary,
// `trtexec --dynamicPlugins` and the Python `load_library` look up. The library links no
// libnvinfer: TensorRT hands it a logger through setLoggerFinder and takes its creators from
// getCreators. (getPluginCreators is the IPluginV2 entry point; a V3-only library does not define
// it.)
//
// Processes that only dlopen a plugin library (Triton's TensorRT backend, `plugins=`) never ask
// for getCreators. For them, SAWTRT_TRT_PLUGIN_SELF_REGISTER=1 makes the library register its
// creator on load with the registry of the libnvinfer already loaded in the process, provided that
// libnvinfer has the major version of the headers the library was built with (the registry's
// virtual table differs between majors). getCreators then offers nothing, so a later
// loadLibrary does not meet a duplicate.
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <atomic>
#include <string>

#include "logging.h"
#include "params.h"
#include "saw_attention.h"

#define SAWTRT_EXPORT extern "C" __attribute__((visibility("default")))
#define SAWTRT_STR2(x) #x
#define SAWTRT_STR(x) SAWTRT_STR2(x)

namespace sawtrt {
namespace {
std::atomic<nvinfer1::ILoggerFinder*> g_finder{nullptr};
std::atomic<bool> g_self_registered{false};

SawAttentionCreator& Creator() {
  static SawAttentionCreator creator;
  return creator;
}

void SelfRegister() {
  const char* env = getenv("SAWTRT_TRT_PLUGIN_SELF_REGISTER");
  if (env == nullptr || strcmp(env, "1") != 0) return;
  void* nvinfer = nullptr;
  for (const char* name : {"libnvinfer.so." SAWTRT_STR(NV_TENSORRT_MAJOR), "libnvinfer.so"}) {
    nvinfer = dlopen(name, RTLD_LAZY | RTLD_NOLOAD);
    if (nvinfer != nullptr) break;
  }
  if (nvinfer == nullptr) {
    Log(nvinfer1::ILogger::Severity::kWARNING,
        "sawtrt::SawAttention: SAWTRT_TRT_PLUGIN_SELF_REGISTER=1 but no libnvinfer is loaded in "
        "this process; load the library with IPluginRegistry::loadLibrary instead");
    return;
  }
  using Version = int32_t (*)();
  using Registry = nvinfer1::IPluginRegistry* (*)();
  auto version = reinterpret_cast<Version>(dlsym(nvinfer, "getInferLibVersion"));
  auto registry = reinterpret_cast<Registry>(dlsym(nvinfer, "getPluginRegistry"));
  const int32_t v = version ? version() : 0;
  if (registry == nullptr || v / 10000 != NV_TENSORRT_MAJOR) {
    Log(nvinfer1::ILogger::Severity::kERROR,
        "sawtrt::SawAttention: not self-registering: the process's libnvinfer is version " +
            std::to_string(v) + ", the library was built with TensorRT " +
            SAWTRT_STR(NV_TENSORRT_MAJOR) " headers (rebuild it against the process's headers)");
    return;
  }
  nvinfer1::IPluginRegistry* reg = registry();
  if (reg != nullptr && reg->registerCreator(Creator(), kPluginNamespace)) {
    g_self_registered.store(true);
  } else {
    Log(nvinfer1::ILogger::Severity::kERROR,
        "sawtrt::SawAttention: the plugin registry refused the creator (already registered?)");
  }
}

__attribute__((constructor)) void OnLoad() { SelfRegister(); }
}  // namespace

void SetLoggerFinder(nvinfer1::ILoggerFinder* finder) { g_finder.store(finder); }

void Log(nvinfer1::ILogger::Severity severity, const std::string& message) {
  nvinfer1::ILoggerFinder* finder = g_finder.load();
  nvinfer1::ILogger* logger = finder ? finder->findLogger() : nullptr;
  if (logger != nullptr) {
    logger->log(severity, message.c_str());
  } else if (severity <= nvinfer1::ILogger::Severity::kWARNING) {
    fprintf(stderr, "[sawtrt] %s\n", message.c_str());
  }
}

}  // namespace sawtrt

SAWTRT_EXPORT void setLoggerFinder(nvinfer1::ILoggerFinder* finder) noexcept {
  sawtrt::SetLoggerFinder(finder);
}

SAWTRT_EXPORT nvinfer1::IPluginCreatorInterface* const* getCreators(int32_t& nbCreators) noexcept {
  static nvinfer1::IPluginCreatorInterface* const creators[] = {&sawtrt::Creator()};
  nbCreators = sawtrt::g_self_registered.load() ? 0 : 1;
  return creators;
}

// spec.KVPolicy.signs as the plugin computes them (tests compare them with the Python ones).
SAWTRT_EXPORT void sawtrt_plugin_signs(int32_t seed, int32_t head_dim, float* out) noexcept {
  sawtrt::SignsOf(seed, head_dim, out);
}
