// A stand-in for the libnvinfer of a process that dlopens plugin libraries (Triton's TensorRT
// backend): getInferLibVersion and getPluginRegistry, whose registry prints one "call ..." line
// per registerCreator. Built with the soname libnvinfer.so.<major> by tests/test_trt_plugin_lib.py;
// FAKE_NVINFER_VERSION overrides the reported version (a major mismatch).
#include <stdio.h>
#include <stdlib.h>

#include <NvInferRuntime.h>

using namespace nvinfer1;

namespace {
struct FakeRegistry : IPluginRegistry {
  void setErrorRecorder(IErrorRecorder*) noexcept override {}
  IErrorRecorder* getErrorRecorder() const noexcept override { return nullptr; }
  bool isParentSearchEnabled() const override { return false; }
  void setParentSearchEnabled(bool) override {}
  PluginLibraryHandle loadLibrary(const char*) noexcept override { return nullptr; }
  void deregisterLibrary(PluginLibraryHandle) noexcept override {}
  bool registerCreator(IPluginCreatorInterface& creator, const char* ns) noexcept override {
    auto* c = dynamic_cast<IPluginCreatorV3One*>(&creator);
    printf("call registerCreator %s/%s/%s ns=%s\n", c ? c->getPluginName() : "?",
           c ? c->getPluginVersion() : "?", c ? c->getPluginNamespace() : "?", ns);
    fflush(stdout);
    return true;
  }
  IPluginCreatorInterface* const* getAllCreators(int32_t* n) const noexcept override {
    *n = 0;
    return nullptr;
  }
  IPluginCreatorInterface* getCreator(const char*, const char*, const char*) noexcept override {
    return nullptr;
  }
  bool deregisterCreator(const IPluginCreatorInterface&) noexcept override { return false; }
  IPluginResource* acquirePluginResource(const char*, IPluginResource*) noexcept override {
    return nullptr;
  }
  int32_t releasePluginResource(const char*) noexcept override { return 0; }
  IPluginCreatorInterface* const* getAllCreatorsRecursive(int32_t* n) noexcept override {
    *n = 0;
    return nullptr;
  }
};
}  // namespace

extern "C" __attribute__((visibility("default"))) int32_t getInferLibVersion() noexcept {
  const char* v = getenv("FAKE_NVINFER_VERSION");
  return v ? atoi(v) : NV_TENSORRT_VERSION;
}

extern "C" __attribute__((visibility("default"))) IPluginRegistry* getPluginRegistry() noexcept {
  static FakeRegistry registry;
  return &registry;
}
