"""Triton Python backend entry point of a sawtrt engine; the logic is in sawtrt.serving."""
from sawtrt.serving.triton_model import TritonPythonModel  # noqa: F401
