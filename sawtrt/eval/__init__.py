"""Accuracy evaluation of KV-cache policies on real models (`sawtrt eval`, docs/accuracy.md)."""
