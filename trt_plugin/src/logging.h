// Messages to the TensorRT process's logger (handed to the library through setLoggerFinder),
// or to stderr when the process gave none.
#pragma once
#include <string>

#include <NvInferRuntime.h>

namespace sawtrt {

void SetLoggerFinder(nvinfer1::ILoggerFinder* finder);
void Log(nvinfer1::ILogger::Severity severity, const std::string& message);
inline void LogError(const std::string& message) {
  Log(nvinfer1::ILogger::Severity::kERROR, message);
}

}  // namespace sawtrt
