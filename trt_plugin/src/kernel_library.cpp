#include "kernel_library.h"

#include <dlfcn.h>
#include <stdlib.h>

#include <mutex>
#include <vector>

namespace sawtrt {
namespace {

constexpr char kLibName[] = "libsawtrt_kernels.so";

std::string PluginDirectory() {
  Dl_info info{};
  if (dladdr(reinterpret_cast<void*>(&LoadKernelLibrary), &info) == 0 || !info.dli_fname)
    return "";
  const std::string self = info.dli_fname;
  const size_t slash = self.rfind('/');
  return slash == std::string::npos ? "" : self.substr(0, slash);
}

template <typename F>
bool Bind(void* handle, const char* name, F* out, std::string* why) {
  *out = reinterpret_cast<F>(dlsym(handle, name));
  if (*out == nullptr) *why += std::string("; no symbol ") + name;
  return *out != nullptr;
}

}  // namespace

const KernelLibrary* LoadKernelLibrary(std::string* why) {
  static std::mutex mu;
  static KernelLibrary lib{};
  static bool loaded = false;
  std::lock_guard<std::mutex> lock(mu);
  if (loaded) return &lib;
  std::vector<std::string> candidates;
  if (const char* env = getenv("SAWTRT_KERNEL_LIB"); env && *env) candidates.push_back(env);
  const std::string dir = PluginDirectory();
  if (!dir.empty()) {
    candidates.push_back(dir + "/" + kLibName);
    candidates.push_back(dir + "/lib/" + kLibName);  // an engine directory made by `sawtrt build`
  }
  candidates.push_back(kLibName);
  std::string tried;
  for (const std::string& path : candidates) {
    void* handle = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
    if (handle == nullptr) {
      const char* err = dlerror();
      tried += (tried.empty() ? " " : "; ") + path + ": " + (err ? err : "not loadable");
      continue;
    }
    std::string missing;
    bool ok = Bind(handle, "saw_workspace_bytes", &lib.workspace_bytes, &missing);
    ok &= Bind(handle, "saw_attention_step", &lib.attention_step, &missing);
    ok &= Bind(handle, "saw_error_string", &lib.error_string, &missing);
    ok &= Bind(handle, "saw_last_error_message", &lib.last_error_message, &missing);
    if (!ok) {
      tried += (tried.empty() ? " " : "; ") + path + ": not the sawtrt kernel library" + missing;
      dlclose(handle);
      continue;
    }
    lib.path = path;
    loaded = true;
    return &lib;
  }
  // A failure is not cached: the library may appear later (set $SAWTRT_KERNEL_LIB, copy it).
  if (why)
    *why = std::string("kernel library ") + kLibName + " not loadable (set $SAWTRT_KERNEL_LIB "
           "or put it next to the plugin library); tried:" + tried;
  return nullptr;
}

}  // namespace sawtrt
