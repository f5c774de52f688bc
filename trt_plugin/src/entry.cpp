// The dynamic plugin-library entry points that IPluginRegistry::loadLibrary,
// `trtexec --dynamicPlugins` and Triton's `--backend-config=tensorrt,plugins=` look up.
// The library links no libnvinfer: TensorRT hands it a logger through setLoggerFinder and takes
// its creators from getCreators. (getPluginCreators is the IPluginV2 entry point; a V3-only
// library does not define it.)
#include <stdio.h>

#include <atomic>

#include "logging.h"
#include "params.h"
#include "saw_attention.h"

#define SAWTRT_EXPORT extern "C" __attribute__((visibility("default")))

namespace sawtrt {
namespace {
std::atomic<nvinfer1::ILoggerFinder*> g_finder{nullptr};
}

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
  static sawtrt::SawAttentionCreator creator;
  static nvinfer1::IPluginCreatorInterface* const creators[] = {&creator};
  nbCreators = 1;
  return creators;
}

// spec.KVPolicy.signs as the plugin computes them (tests compare them with the Python ones).
SAWTRT_EXPORT void sawtrt_plugin_signs(int32_t seed, int32_t head_dim, float* out) noexcept {
  sawtrt::SignsOf(seed, head_dim, out);
}
