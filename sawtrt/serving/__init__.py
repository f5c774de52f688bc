"""Serving sawtrt engines behind NVIDIA Triton Inference Server.

- `triton_repo`: writes the model repository (config.pbtxt + model.py) for an engine directory.
- `backend`: request parsing and the background engine loop (no Triton imports; unit-testable).
- `triton_model`: the Python-backend `TritonPythonModel`, a thin adapter over `backend`.
- `server`: finds and launches a real `tritonserver`; `client`: gRPC streaming client helpers.
"""
