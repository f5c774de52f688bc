"""Register the SawAttention creator with TensorRT's plugin registry (of whichever TensorRT
Python API compat.load() finds) and report it:

    python -m trt_plugin.register
"""
from __future__ import annotations


def main() -> int:
    from sawtrt.trt import compat
    from sawtrt.trt.plugin import register, trt
    creator = register()
    found = trt.get_plugin_registry().get_creator(creator.name, creator.plugin_version,
                                                  creator.plugin_namespace)
    print(f"{compat.flavor(trt)} {compat.version(trt)}: registered "
          f"{creator.plugin_namespace}::{creator.name} v{creator.plugin_version} "
          f"(fields: {', '.join(f.name for f in creator.field_names)})")
    print("TensorRT engines:", "available" if compat.has_plugin_layers(trt) else
          "not with this TensorRT (its networks accept no plugin layers)")
    return 0 if found is creator else 1


if __name__ == "__main__":
    raise SystemExit(main())
