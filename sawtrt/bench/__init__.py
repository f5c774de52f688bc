"""Benchmarks: kernel timings against PyTorch's best BF16 attention (`sawtrt bench kernels`).

Importable without a GPU; everything that touches CUDA happens inside the functions."""
