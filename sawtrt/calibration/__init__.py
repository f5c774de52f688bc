"""Calibration that an engine build runs on its own weights (per-layer KV sensitivity ranking)."""
