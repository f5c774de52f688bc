import torch, sys
from sawtrt import hadamard, quant
torch.set_num_threads(1)
cap = torch.load("cap.pt")
def r1(W):
    ev, U = torch.linalg.eigh(W.double()); lam, u = ev[..., -1], U[..., -1]; D = W.shape[-1]
    sig = (ev.sum(-1) - lam) / (D - 1)
    return (u * ((lam - sig) / sig).sqrt()[..., None]).float()
def fq(x, clip, w=None):
    xr = hadamard.rotate(quant.sanitize(x), 64, None)
    c, s, m = quant.quantize(xr, 4, clip=clip, weight=w)
    return hadamard.inverse_rotate(quant.dequantize(c, s, m), 64, None)
def attn(q, k, v):   # q [T, 9, D], k, v [T, 3, D], causal
    T = q.shape[0]; kk = k.repeat_interleave(3, 1); vv = v.repeat_interleave(3, 1)
    s = torch.einsum("thd,shd->hts", q, kk) / 8.0
    s = s.masked_fill(torch.triu(torch.ones(T, T, dtype=torch.bool), 1), float("-inf"))
    return torch.einsum("hts,shd->thd", s.softmax(-1), vv)
names = ["K plain", "K mse", "K qw"]; vn = ["V plain", "V mse"]
num = {(a, b): 0.0 for a in names for b in vn}; den = 0.0
perlayer = {}
for l in range(len(cap["k"])):
    q, k, v = cap["q"][l], cap["k"][l], cap["v"][l]
    qr = hadamard.rotate(q, 64, None); T = q.shape[0]
    W = torch.einsum("thgi,thgj->hij", qr.reshape(T, 3, 3, 64), qr.reshape(T, 3, 3, 64)) / (T * 3)
    u = r1(W)
    ks = {"K plain": fq(k, False), "K mse": fq(k, True), "K qw": fq(k, True, u)}
    vs = {"V plain": fq(v, False), "V mse": fq(v, True)}
    for wi in range(2):
        sl = slice(wi * 513, (wi + 1) * 513)
        o = attn(q[sl], k[sl], v[sl]); den += float((o ** 2).sum())
        for a in names:
            for b in vn:
                e = float(((attn(q[sl], ks[a][sl], vs[b][sl]) - o) ** 2).sum())
                num[(a, b)] += e
                perlayer.setdefault((a, b), [0.0] * 30)[l] += e
for key, x in num.items():
    print(f"{key[0]:<8} {key[1]:<8} probe {x / den:.5f}  rel {x / num[('K plain', 'V plain')]:.3f}")
