"""Per-layer KV page formats on the runtime path (experiment only; the runtime has one policy).

The model is sawtrt's own CausalLM (`RuntimeModel`, the `runtime` rows of docs/accuracy.md);
its per-layer body is re-run here with one page layout and one pool per layer, so a layer can
keep `bf16` or `int8` pages while the others use the base policy. Layers with an override get
neither the K transform (bf16 refuses it; plain int8 is +0.02 %) nor a rotation. With no
override the numbers are those of `sawtrt eval` (checked: `check`).

    python layers.py check  SEED...                       base policy, no override (reproduce)
    python layers.py single OUT.json [W,W..]               sensitivity proxy (below), windows W
    python layers.py single OUT.json calib:0               the same on calibration window 0 (of 2)
    python layers.py ppl OUT.jsonl FMT LAYERS SEED...      e.g. ppl x.jsonl bf16 3+17 0 1 2

SEED 0 means no signs (the baseline's first row), S > 0 ",seed=S".

`single`: per layer l, the model with only layer l in the base policy (no signs) and every
other layer bf16; layers < l are identical to the all-bf16 run, so the run starts from the
recorded hidden state at layer l. Reported per layer: mean KL(bf16 || quantized-l) per token
and the NLL increase, over the 8 windows (4 096 scored tokens). It measures the damage of one
layer's 4-bit pages from exact inputs: smooth, no chaotic cascade from other layers' rounding.
"""
from __future__ import annotations

import json
import math
import sys
import time

import torch
import torch.nn.functional as F

from sawtrt import kv_cache
from sawtrt.eval.corpus import windows
from sawtrt.eval.hf_models import load
from sawtrt.eval.runtime_path import RuntimeModel
from sawtrt.kernels import ops
from sawtrt.models.model import rms_norm
from sawtrt.spec import KVPolicy, PageLayout

BASE = "int4-bdr:h=64,kv,center,whiten"
BF16 = 18.847


def base_policy(seed: int) -> KVPolicy:
    return KVPolicy.parse(BASE if seed == 0 else BASE.replace(",kv,", f",kv,seed={seed},"))


class Runner:
    def __init__(self):
        _, self.tok, _ = load("smollm2-135m")
        self.rt = RuntimeModel("smollm2-135m", tokenizer=self.tok)
        self.ws, self.info = windows(self.tok)
        self.spec = self.rt.spec

    def setup(self, policies: list[KVPolicy], base: KVPolicy):
        """CausalLM of the base policy (weights, transform) + per-layer layouts."""
        m = self.rt.model(base)
        assert not m.fused
        sp = self.spec
        lays = [PageLayout(p, sp.head_dim, sp.num_kv_heads, self.rt.page_size) for p in policies]
        return m, lays

    def layers(self, m, lays, policies, base, x, meta, pools, start=0, record=None):
        sp = self.spec
        d, hq, hkv = sp.head_dim, sp.num_heads, sp.num_kv_heads
        eps = sp.rms_norm_eps
        for i in range(start, sp.num_layers):
            if record is not None:
                record.append(x)
            L = m.layers[i]
            h = rms_norm(x, L["in_norm"], eps)
            q, k, v = F.linear(h, L["qkv"], L["qkv_bias"]).split((m.q_size, m.kv_size, m.kv_size), -1)
            q, k, v = q.reshape(-1, hq, d), k.reshape(-1, hkv, d), v.reshape(-1, hkv, d)
            q, k = m.rope(q, meta.positions), m.rope(k, meta.positions)
            if m.kv_transform is not None and policies[i] == base:
                q, k = m.kv_transform(i, q, k)
            ops.write_kv(pools[i], lays[i], k, v, meta.slot_mapping)
            o = ops.paged_attention(q, pools[i], lays[i], meta.block_tables, meta.seq_lens,
                                    meta.q_lens, m.sm_scale)
            x = x + F.linear(o.reshape(-1, m.q_size).to(x.dtype), L["o"])
            h = rms_norm(x, L["post_norm"], eps)
            gate, up = F.linear(h, L["gate_up"]).chunk(2, dim=-1)
            x = x + F.linear(F.silu(gate) * up, L["down"])
        return x

    def logp(self, m, x, meta):
        x = rms_norm(x[meta.logits_indices], m.final_norm, self.spec.rms_norm_eps)
        return torch.log_softmax(F.linear(x, m.lm_head).float(), -1)

    def window(self, w, policies, base, start=0, x0=None, record=None):
        m, lays = self.setup(policies, base)
        ids = torch.tensor(w.ids)
        pages = -(-len(ids) // self.rt.page_size)
        pools = [kv_cache.new_pool(lay, 1, pages)[0] for lay in lays]
        meta = self.rt._meta(torch.arange(pages, dtype=torch.int32), 0, len(ids),
                             torch.arange(len(ids) - 1))
        with torch.inference_mode():
            x = F.embedding(ids, m.embed) if x0 is None else x0
            x = self.layers(m, lays, policies, base, x, meta, pools, start, record)
            return self.logp(m, x, meta), ids[1:]

    def ppl(self, policies, base):
        acc = {}
        for w in self.ws:
            lp, tgt = self.window(w, policies, base)
            a = acc.setdefault(w.source, [0.0, 0])
            a[0] += -float(lp.gather(-1, tgt[:, None]).sum())
            a[1] += int(tgt.numel())
        nll = sum(a[0] for a in acc.values()) / sum(a[1] for a in acc.values())
        return math.exp(nll), {k: math.exp(a[0] / a[1]) for k, a in acc.items()}


def main():
    torch.set_grad_enabled(False)
    cmd = sys.argv[1]
    r = Runner()
    nl = r.spec.num_layers
    if cmd == "check":
        for s in map(int, sys.argv[2:]):
            t = time.time()
            b = base_policy(s)
            p, per = r.ppl([b] * nl, b)
            print(f"seed {s}: ppl {p:.6f}  per source " + " ".join(f"{k} {v:.4f}" for k, v in per.items())
                  + f"  ({time.time() - t:.0f} s)", flush=True)
    elif cmd == "single":
        out = sys.argv[2]
        b = base_policy(0)
        bf = KVPolicy.parse("bf16")
        kl = [0.0] * nl
        dn = [0.0] * nl
        ntok = 0
        t = time.time()
        arg = sys.argv[3] if len(sys.argv) > 3 else ",".join(map(str, range(len(r.ws))))
        ws = r.ws
        if arg.startswith("calib:"):       # the calibration text (disjoint from the eval text)
            from sawtrt.eval.corpus import Window
            from sawtrt.models import kv_transform as kvt
            ids, _ = kvt.calibration_ids(lambda t: r.tok(t, add_special_tokens=False).input_ids)
            ws = [Window("calib", i, 0, tuple(c)) for i, c in
                  enumerate(kvt.calibration_windows(ids, r.tok.bos_token_id))]
            arg = arg[len("calib:"):]
        sel = [int(x) for x in arg.split(",")]
        for w in [ws[i] for i in sel]:
            rec = []
            ref, tgt = r.window(w, [bf] * nl, b, record=rec)
            ref_nll = -float(ref.gather(-1, tgt[:, None]).sum())
            pref = ref.exp()
            for l in range(nl):
                pol = [bf] * nl
                pol[l] = b
                lp, _ = r.window(w, pol, b, start=l, x0=rec[l])
                kl[l] += float((pref * (ref - lp)).sum())
                dn[l] += -float(lp.gather(-1, tgt[:, None]).sum()) - ref_nll
            ntok += int(tgt.numel())
            print(f"window {w.source} {w.index} done ({time.time() - t:.0f} s)", flush=True)
        res = {"base": str(b), "tokens": ntok, "windows": list(sel), "kl_sum": kl, "dnll_sum": dn, "note": "only layer l quantized, others bf16",
               "per_layer": [{"layer": l, "kl_per_token": kl[l] / ntok,
                              "dnll_per_token": dn[l] / ntok} for l in range(nl)]}
        json.dump(res, open(out, "w"), indent=1)
        for row in sorted(res["per_layer"], key=lambda x: -x["kl_per_token"]):
            print(f"layer {row['layer']:2d}  KL {row['kl_per_token']:.5f}  dNLL {row['dnll_per_token']:+.5f}")
    elif cmd == "ppl":
        out, fmt, layers = sys.argv[2], sys.argv[3], [int(x) for x in sys.argv[4].split("+")]
        for s in map(int, sys.argv[5:]):
            t = time.time()
            b = base_policy(s)
            pol = [b] * nl
            for l in layers:
                pol[l] = KVPolicy.parse(fmt)
            p, per = r.ppl(pol, b)
            row = {"base": str(b), "seed": s, "override": fmt, "layers": layers, "ppl": p,
                   "vs_bf16_pct": 100 * (p / BF16 - 1), "per_source": per,
                   "seconds": round(time.time() - t, 1)}
            with open(out, "a") as f:
                f.write(json.dumps(row) + "\n")
            print(f"{fmt} {sys.argv[4]} seed {s}: ppl {p:.6f} ({row['vs_bf16_pct']:+.2f} %) "
                  f"({row['seconds']} s)", flush=True)


if __name__ == "__main__":
    main()
