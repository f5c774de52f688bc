"""trt_plugin: the SawAttention TensorRT plugin folder (README.md documents it).

The code lives in the sawtrt package so it is importable and tested; this module re-exports it
for `import trt_plugin` from the repository root, and `python -m trt_plugin.register` registers
the creator and prints what the registry holds."""
from sawtrt.trt.params import (FIELDS, PLUGIN_NAME, PLUGIN_NAMESPACE, PLUGIN_VERSION,  # noqa: F401
                               AttentionParams, PluginParamError)
from sawtrt.trt.plugin import (SawAttention, SawAttentionCreator, create,  # noqa: F401
                               plugin_fields, register)
