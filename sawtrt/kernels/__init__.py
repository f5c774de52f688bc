"""Bindings to the compiled kernel library (cpp/ via build_scripts/), with the PyTorch
reference as the fallback wherever the library or a GPU is missing."""
