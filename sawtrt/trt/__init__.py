"""TensorRT integration: the SawAttention plugin (plugin.py, over the TensorRT-free params.py
and core.py), the TensorRT API compatibility layer (compat.py), the Qwen3/Llama network builder
(network.py), plan building for `sawtrt build` (build_engine.py) and the runtime backend that
runs a plan (runtime.py). Only plugin.py, network.py and runtime.py need TensorRT at import."""
