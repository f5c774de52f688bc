// The kernels' C ABI (cpp/include/saw/c_api.h), reached through dlopen of libsawtrt_kernels.so:
// the plugin compiles no kernel and carries no second implementation.
//
// Search order: $SAWTRT_KERNEL_LIB, then libsawtrt_kernels.so next to this plugin library, then
// in lib/ beside it (an engine directory: plugin next to model.plan, kernels in lib/), then the
// dynamic loader's own search (LD_LIBRARY_PATH, rpath).
#pragma once
#include <string>

#include "saw/c_api.h"

namespace sawtrt {

struct KernelLibrary {
  decltype(&saw_workspace_bytes) workspace_bytes;
  decltype(&saw_attention_step) attention_step;
  decltype(&saw_error_string) error_string;
  decltype(&saw_last_error_message) last_error_message;
  std::string path;
};

// The loaded library (loaded once per process), or nullptr with *why saying what was tried.
const KernelLibrary* LoadKernelLibrary(std::string* why);

}  // namespace sawtrt
