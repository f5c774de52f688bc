"""Triton model repository for a sawtrt engine (Python backend, decoupled/streaming mode).

`write_model_repository(engine_dir)` writes

    <engine_dir>/triton_model_repo/
        sawtrt/
            config.pbtxt      # inputs/outputs named like the TensorRT-LLM Triton backend's
            1/model.py        # three lines: the logic is `sawtrt.serving.triton_model`

and returns the repository root, ready for `tritonserver --model-repository ROOT` (or
`sawtrt serve --engine ENGINE_DIR`, which calls this itself). The checked-in
`triton_server_repo/` at the top of the source tree is the same output with the engine path left
as a placeholder: there the model reads the engine path from `$SAWTRT_ENGINE_DIR` instead.

Tensor names follow TensorRT-LLM's `ensemble`/`tensorrt_llm_bls` models so their clients work:

| name          | type   | shape      | meaning                                                   |
|---------------|--------|------------|-----------------------------------------------------------|
| text_input    | BYTES  | [B, 1]     | prompt (UTF-8); B must be 1                               |
| max_tokens    | INT32  | [B, 1]     | number of tokens to generate (>= 1)                       |
| temperature   | FP32   | [B, 1]     | optional, 0 = greedy (default)                            |
| top_k         | INT32  | [B, 1]     | optional, 0 = off                                         |
| top_p         | FP32   | [B, 1]     | optional, in (0, 1]                                       |
| seed          | UINT64 | [B, 1]     | optional sampling seed                                    |
| stop_words    | BYTES  | [B, N]     | optional stop strings (empty strings are ignored)         |
| stream        | BOOL   | [B, 1]     | optional; true: one response per step carrying the delta  |
| ignore_eos    | BOOL   | [B, 1]     | optional; generate max_tokens even past EOS (benchmarks)  |
| cap_max_tokens | BOOL  | [B, 1]     | optional; prompt + max_tokens over max_seq_len: generate up to the limit instead of an error |
| random_seed   | UINT64 | [B, 1]     | optional; TensorRT-LLM's name for seed                    |
| bad_words     | BYTES  | [B, N]     | optional; only empty strings accepted (not supported)     |
| beam_width    | INT32  | [B, 1]     | optional; must be 1 (no beam search)                      |
| text_output   | BYTES  | [B, 1]     | generated text (a delta when streaming; no prompt echo)   |
| num_input_tokens  | INT32 | [B, 1]  | prompt length in tokens                                   |
| num_output_tokens | INT32 | [B, 1]  | tokens generated so far                                   |
| finish_reason | BYTES  | [B, 1]     | "" while streaming, then "length" / "stop" / "abort" ...  |
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

MODEL_NAME = "sawtrt"
REPO_DIRNAME = "triton_model_repo"
ENGINE_DIR_PLACEHOLDER = "${SAWTRT_ENGINE_DIR}"

# name, Triton type, dims (after the batch dim), optional
INPUTS = (
    ("text_input", "TYPE_STRING", (1,), False),
    ("max_tokens", "TYPE_INT32", (1,), False),
    ("temperature", "TYPE_FP32", (1,), True),
    ("top_k", "TYPE_INT32", (1,), True),
    ("top_p", "TYPE_FP32", (1,), True),
    ("seed", "TYPE_UINT64", (1,), True),
    ("stop_words", "TYPE_STRING", (-1,), True),
    ("stream", "TYPE_BOOL", (1,), True),
    ("ignore_eos", "TYPE_BOOL", (1,), True),
    ("cap_max_tokens", "TYPE_BOOL", (1,), True),
    # accepted for TensorRT-LLM clients, which send them by default
    ("random_seed", "TYPE_UINT64", (1,), True),
    ("bad_words", "TYPE_STRING", (-1,), True),
    ("beam_width", "TYPE_INT32", (1,), True),
)
OUTPUTS = (
    ("text_output", "TYPE_STRING", (1,)),
    ("num_input_tokens", "TYPE_INT32", (1,)),
    ("num_output_tokens", "TYPE_INT32", (1,)),
    ("finish_reason", "TYPE_STRING", (1,)),
)

MODEL_PY = '''\
"""Triton Python backend entry point of a sawtrt engine; the logic is in sawtrt.serving."""
from sawtrt.serving.triton_model import TritonPythonModel  # noqa: F401
'''


def _dims(dims) -> str:
    return "[ " + ", ".join(str(d) for d in dims) + " ]"


def render_config(engine_dir: str, *, model_name: str = MODEL_NAME,
                  max_batch_size: int = 64, device: str = "", options=None) -> str:
    """The config.pbtxt text. `max_batch_size` only makes clients' [1, 1] shapes legal (as in
    TensorRT-LLM's models): batching happens inside the engine, one request per Triton request.
    `options` (an engine.options.EngineOptions) become string parameters too."""
    lines = [
        f'name: "{model_name}"',
        'backend: "python"',
        f"max_batch_size: {max_batch_size}",
        "",
        "# One response per generated step; the last response carries the FINAL flag.",
        "model_transaction_policy { decoupled: true }",
        "",
    ]
    for name, dtype, dims, optional in INPUTS:
        lines += ["input {", f'  name: "{name}"', f"  data_type: {dtype}", f"  dims: {_dims(dims)}"]
        if optional:
            lines.append("  optional: true")
        lines += ["}"]
    for name, dtype, dims in OUTPUTS:
        lines += ["output {", f'  name: "{name}"', f"  data_type: {dtype}", f"  dims: {_dims(dims)}", "}"]
    lines += [
        "",
        "# One Python process owns the engine; its background loop batches all requests.",
        "instance_group [ { count: 1, kind: KIND_CPU } ]",
        "",
    ]
    params = {"engine_dir": engine_dir, "device": device}
    if options is not None:
        params.update(options.to_params())
    for key, value in params.items():
        value = value.replace("\\", "\\\\").replace('"', '\\"')
        lines.append(f'parameters {{ key: "{key}" value: {{ string_value: "{value}" }} }}')
    return "\n".join(lines) + "\n"


def write_model_repository(engine_dir, output_dir=None, *, model_name: str = MODEL_NAME,
                           max_batch_size: int = 64, device: str = "", options=None) -> Path:
    """Write a Triton model repository serving `engine_dir`; return the repository root.

    `output_dir` defaults to `<engine_dir>/triton_model_repo`. An existing model folder of the
    same name is replaced. The engine path is stored absolute so the repository can be served
    from any working directory. `options`: an engine.options.EngineOptions (KV policy, KV
    budget, ...) the served engine is loaded with.
    """
    engine_dir = Path(engine_dir).resolve()
    root = Path(output_dir) if output_dir is not None else engine_dir / REPO_DIRNAME
    _write_model(root / model_name, os.fspath(engine_dir), model_name=model_name,
                 max_batch_size=max_batch_size, device=device, options=options)
    return root


def write_template(root) -> Path:
    """Write the engine-independent template (the checked-in `triton_server_repo/`)."""
    root = Path(root)
    _write_model(root / MODEL_NAME, ENGINE_DIR_PLACEHOLDER)
    return root


def _write_model(model_dir: Path, engine_dir: str, **config) -> None:
    if model_dir.exists():
        shutil.rmtree(model_dir)
    (model_dir / "1").mkdir(parents=True)
    (model_dir / "config.pbtxt").write_text(render_config(engine_dir, **config))
    (model_dir / "1" / "model.py").write_text(MODEL_PY)
