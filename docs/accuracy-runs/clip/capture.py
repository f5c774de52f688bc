import torch, sys
from sawtrt.eval.hf_models import load
from sawtrt.eval.corpus import windows
from sawtrt.eval.runtime_path import RuntimeModel
from sawtrt.kernels import ops
from sawtrt.spec import KVPolicy
torch.set_num_threads(1)
hf, tok, label = load("smollm2-135m", None)
ws, _ = windows(tok, tokens=2048, window=512)
rt = RuntimeModel(label, tokenizer=tok)
pol = KVPolicy.parse(sys.argv[1] if len(sys.argv) > 1 else "int4-bdr:h=64,kv,center,whiten")
cap = {"k": [], "v": [], "q": []}
ow, oa = ops.write_kv, ops.paged_attention
def wk(pool, layout, k, v, slots, *a):
    cap["k"].append(k.clone()); cap["v"].append(v.clone()); return ow(pool, layout, k, v, slots, *a)
def pa(q, *a, **kw):
    cap["q"].append(q.clone()); return oa(q, *a, **kw)
ops.write_kv, ops.paged_attention = wk, pa
sel = [ws[0], ws[4]]
for w in sel:
    rt.window_nll(pol, w)
m = rt.model(pol)
L = m.spec.num_layers
off = len(cap["k"]) - len(sel) * L
out = {n: [torch.cat([cap[n][off + i + j * L] for j in range(len(sel))]) for i in range(L)] for n in cap}
print("calls", len(cap["k"]), "offset", off)
out["o"] = [l["o"].clone() for l in m.layers]
torch.save(out, sys.argv[2] if len(sys.argv) > 2 else "cap.pt")
print("ok", out["k"][0].shape, out["q"][0].shape, out["o"][0].shape)
