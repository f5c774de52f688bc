"""The TensorRT engine path end to end: a 2-layer engine directory -> maybe_build_plan -> the plan
run by TrtCausalLM, compared with the torch backend (CausalLM) on the same steps and pages.

Runs wherever full TensorRT (with plugin layers), a CUDA GPU and the kernel library exist; skipped
with the reason everywhere else. The CPU part checks that `sawtrt build`'s TensorRT step says
plainly why it skipped."""
from __future__ import annotations

import pytest
import torch

from sawtrt.models.specs import ModelSpec
from sawtrt.spec import KVPolicy, PageLayout
from sawtrt.trt import compat
from sawtrt.trt.build_engine import maybe_build_plan


def _engine_path_or_reason() -> str | None:
    trt, reason = compat.full_tensorrt()
    if trt is None:
        return reason
    if not torch.cuda.is_available():
        return "needs a CUDA GPU"
    from sawtrt.kernels import library
    if library.try_load() is None:
        return "kernel library not built (python build_scripts/build.py)"
    return None


def write_engine_dir(path, arch="qwen3", policy="int4-bdr"):
    from sawtrt.engine.config import EngineConfig
    spec = ModelSpec("tiny-2l", arch, num_layers=2, hidden_size=256, num_heads=4,
                     num_kv_heads=2, head_dim=64, intermediate_size=512, vocab_size=512,
                     rope_theta=1e6, rms_norm_eps=1e-6, tie_embeddings=arch == "qwen3",
                     max_position=1024, qk_norm=arch == "qwen3", eos_token_id=1)
    layout = PageLayout(KVPolicy.parse(policy), 64, 2, 16)
    cfg = EngineConfig(model=spec, layout=layout, max_batch=4, max_seq_len=256,
                       weights={"format": "random", "seed": 7, "dtype": "bfloat16"})
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(cfg.to_json())
    return cfg


def test_build_step_reports_why_it_skipped(tmp_path):
    reason = _engine_path_or_reason()
    if reason is None:
        pytest.skip("full TensorRT present: the build runs in test_engine_logits_match_torch")
    write_engine_dir(tmp_path)
    plan, why = maybe_build_plan(tmp_path)
    assert plan is None and why
    assert not (tmp_path / "model.plan").exists()
    if compat.full_tensorrt()[0] is None:
        assert why == reason and why.startswith("TensorRT not importable")
        try:
            compat.load(("tensorrt_rtx", "tensorrt_rtx_bindings"))
            assert "tensorrt_rtx" in why and "accept no plugin layers" in why
        except compat.TensorRTUnavailable:
            assert "not installed" in why


class FakeContext:
    """Records what TrtCausalLM binds (an IExecutionContext stand-in)."""

    def __init__(self):
        self.shapes, self.addresses, self.ran = {}, {}, 0

    def set_input_shape(self, name, shape):
        self.shapes[name] = tuple(shape)
        return True

    def set_tensor_address(self, name, ptr):
        self.addresses[name] = ptr
        return True

    def execute_async_v3(self, stream):
        self.ran += 1
        return True


def test_runtime_binds_the_step_like_the_torch_model(tmp_path):
    """TrtCausalLM's bindings for one mixed step (no TensorRT needed: the context is a fake)."""
    from sawtrt.models.model import AttentionMetadata
    from sawtrt.trt import network as N
    from sawtrt.trt.runtime import PlanError, TrtCausalLM
    cfg = write_engine_dir(tmp_path)
    m = object.__new__(TrtCausalLM)
    m.cfg, m.spec, m.layout, m.device = cfg, cfg.model, cfg.layout, torch.device("cpu")
    m.limits = N.Limits.for_engine(cfg.max_batch, cfg.max_seq_len, cfg.layout.page_size,
                                   max_tokens=64)
    m.context = FakeContext()
    m._stream = lambda: 0
    pool = torch.zeros(2, 12, cfg.layout.num_kv_heads, cfg.layout.head_block_bytes,
                       dtype=torch.uint8)
    meta = AttentionMetadata(
        positions=torch.tensor([0, 1, 2, 9, 4]), slot_mapping=torch.tensor([16, 17, 18, 41, 4]),
        block_tables=torch.tensor([[1, 0], [5, 2], [0, 0]], dtype=torch.int32),
        seq_lens=torch.tensor([3, 10, 5], dtype=torch.int32),
        q_lens=torch.tensor([3, 1, 1], dtype=torch.int32),
        logits_indices=torch.tensor([2, 3, 4]))
    out = m(torch.tensor([5, 6, 7, 8, 9]), meta, pool)
    ctx = m.context
    assert ctx.ran == 1 and out.shape == (3, cfg.model.vocab_size) and out.dtype == torch.float32
    assert ctx.shapes == {"input_ids": (5,), "positions": (5,), "block_tables": (3, 2),
                          "seq_lens": (3,), "cu_q_lens": (4,), "logits_indices": (3,),
                          "kv_pool_0": (12, 2, cfg.layout.head_block_bytes),
                          "kv_pool_1": (12, 2, cfg.layout.head_block_bytes)}
    assert ctx.addresses["kv_pool_1"] == pool[1].data_ptr()          # the runtime's own pages
    assert ctx.addresses["logits"] == out.data_ptr()
    with pytest.raises(PlanError, match="exceeds the plan's profile"):
        m(torch.zeros(65, dtype=torch.long), meta, pool)


# not marked gpu: the skip reason should name what is missing first (usually TensorRT)
@pytest.mark.parametrize("arch, policy", [("qwen3", "int4-bdr"),
                                          ("llama", "int4-bdr:h=32,kv,seed=5")])
def test_engine_logits_match_torch(tmp_path, arch, policy):
    reason = _engine_path_or_reason()
    if reason:
        pytest.skip(reason)
    from sawtrt.engine.llm_engine import load_weights
    from sawtrt.kv_cache import new_pool
    from sawtrt.models.model import AttentionMetadata, CausalLM
    from sawtrt.trt.runtime import TrtCausalLM

    cfg = write_engine_dir(tmp_path, arch, policy)
    plan, why = maybe_build_plan(tmp_path)
    assert plan is not None, why
    assert maybe_build_plan(tmp_path)[1] == "up to date"
    dev = torch.device("cuda")
    trt_model = TrtCausalLM.from_engine_dir(tmp_path, dev)
    torch_model = CausalLM(cfg.model, cfg.layout, load_weights(cfg, tmp_path, dev, torch.bfloat16),
                           dtype=torch.bfloat16, device=dev, max_positions=cfg.max_seq_len)
    pools = [new_pool(cfg.layout, 2, 40, dev) for _ in range(2)]
    gen = torch.Generator().manual_seed(0)
    ps = cfg.layout.page_size
    tables = [[3, 9, 4], [10, 11, 12, 13, 14, 15], [20]]
    done = [0, 0, 0]
    steps = [[37, 60, 5], [1, 30, 1], [1, 0, 1]]     # prefill + chunked prefill, then decode
    for step in steps:
        ids, pos, slots, q_lens, seq_lens, rows, bt = [], [], [], [], [], [], []
        for b, n in enumerate(step):
            if n == 0:
                continue
            start = done[b]
            ids += torch.randint(0, cfg.model.vocab_size, (n,), generator=gen).tolist()
            p = list(range(start, start + n))
            pos += p
            slots += [tables[b][i // ps] * ps + i % ps for i in p]
            q_lens.append(n)
            seq_lens.append(start + n)
            rows.append(len(ids) - 1)
            bt.append(tables[b] + [0] * (6 - len(tables[b])))
            done[b] += n
        meta = AttentionMetadata(
            positions=torch.tensor(pos), slot_mapping=torch.tensor(slots),
            block_tables=torch.tensor(bt, dtype=torch.int32),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
            q_lens=torch.tensor(q_lens, dtype=torch.int32),
            logits_indices=torch.tensor(rows),
            cu_q_lens=torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(),
                                   dtype=torch.int32),
            is_decode=all(n == 1 for n in q_lens), max_q_len=max(q_lens),
            max_seq_len=6 * ps).to(dev)
        x = torch.tensor(ids, device=dev)
        ref = torch_model(x, meta, pools[0])
        got = trt_model(x, meta, pools[1])
        torch.cuda.synchronize()
        assert got.shape == ref.shape == (len(rows), cfg.model.vocab_size)
        assert torch.isfinite(got).all()
        err = (got - ref).abs().max().item()
        assert err <= 0.05 * ref.abs().max().item() + 0.05, (step, err)
        # the plan's top token is (one of) the torch model's best, up to bf16 noise
        picked = ref.gather(1, got.argmax(-1, keepdim=True)).squeeze(1)
        assert (picked >= ref.max(-1).values - 0.05 * ref.abs().max() - 0.05).all()
    assert done == [39, 90, 7]
