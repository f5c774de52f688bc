import torch, itertools, sys
from sawtrt import hadamard, quant
torch.set_num_threads(1)
cap = torch.load(sys.argv[1] if len(sys.argv) > 1 else "cap.pt")
L = 15
def qrange(x, lo, hi):
    m = quant.fp16_round_down(lo).float()
    s = quant.fp16_round_up((hi - m) / L).float()
    inv = torch.where(s > 0, 1.0 / torch.where(s > 0, s, torch.ones_like(s)), torch.zeros_like(s))
    c = torch.round((x - m[..., None]) * inv[..., None]).clamp(0, L)
    return c * s[..., None] + m[..., None]
def search(x, cands, W=None):
    lo, hi = x.amin(-1), x.amax(-1); w = hi - lo
    best = None
    for a, b in cands:
        xh = qrange(x, lo + a * w, hi - b * w)
        e = xh - x
        err = (e * e).sum(-1) if W is None else (e * e).sum(-1) + (e * W).sum(-1) ** 2
        if best is None: best, be = xh, err
        else:
            t = err < be; best = torch.where(t[..., None], xh, best); be = torch.where(t, err, be)
    return best
def r1(W):
    if W is None: return None
    ev, U = torch.linalg.eigh(W.double())
    lam, u = ev[..., -1], U[..., -1]
    D = W.shape[-1]
    sig = (ev.sum(-1) - lam) / (D - 1)
    uu = u * ((lam - sig) / sig).sqrt()[..., None]
    return uu.float()
def lsq(x, iters):
    lo, hi = x.amin(-1), x.amax(-1)
    xh = qrange(x, lo, hi)
    m = quant.fp16_round_down(lo).float(); s = quant.fp16_round_up((hi - m) / L).float()
    best = xh; be = ((xh - x) ** 2).sum(-1)
    for _ in range(iters):
        c = torch.round((x - m[..., None]) / s[..., None].clamp_min(1e-30)).clamp(0, L)
        cm = c.mean(-1, keepdim=True); xm = x.mean(-1, keepdim=True)
        var = ((c - cm) ** 2).sum(-1); cov = ((c - cm) * (x - xm)).sum(-1)
        s = torch.where(var > 0, cov / var.clamp_min(1e-30), s)
        m = (xm[..., 0] - s * cm[..., 0])
        sh = quant.fp16_round_up(s).float(); mh = m.half().float()
        c = torch.round((x - mh[..., None]) / sh[..., None].clamp_min(1e-30)).clamp(0, L)
        xh = c * sh[..., None] + mh[..., None]
        err = ((xh - x) ** 2).sum(-1); t = err < be
        best = torch.where(t[..., None], xh, best); be = torch.where(t, err, be)
        s, m = sh, mh
    return best
sym = lambda rs: [((1 - r) / 2, (1 - r) / 2) for r in rs]
fr = [0, .05, .1, .15]
variants = {
  "plain": lambda x, W=None: search(x, [(0, 0)]),
  "sym5(1..0.8)": lambda x, W=None: search(x, sym([1, .95, .9, .85, .8])),
  "sym7(1..0.7)": lambda x, W=None: search(x, sym([1, .95, .9, .85, .8, .75, .7])),
  "sym4(1,.95,.9,.85)": lambda x, W=None: search(x, sym([1, .95, .9, .85])),
  "asym4x4(0..15%)": lambda x, W=None: search(x, list(itertools.product(fr, fr))),
  "asym3x3(0,5,10%)": lambda x, W=None: search(x, list(itertools.product(fr[:3], fr[:3]))),
  "lsq1": lambda x, W=None: lsq(x, 1),
  "lsq3": lambda x, W=None: lsq(x, 3),
  "sym7 w-rank1+iso": lambda x, W=None: search(x, sym([1, .95, .9, .85, .8, .75, .7]), r1(W)),
  "sym4 w-rank1+iso": lambda x, W=None: search(x, sym([1, .95, .9, .85]), r1(W)),
  "asym3x3 w-rank1+iso": lambda x, W=None: search(x, list(itertools.product(fr[:3], fr[:3])), r1(W)),
  "asym4x4 w-rank1+iso": lambda x, W=None: search(x, list(itertools.product(fr, fr)), r1(W)),
  "sym11 .5-1 w-rank1+iso": lambda x, W=None: search(x, sym([1, .95, .9, .85, .8, .75, .7, .65, .6, .55, .5]), r1(W)),
}
nl = len(cap["k"])
res = {n: {"k": [0, 0], "v": [0, 0]} for n in variants}
for l in range(nl):
    k = hadamard.rotate(quant.sanitize(cap["k"][l]), 64, None)   # [T, Hkv, D]
    v = hadamard.rotate(quant.sanitize(cap["v"][l]), 64, None)
    q = hadamard.rotate(cap["q"][l], 64, None)                  # [T, Hq, D]
    T, hkv, d = k.shape; g = q.shape[1] // hkv
    qq = q.reshape(T, hkv, g, d)
    Wq = torch.einsum("thgi,thgj->hij", qq, qq) / (T * g)          # rotated q second moment per KV head
    o = cap["o"][l]                                                # [hidden, Hq*D]
    # V error e (rotated basis) reaches the output through o_proj columns of the group (unrotated: R^T)
    R = hadamard.rotate(torch.eye(d), 64, None)                    # rows R e_i  => x_rot = x @ R
    ow = o.reshape(o.shape[0], hkv, g, d)
    Gv = torch.einsum("nhgi,nhgj->hij", ow, ow)                    # Gram in the unrotated basis
    Gv = R.T @ Gv @ R                                              # e_unrot = e_rot @ R^T
    for n, f in variants.items():
        for which, x, W in (("k", k, Wq), ("v", v, Gv)):
            xh = f(x, W[None] if "w" in n.split()[-1][:1] else None)
            e = xh - x
            res[n][which][0] += float((e * e).sum())
            res[n][which][1] += float(torch.einsum("thi,hij,thj->", e, W, e))
print(f"{'variant':<22} {'K mse':>8} {'K q-wtd':>8} {'V mse':>8} {'V o-wtd':>8}   (relative to plain)")
for n in variants:
    r = res[n]; p = res["plain"]
    print(f"{n:<22} " + " ".join(f"{r[w][i]/p[w][i]:8.4f}" for w in "kv" for i in (0, 1)))
