"""The exit classifier: a small MLP shared by the check layers, with one output head per layer.

Why an MLP: on the embedded model (held-out docstrings, simulated, fitted on 131k tokens of
other text), the compute saved at >= 95% top-1 agreement is 13.7% with a per-layer linear probe
on the residual direction, 16.4% with this MLP (128 hidden units, a learned embedding per check
layer), against 10.9% for the confidence baseline and 26.1% for the oracle. With 8k fit
tokens both reach only about 12%: the MLP needs the data. Its cost per check is two 128-wide
matrix products, well under 1% of a decode step. ``hidden=0`` trains a linear probe the same way.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class Probe:
    """``encode(x, j)``: the hidden representation of features ``x`` at check layer ``j``."""

    mu: torch.Tensor  # (F,) feature standardisation
    sd: torch.Tensor
    w1: torch.Tensor  # (F, h)
    b1: torch.Tensor  # (h,)
    emb: torch.Tensor  # (n_check, h): which check layer is asking
    w2: torch.Tensor  # (h, h)
    b2: torch.Tensor  # (h,)

    @property
    def width(self) -> tuple[int, int]:
        """(number of input features, hidden units)."""
        return tuple(self.w1.shape)

    def encode(self, x: torch.Tensor, j: int) -> torch.Tensor:
        gelu = torch.nn.functional.gelu
        z = gelu(((x - self.mu) / self.sd) @ self.w1 + self.b1 + self.emb[j])
        return gelu(z @ self.w2 + self.b2)

    def folded(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(w1t, b1 per check layer, w2t, b2)`` with the standardisation and layer embedding folded
        in, for ``F.linear``: the runtime's few-op path (a check costs tens of microseconds on CPU)."""
        w1 = self.w1 / self.sd[:, None]
        b1 = self.b1 + self.emb - (self.mu / self.sd) @ self.w1
        return w1.T.contiguous(), b1, self.w2.T.contiguous(), self.b2

    def to(self, device, dtype) -> "Probe":
        return Probe(**{k: v.to(device, dtype) for k, v in self.state_dict().items()})

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: getattr(self, k) for k in ("mu", "sd", "w1", "b1", "emb", "w2", "b2")}


def train_probe(x: torch.Tensor, y: torch.Tensor, hidden: int = 128, epochs: int = 40, patience: int = 3,
                batch: int = 256, lr: float = 1e-3, weight_decay: float = 1e-2, val_fraction: float = 0.1,
                seed: int = 0) -> tuple[Probe | None, torch.Tensor, torch.Tensor, np.ndarray, np.ndarray]:
    """Fit on features ``x (N, n_check, F)`` and labels ``y (N, n_check)``; stop on a validation split.

    Returns ``(probe or None, head weights (n_check, h or F), head biases (n_check,), validation
    token indices, their log-odds (n_val, n_check))``: the validation predictions are out of
    sample, so they calibrate the threshold. Without a hidden layer the standardisation is folded
    into the weights (``log-odds = x @ w + b``, the runtime's cheap path).
    """
    if x.shape[0] < 20:
        raise ValueError(f"too few tokens to fit an exit classifier on: {x.shape[0]}")
    device = x.device
    generator = torch.Generator().manual_seed(seed)
    x, y = x.float(), y.float()
    n, n_check, width = x.shape
    order = torch.randperm(n, generator=generator).to(device)
    n_val = max(1, int(n * val_fraction))
    val, train = order[:n_val], order[n_val:]
    mu, sd = x[train].mean((0, 1)), x[train].std((0, 1)) + 1e-6
    torch.manual_seed(seed)
    params: dict[str, torch.nn.Parameter] = {}
    if hidden:
        first, second = torch.nn.Linear(width, hidden), torch.nn.Linear(hidden, hidden)
        params.update(w1=first.weight.T, b1=first.bias, w2=second.weight.T, b2=second.bias,
                      emb=torch.zeros(n_check, hidden))
    params.update(heads=torch.zeros(n_check, hidden or width), bias=torch.zeros(n_check))
    params = {k: torch.nn.Parameter(v.detach().clone().contiguous().to(device)) for k, v in params.items()}

    def probe() -> Probe | None:
        if not hidden:
            return None
        return Probe(mu, sd, *(params[k] for k in ("w1", "b1", "emb", "w2", "b2")))

    def forward(rows: torch.Tensor) -> torch.Tensor:
        z = x[rows]
        if hidden:
            body = probe()
            z = torch.stack([body.encode(z[:, j], j) for j in range(n_check)], 1)
        else:
            z = (z - mu) / sd
        return (z * params["heads"]).sum(-1) + params["bias"]

    optimizer = torch.optim.AdamW(params.values(), lr=lr, weight_decay=weight_decay)
    loss_fn = torch.nn.functional.binary_cross_entropy_with_logits
    best, best_state, stale = float("inf"), None, 0
    for _ in range(epochs):
        shuffled = train[torch.randperm(len(train), generator=generator).to(device)]
        for start in range(0, len(shuffled), batch):
            rows = shuffled[start:start + batch]
            loss = loss_fn(forward(rows), y[rows])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            val_loss = float(loss_fn(forward(val), y[val]))
        if val_loss < best - 1e-5:
            best, best_state, stale = val_loss, {k: v.detach().clone() for k, v in params.items()}, 0
        else:
            stale += 1
            if stale >= patience:
                break
    with torch.no_grad():
        for k, v in params.items():
            v.copy_(best_state[k])
        val_logodds = forward(val).cpu().numpy()
        body = probe()
        if body is None:  # fold the standardisation in: x @ (w / sd) + (b - mu/sd . w)
            weight = params["heads"] / sd
            bias = params["bias"] - (mu / sd * params["heads"]).sum(-1)
        else:
            body = Probe(**{k: v.detach().clone().cpu() for k, v in body.state_dict().items()})
            weight, bias = params["heads"], params["bias"]
    return body, weight.detach().cpu(), bias.detach().cpu(), val.cpu().numpy(), val_logodds
