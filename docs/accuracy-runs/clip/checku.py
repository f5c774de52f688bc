import torch
from sawtrt import hadamard
from sawtrt.eval.hf_models import load
from sawtrt.eval.runtime_path import RuntimeModel
from sawtrt.models.kv_transform import clip_weights
from sawtrt.spec import KVPolicy
torch.set_num_threads(1)
hf, tok, label = load("smollm2-135m", None)
rt = RuntimeModel(label, tokenizer=tok)
pol = KVPolicy.parse("int4-bdr:h=64,kv,center,whiten,clip=q")
u = clip_weights(pol, rt.calibration())
cap = torch.load("cap.pt")
for l in [0, 5, 15, 29]:
    qr = hadamard.rotate(cap["q"][l], 64, None); T = qr.shape[0]
    W = torch.einsum("thgi,thgj->hij", qr.reshape(T, 3, 3, 64), qr.reshape(T, 3, 3, 64)) / (T * 3)
    ev, U = torch.linalg.eigh(W.double()); top = U[..., -1].float()
    cos = (torch.nn.functional.normalize(u[l], dim=-1) * top).sum(-1).abs()
    print(l, "cos", [f"{c:.3f}" for c in cos.tolist()], "|u|", [f"{n:.2f}" for n in u[l].norm(dim=-1).tolist()],
          "in-sample gain", [f"{g:.2f}" for g in (((ev[:, -1] - (ev.sum(-1) - ev[:, -1]) / 63) / ((ev.sum(-1) - ev[:, -1]) / 63)).sqrt()).tolist()])
cal = rt.calibration()
A = cal.whitening().double()
for l in [0, 29]:
    qp = cap["q"][l].double(); T = qp.shape[0]
    # q' = A^-T q  =>  q = A^T q'
    q = torch.einsum("thgd,hde->thge", qp.reshape(T, 3, 3, 64), A[l])   # q_e = sum_d A[d,e] q'_d
    Win = torch.einsum("thgi,thgj->hij", q, q) / (T * 3)
    Wc = cal.q_moment[l].double()
    for h in range(3):
        a = torch.linalg.eigh(Win[h])[1][:, -1]; b = torch.linalg.eigh(Wc[h])[1][:, -1]
        print(l, h, "raw-q top eigvec cos", float((a * b).sum().abs()), "trace ratio", float(Win[h].trace() / Wc[h].trace()))
