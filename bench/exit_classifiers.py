"""Which exit classifier saves the most at >= 95% agreement? (the study behind generation/probe.py)

    python bench/exit_classifiers.py cuda 131072 3 16384   # device, fit tokens, check every N layers, held-out tokens

Records the fit text (docstrings' fit split + Python's reference prose) and held-out docstrings
once, then simulates the cost-aware exit for: sklearn logistic regression (the previous
classifier), linear probes and MLPs trained with AdamW, on 8k / 32k / all fit tokens, with the
residual direction alone, plus the previous check layer's direction, or plus the FFN statistics.
Minutes on an H100; results in docs/early_exit.md.
"""
import sys, time
import numpy as np
import torch
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
from steer import load_model, Adapter
from steer.generation.corpus import docstring_text, token_chunks
from steer.generation.fit import record, mapped_top, THRESHOLDS
from steer.maps import MapFitter
from steer.generation.simulate import classifier_exits, confidence_exits, oracle_exits, outcome, saved_at

dev = sys.argv[1] if len(sys.argv) > 1 else "cuda"
FIT = int(sys.argv[2]) if len(sys.argv) > 2 else 131072
EVERY = int(sys.argv[3]) if len(sys.argv) > 3 else 3
t0 = time.time()
model, tok = load_model(device=dev)
n_layers = Adapter(model).n_layers
layers = list(range(n_layers - 2, 6, -EVERY))[::-1]
fit_text = docstring_text("fit", 10**8)  # docstrings, then Python's reference prose
fit_chunks = token_chunks(tok, fit_text, 128, FIT)
held_chunks = token_chunks(tok, docstring_text("heldout", 10**8), 128, int(sys.argv[4]) if len(sys.argv) > 4 else 16384)
print("fit tokens", 128 * len(fit_chunks), "held", 128 * len(held_chunks), "layers", layers, flush=True)
d = 576
fitters = [MapFitter(d, 1e-3), MapFitter(d, 1e-3)]
rec = record(model, fit_chunks, layers, fitters)
fold_maps = [f.solve() for f in fitters]
correct_fit, prob_fit = mapped_top(model, rec, fold_maps)
combined = MapFitter(d, 1e-3).merge(fitters[0]).merge(fitters[1]).solve()
held = record(model, held_chunks, layers)
correct_h, prob_h = mapped_top(model, held, combined)
print(f"recorded {time.time()-t0:.0f}s; map agreement fit", correct_fit.mean(0).round(3), "held", correct_h.mean(0).round(3), flush=True)
oracle = outcome(oracle_exits(correct_h, layers, n_layers), correct_h, layers, n_layers)[0]
conf = saved_at([outcome(confidence_exits(prob_h, layers, n_layers, t), correct_h, layers, n_layers) for t in THRESHOLDS])
print(f"oracle {oracle:.4f} confidence@95 {conf:.4f}", flush=True)


def curve(logodds):
    return saved_at([outcome(classifier_exits(logodds, layers, n_layers, t), correct_h, layers, n_layers) for t in THRESHOLDS])


def curve_first(p):  # plain "first check whose p > t"
    from steer.generation.simulate import first_exit
    return saved_at([outcome(first_exit(p > t, layers, n_layers), correct_h, layers, n_layers) for t in THRESHOLDS])


def feats(r, j, kind):
    u = lambda x: x.float() / x.float().norm(dim=-1, keepdim=True)
    h = u(r.hidden[j])
    if kind == "dir":
        return h
    if kind == "dir+prev":
        return torch.cat([h, u(r.hidden[max(j - 1, 0)])], -1)
    if kind == "dir+scal":
        return torch.cat([h, r.scalars[j]], -1)


N = correct_fit.shape[0]


def train(kind, n_fit, hidden, wd, epochs=40):
    torch.manual_seed(0)
    X = torch.stack([feats(rec, j, kind)[:n_fit] for j in range(len(layers))], 1).to(dev)  # (N, L, F)
    Y = torch.tensor(correct_fit[:n_fit], dtype=torch.float32, device=dev)
    Xh = torch.stack([feats(held, j, kind) for j in range(len(layers))], 1).to(dev)
    mu, sd = X.mean(0), X.std(0) + 1e-6
    X, Xh = (X - mu) / sd, (Xh - mu) / sd
    L, F = X.shape[1], X.shape[2]
    if hidden == 0:
        W = torch.nn.Parameter(torch.zeros(L, F, device=dev)); b = torch.nn.Parameter(torch.zeros(L, device=dev))
        params = [W, b]
        fwd = lambda Z: (Z * W).sum(-1) + b
    else:
        emb = torch.nn.Parameter(torch.zeros(L, hidden, device=dev))
        net1 = torch.nn.Linear(F, hidden).to(dev)
        net2 = torch.nn.Sequential(torch.nn.GELU(), torch.nn.Linear(hidden, hidden), torch.nn.GELU()).to(dev)
        heads = torch.nn.Parameter(torch.zeros(L, hidden, device=dev)); hb = torch.nn.Parameter(torch.zeros(L, device=dev))
        params = [emb, heads, hb] + list(net1.parameters()) + list(net2.parameters())
        fwd = lambda Z: (net2(net1(Z) + emb) * heads).sum(-1) + hb
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=wd)
    perm = torch.randperm(X.shape[0], device=dev)
    val = perm[: X.shape[0] // 10]; tr = perm[X.shape[0] // 10:]
    best, best_state, best_ep = 1e9, None, -1
    for epoch in range(epochs):
        order = tr[torch.randperm(len(tr), device=dev)]
        for i in range(0, len(order), 256):
            idx = order[i:i + 256]
            loss = torch.nn.functional.binary_cross_entropy_with_logits(fwd(X[idx]), Y[idx])
            opt.zero_grad(); loss.backward(); opt.step()
        with torch.no_grad():
            vl = float(torch.nn.functional.binary_cross_entropy_with_logits(fwd(X[val]), Y[val]))
        if vl < best:
            best, best_state, best_ep = vl, [p.detach().clone() for p in params], epoch
    with torch.no_grad():
        for p, s_ in zip(params, best_state):
            p.copy_(s_)
        lo = fwd(Xh).cpu().numpy()
    print(f"{'MLP' if hidden else 'LIN'} n={n_fit} {kind} h={hidden} wd={wd}: ep {best_ep} val {best:.4f} "
          f"saved@95 {curve(lo):.4f} first-p {curve_first(1/(1+np.exp(-lo))):.4f}", flush=True)


def _fit_layer(x, y, c):
    """The previous classifier: sklearn logistic regression on standardised features."""
    from sklearn.linear_model import LogisticRegression

    mu, sd = x.mean(0), x.std(0) + 1e-6
    clf = LogisticRegression(C=c, max_iter=2000).fit((x - mu) / sd, y)
    w = clf.coef_[0] / sd
    return w, float(clf.intercept_[0] - (mu * w).sum())


for c in [0.003, 0.01]:
    lo = np.stack([feats(held, j, "dir").numpy() @ w + b for j, (w, b) in
                   enumerate(_fit_layer(feats(rec, j, "dir")[:8192].numpy(), correct_fit[:8192, j], c) for j in range(len(layers)))], 1)
    print(f"sklearn LR n=8192 dir C={c}: saved@95 {curve(lo):.4f}", flush=True)
for n_fit in sorted({min(x, N) for x in (8192, 32768, N)}):
    n_fit = min(n_fit, N)
    for kind in ["dir", "dir+prev", "dir+scal"]:
        train(kind, n_fit, 0, 1e-2)
    for kind in ["dir", "dir+prev"]:
        for hidden in [128, 512]:
            train(kind, n_fit, hidden, 1e-2)
print("total", time.time() - t0)
