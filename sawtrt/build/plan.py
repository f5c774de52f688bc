"""The inputs of `sawtrt build`, validated before anything is written."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from ..models import hub
from ..models.specs import MODELS, ModelSpec, UnknownModel, get_spec
from ..models.weights import CheckpointError, safetensors_files, spec_from_hf_dir
from ..spec import KVPolicy, PageLayout, PolicyError
from . import kernels

MARKER = ".sawtrt-engine"     # written first: a half-built directory is still ours to finish
MAX_BATCH_LIMIT = 4096
# fields that must agree between a named model and a checkpoint given for it
_SHAPE_FIELDS = ("arch", "num_layers", "hidden_size", "num_heads", "num_kv_heads", "head_dim",
                 "intermediate_size", "vocab_size", "qk_norm", "tie_embeddings")


class BuildError(ValueError):
    """An input `sawtrt build` cannot honour; raised before anything is written."""


@dataclass
class BuildOptions:
    model: str
    checkpoint: str | None = None
    random_weights: bool = False
    seed: int = 0
    kv_cache: str = "int4-bdr"           # a KV policy string (sawtrt.spec.KVPolicy.parse)
    page_size: int = 64
    max_batch: int = 32
    max_seq_len: int | None = None       # default min(4096, the model's context)
    gpu_arch: tuple[str, ...] | None = None
    output: str | None = None
    compile_kernels: bool = True
    spec: ModelSpec | None = None        # Python API only: a custom spec for --random-weights
    rank_layers: int | None = None       # rank the layers on the calibration text and give the
                                         # top N wider pages (int8; bf16 for an int8 cache)


@dataclass
class BuildPlan:
    """The validated inputs: everything the build steps need, decided before any write."""
    spec: ModelSpec
    layout: PageLayout
    max_batch: int
    max_seq_len: int
    source: dict                         # {"kind": "gguf"|"safetensors"|"random", ...}
    output: Path
    gpu_archs: tuple[str, ...] | None    # None: no nvcc / no build script (reason in note)
    kernel_note: str


def plan_build(o: BuildOptions) -> BuildPlan:
    """Validate every option and the checkpoint's presence/shape; raise BuildError if bad."""
    name = o.model.lower()
    spec, source = _model(o, name)
    if spec.arch not in ("llama", "qwen3"):
        raise BuildError(f"{name}: architecture {spec.arch!r} has no runtime model yet "
                         "(llama, qwen3)")
    try:
        pol = KVPolicy.parse(o.kv_cache)
    except PolicyError as e:
        raise BuildError(str(e)) from None
    try:
        layout = PageLayout(pol, spec.head_dim, spec.num_kv_heads, o.page_size)
        pol.check_layers(spec.num_layers)          # per-layer pages name existing layers
    except PolicyError as e:
        raise BuildError(f"{name} (head_dim={spec.head_dim}): {e}") from None
    if o.rank_layers is not None:
        _check_rank_layers(o, pol, spec, source)
    if not 1 <= o.max_batch <= MAX_BATCH_LIMIT:
        raise BuildError(f"--max-batch must be in [1, {MAX_BATCH_LIMIT}], got {o.max_batch}")
    max_seq_len = o.max_seq_len if o.max_seq_len is not None else min(4096, spec.max_position)
    if not 2 <= max_seq_len <= spec.max_position:
        raise BuildError(f"--max-seq-len must be in [2, {spec.max_position}] for {name}, "
                         f"got {max_seq_len}")
    output = Path(o.output) if o.output else Path("engines") / f"{name}-{pol.kind}"
    if output.exists() and (not output.is_dir() or (
            any(output.iterdir()) and not (output / "config.json").is_file()
            and not (output / MARKER).is_file())):
        raise BuildError(f"output {str(output)!r} exists and is not an engine directory; "
                         "refusing to write into it")
    try:
        archs, note = kernels.choose_archs(o.compile_kernels, o.gpu_arch)
    except ValueError as e:
        raise BuildError(str(e)) from None
    return BuildPlan(spec, layout, o.max_batch, max_seq_len, source, output, archs, note)


def _model(o: BuildOptions, name: str) -> tuple[ModelSpec, dict]:
    """The model's spec and where its weights come from."""
    known = name in MODELS
    if o.checkpoint and o.random_weights:
        raise BuildError("give either --checkpoint or --random-weights, not both")
    if o.spec is not None and not o.random_weights:
        raise BuildError("a custom spec is only for random weights")
    if o.random_weights:
        if o.spec is not None:
            spec = dataclasses.replace(o.spec, name=name)
        elif not known:
            raise BuildError(str(UnknownModel(o.model)) + " (--random-weights needs a known model)")
        else:
            spec = get_spec(name)
        return spec, {"kind": "random", "seed": int(o.seed)}
    if o.checkpoint:
        spec, source = _checkpoint(Path(o.checkpoint).expanduser(), name)
        if known:
            ref = get_spec(name)
            bad = [f for f in _SHAPE_FIELDS if getattr(ref, f) != getattr(spec, f)]
            if bad:
                raise BuildError(f"checkpoint does not look like {name}: "
                                 + ", ".join(f"{f}={getattr(spec, f)} (expected "
                                             f"{getattr(ref, f)})" for f in bad))
        return spec, source
    if name in hub.PACKAGED:
        return get_spec(name), {"kind": "gguf", "package": hub.PACKAGED[name].package,
                                "version": hub.PACKAGED[name].version,
                                "path": str(hub.cached_path(name))}
    if known:
        raise BuildError(f"{name} has no weights sawtrt can fetch: pass --checkpoint PATH (an HF "
                         "safetensors directory or a .gguf file) or --random-weights")
    raise BuildError(str(UnknownModel(o.model)) + "; or pass --checkpoint DIR with an HF "
                     "config.json (llama / qwen3 families)")


def _checkpoint(ck: Path, name: str) -> tuple[ModelSpec, dict]:
    if not ck.exists():
        raise BuildError(f"checkpoint {str(ck)!r} does not exist")
    try:
        if ck.is_file() and ck.suffix == ".gguf":
            import gguf
            from ..models.weights import gguf_spec
            return (gguf_spec(gguf.GGUFReader(str(ck)), name),
                    {"kind": "gguf", "path": str(ck.resolve())})
        if ck.is_dir() and sorted(ck.glob("*.gguf")) and not (ck / "config.json").exists():
            raise BuildError(f"{str(ck)!r} holds GGUF files: pass the .gguf file itself")
        spec = spec_from_hf_dir(ck, name)
        safetensors_files(ck)
        if not (ck / "tokenizer.json").is_file():
            raise BuildError(f"{str(ck)!r} has no tokenizer.json")
        return spec, {"kind": "safetensors", "path": str(ck.resolve())}
    except (CheckpointError, ValueError) as e:
        if isinstance(e, BuildError):
            raise
        raise BuildError(str(e)) from None


def _check_rank_layers(o: BuildOptions, pol: KVPolicy, spec: ModelSpec, source: dict) -> None:
    n = o.rank_layers
    if source["kind"] == "random":
        raise BuildError("--rank-layers ranks the layers by running the model over the "
                         "calibration text: random weights have no text to rank on (pass a "
                         "packaged model or --checkpoint)")
    if pol.mixed:
        raise BuildError(f"--rank-layers chooses the per-layer pages itself, but --kv-cache {pol} "
                         f"already names layers {list(pol.wide_layers)}: give the base policy "
                         f"{pol.base}")
    if not pol.quantized:
        raise BuildError(f"--rank-layers: a {pol.kind} cache stores every layer exactly; "
                         "nothing to rank")
    if not 0 <= n < spec.num_layers:
        raise BuildError(f"--rank-layers {n} must be in [0, {spec.num_layers - 1}] "
                         f"({spec.name} has {spec.num_layers} layers)")
