"""ops.plan: the library is probed once per configuration; every later call is a lookup."""
import torch

from sawtrt.kernels import library, ops
from sawtrt.spec import KVPolicy, PageLayout


class FakeLibrary:
    """Counts the probes; serves head_dim 128 only, decode for int4 only."""

    def __init__(self):
        self.probes = 0
        self.decode_asks = 0

    def saw_page_layout(self, cfg, out):
        self.probes += 1
        return 0 if cfg._obj.head_dim == 128 else library.ERR_UNSUPPORTED

    def saw_decode_supported(self, cfg):
        self.decode_asks += 1
        return int(cfg._obj.kind == library.KIND_INT4)


def test_probe_runs_once_per_configuration(monkeypatch):
    fake = FakeLibrary()
    monkeypatch.setattr(library, "try_load", lambda: fake)
    monkeypatch.setattr(ops, "_plans", {})
    int4 = PageLayout(KVPolicy.parse("int4-bdr:h=64"), 128, 2)
    int8 = PageLayout(KVPolicy.parse("int8"), 128, 2)
    odd = PageLayout(KVPolicy.parse("int4"), 96, 2)
    for _ in range(5):                                       # five steps of a 3-layer model
        for lay in (int4, int8, odd):
            cfg = ops.kernel_config(lay, 8, torch.bfloat16, "cuda:0")
            assert (cfg is None) == (lay is odd)
    assert fake.probes == 3 and fake.decode_asks == 2
    # an equal layout built again (PageLayout.for_layer makes new objects) hits the same plan
    again = PageLayout(KVPolicy.parse("int4-bdr:h=64"), 128, 2)
    assert ops.kernel_config(again, 8, torch.bfloat16, "cuda:0") is ops.kernel_config(
        int4, 8, torch.bfloat16, "cuda:0")
    assert ops.fused_step_config(int4, 8, torch.bfloat16, "cuda:0") is not None
    assert ops.fused_step_config(int8, 8, torch.bfloat16, "cuda:0") is None   # no int8 decode
    assert fake.probes == 3
    # another head count, dtype, scale or device is another configuration
    ops.kernel_config(int4, 16, torch.bfloat16, "cuda:0")
    ops.kernel_config(int4, 8, torch.float16, "cuda:0")
    ops.kernel_config(int4, 8, torch.bfloat16, "cuda:0", sm_scale=0.5)
    ops.kernel_config(int4, 8, torch.bfloat16, "cuda:1")
    assert fake.probes == 7
    cfg = ops.kernel_config(int4, 8, torch.bfloat16, "cuda:0", sm_scale=0.5)
    assert abs(cfg.sm_scale - 0.5) < 1e-7 and cfg.num_q_heads == 8 and cfg.rotation_block == 64


def test_no_plan_without_cuda_or_library(monkeypatch):
    lay = PageLayout(KVPolicy.parse("int4"), 128, 2)
    monkeypatch.setattr(library, "try_load", lambda: FakeLibrary())
    assert ops.plan(lay, 8, torch.bfloat16, "cpu") is None
    assert ops.plan(lay, 8, torch.float32, "cuda:0") is None
    monkeypatch.setattr(library, "try_load", lambda: None)
    assert ops.plan(lay, 8, torch.bfloat16, "cuda:0") is None
