"""Running a TensorRT plan as the model of the sawtrt runtime.

`TrtCausalLM` has the torch model's calling convention — `model(input_ids, meta, kv_pool) ->
logits [S, vocab] fp32`, plus `.device`, `.layout`, `.spec` — so `LLMEngine` and `ModelRunner`
drive it with the same scheduler, block manager and page pools as `CausalLM`:

    engine = engine_from_plan("engines/qwen3-0.6b-int4-bdr")        # an LLMEngine
    # or: LLMEngine(cfg, TrtCausalLM.from_engine_dir(d), tokenizer, "cuda", cuda_graphs=False)

Per step it binds the step's metadata (int32 copies), one pool per layer (views of the runtime's
pool tensor: the plugin writes the step's K/V into them) and the logits buffer, then runs
execute_async_v3 on the current stream. Needs full TensorRT and a GPU.

Padding: the plugin derives each new token's slot from block_tables / seq_lens / cu_q_lens, so
a padded row writes where its block table points; LLMEngine keeps page 0 as a scratch page for
exactly that (padded rows are one-token sequences on page 0). CUDA-graph capture of the TensorRT
execution is not implemented: `engine_from_plan` runs the plan eagerly (cuda_graphs=False).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..kv_cache import pool_pages
from . import compat
from .build_engine import PLAN_FILE, PLAN_META
from .network import INPUT_NAMES, OUTPUT_NAME, Limits, pool_name


class PlanError(RuntimeError):
    pass


class TrtCausalLM:
    def __init__(self, plan_path, cfg, device="cuda", limits: Limits | None = None):
        trt = compat.load(("tensorrt",))
        from . import plugin_library
        # the plan names sawtrt::SawAttention v1: the compiled library next to the plan when
        # the engine carries one, else the Python plugin (both read the same fields)
        plugin_library.register(trt, Path(plan_path).parent)
        self.trt, self.cfg = trt, cfg
        self.spec, self.layout = cfg.model, cfg.layout
        self.device = torch.device(device)
        if self.device.type != "cuda":
            raise PlanError("a TensorRT plan runs on a CUDA device")
        self.limits = limits or Limits.for_engine(cfg.max_batch, cfg.max_seq_len,
                                                  cfg.layout.page_size)
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        with torch.cuda.device(self.device):
            self.engine = self._runtime.deserialize_cuda_engine(Path(plan_path).read_bytes())
            if self.engine is None:
                raise PlanError(f"TensorRT could not deserialize {plan_path} (built by another "
                                "TensorRT version or GPU? rebuild with `sawtrt build`)")
            self.context = self.engine.create_execution_context()
        names = {self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)}
        want = set(INPUT_NAMES) | {OUTPUT_NAME} | {pool_name(i)
                                                   for i in range(self.spec.num_layers)}
        if names != want:
            raise PlanError(f"plan I/O {sorted(names)} is not this network's {sorted(want)}")

    @classmethod
    def from_engine_dir(cls, engine_dir, device="cuda") -> "TrtCausalLM":
        from ..engine.config import EngineConfig
        engine_dir = Path(engine_dir)
        plan = engine_dir / PLAN_FILE
        if not plan.is_file():
            raise PlanError(f"{engine_dir} has no {PLAN_FILE}; build it with `sawtrt build` on "
                            "a machine with TensorRT")
        cfg = EngineConfig.load(engine_dir)
        limits = None
        meta = engine_dir / PLAN_META
        if meta.is_file():
            limits = Limits(**json.loads(meta.read_text())["limits"])
        return cls(plan, cfg, device, limits)

    def _bind(self, name: str, t: torch.Tensor) -> None:
        self.context.set_input_shape(name, tuple(t.shape))
        self.context.set_tensor_address(name, t.data_ptr())

    @torch.inference_mode()
    def __call__(self, input_ids: torch.Tensor, meta, kv_pool) -> torch.Tensor:
        dev, lim = self.device, self.limits
        T, B = input_ids.numel(), meta.seq_lens.numel()
        S = meta.logits_indices.numel()
        if T > lim.max_tokens or B > lim.max_batch:
            raise PlanError(f"step of {T} tokens / {B} sequences exceeds the plan's profile "
                            f"({lim.max_tokens} tokens, {lim.max_batch} sequences)")
        if pool_pages(kv_pool) > lim.max_pool_pages:
            raise PlanError(f"pool of {pool_pages(kv_pool)} pages exceeds the plan's profile "
                            f"({lim.max_pool_pages})")
        if meta.block_tables.shape[1] > lim.max_pages_per_seq(self.layout.page_size):
            raise PlanError("block tables wider than the plan's max_seq_len allows")

        def i32(t):
            return t.to(device=dev, dtype=torch.int32).contiguous()

        if getattr(meta, "cu_q_lens", None) is not None:
            cu = i32(meta.cu_q_lens)
        else:
            cu = torch.zeros(B + 1, dtype=torch.int32, device=dev)
            cu[1:] = torch.cumsum(i32(meta.q_lens), 0)
        rows = i32(meta.logits_indices) if S else torch.zeros(1, dtype=torch.int32, device=dev)
        bound = {"input_ids": i32(input_ids), "positions": i32(meta.positions),
                 "block_tables": i32(meta.block_tables), "seq_lens": i32(meta.seq_lens),
                 "cu_q_lens": cu, "logits_indices": rows}
        for name, t in bound.items():
            self._bind(name, t)
        for i in range(self.spec.num_layers):
            self._bind(pool_name(i), kv_pool[i])
        logits = torch.empty(rows.numel(), self.spec.vocab_size, dtype=torch.float32, device=dev)
        self.context.set_tensor_address(OUTPUT_NAME, logits.data_ptr())
        if not self.context.execute_async_v3(self._stream()):
            raise PlanError("TensorRT execute_async_v3 failed (see the TensorRT log)")
        return logits[:S]

    forward = __call__

    def _stream(self) -> int:
        return torch.cuda.current_stream(self.device).cuda_stream


def engine_from_plan(engine_dir, device="cuda", **kwargs):
    """An LLMEngine whose model is the engine directory's TensorRT plan (same scheduler, block
    manager and pages as the torch backend). kwargs go to LLMEngine (num_pages, ...)."""
    from ..engine.llm_engine import LLMEngine
    from ..models import tokenizer as tokenizers
    model = TrtCausalLM.from_engine_dir(engine_dir, device)
    kwargs.setdefault("max_num_batched_tokens", model.limits.max_tokens)
    kwargs["cuda_graphs"] = False
    return LLMEngine(model.cfg, model, tokenizers.load(engine_dir), device, **kwargs)
