"""The one "up to date" rule of `sawtrt build`.

A step is skipped when the fingerprint of its inputs (a JSON-able dict: source digests, options,
format versions) matches the one recorded when it last ran, and the files it wrote are still
there with the recorded sha256. The record lives in the engine directory (STATE_FILE), apart from
config.json, and holds each step's result so a skipped step returns what it returned then.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

STATE_FILE = ".sawtrt-build.json"


def sha256_file(path: Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


def fingerprint(inputs: dict) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()


class BuildState:
    """Per-step records {step: {"inputs": fingerprint, "outputs": {file: sha256}, "result"}} of
    one engine directory."""

    def __init__(self, out: Path):
        self.path = Path(out) / STATE_FILE
        try:
            self.steps = json.loads(self.path.read_text())["steps"]
        except (OSError, ValueError, KeyError, TypeError):
            self.steps = {}

    def current(self, step: str, inputs: dict):
        """The step's recorded result when it is up to date, else None."""
        rec = self.steps.get(step)
        if not rec or rec.get("inputs") != fingerprint(inputs):
            return None
        root = self.path.parent
        for name, digest in rec.get("outputs", {}).items():
            p = root / name
            if not p.is_file() or sha256_file(p) != digest:
                return None
        return rec.get("result")

    def record(self, step: str, inputs: dict, outputs, result) -> None:
        """Record what the step was built from, the files it wrote (names relative to the
        engine directory; a {name: sha256} dict when the step already hashed them, as the
        weights step does for a multi-GB file) and its result; the file is rewritten only when
        something changed."""
        root = self.path.parent
        digests = outputs if isinstance(outputs, dict) else \
            {str(n): sha256_file(root / n) for n in outputs}
        self.steps[step] = {"inputs": fingerprint(inputs), "outputs": dict(digests),
                            "result": result}
        self._save()

    def forget(self, step: str) -> None:
        if self.steps.pop(step, None) is not None:
            self._save()

    def _save(self) -> None:
        text = json.dumps({"steps": self.steps}, indent=1, sort_keys=True) + "\n"
        if not self.path.is_file() or self.path.read_text() != text:
            self.path.write_text(text)
