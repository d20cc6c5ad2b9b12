"""Per-vector edits chosen from the attribution: the value maximizing gain - lam * KL, ranked."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from steer.spec import Spec
from .attribution import Attribution


# -- choosing edits ------------------------------------------------------------------------------
SCALE_RANGE = (-1.0, 1.0)  # "scale" edits shrink a coefficient or flip its sign, never amplify it


@dataclass(frozen=True)
class Candidate:
    layer: int
    index: int
    op: str  # "set" or "scale"
    value: float
    gain: float  # predicted drop of the toxic spans' log-likelihood (nats per span)
    kl: float  # predicted KL per sample (nats)


def _range(att: Attribution, widen: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Values a ``set`` may take: the coefficient's observed range, ``widen`` times as wide around its middle."""
    low, high = att.low.double(), att.high.double()
    if widen == 1:
        return low, high
    middle, half = (low + high) / 2, (high - low) / 2 * widen
    return middle - half, middle + half


def candidates(att: Attribution, lam: float, prior: torch.Tensor | None = None, prior_weight: float = 0.0,
               direction: str = "down", widen: float = 1.0) -> list[Candidate]:
    """Every vector's best single edit under ``gain - lam * kl``, best first (positive net gains only).

    ``prior``: ``(n_layers, d_ff)`` z-score of the target's tokens in each vector's projection (+v).
    A ``set t`` edit writes ``t*v``, so it writes the target when ``sign(t) * z > 0`` (``up``) or
    ``< 0`` (``down``); such an edit ranks by ``net * (1 + prior_weight * aligned z)``.
    ``scale`` edits get no prior (the coefficient's sign varies by token). ``widen``: ``set``
    values may leave the observed range by that factor (raising a concept the model rarely
    writes needs coefficients beyond what its text ever shows; the held-out check still prices them).
    """
    n, m = max(1, att.n_spans), max(1, att.n_samples)
    s1, s2 = att.tox_g / n, att.tox_ga / n
    gg, gh, hh = att.gg / (2 * m), att.gh / (2 * m), att.hh / (2 * m)
    # set a = t: gain(t) = s2 - t*s1, kl(t) = t^2 gg - 2t gh + hh, t within the observed range
    t = ((lam * 2 * gh - s1) / (lam * 2 * gg).clamp_min(1e-30)).clamp(*_range(att, widen))
    set_gain, set_kl = s2 - t * s1, t * t * gg - 2 * t * gh + hh
    # scale a by s = 1 + d with s in SCALE_RANGE: gain = -d*s2, kl = d^2 hh
    d = (-s2 / (lam * 2 * hh).clamp_min(1e-30)).clamp(SCALE_RANGE[0] - 1, SCALE_RANGE[1] - 1)
    scale_gain, scale_kl = -d * s2, d * d * hh
    use_scale = scale_gain - lam * scale_kl > set_gain - lam * set_kl
    value, gain, kl = (torch.where(use_scale, a, b) for a, b in ((d + 1, t), (scale_gain, set_gain), (scale_kl, set_kl)))
    net = (gain - lam * kl).flatten()
    key = net
    if prior is not None and prior_weight:
        aligned = (torch.sign(value) * prior.double() * (1 if direction == "up" else -1)).clamp(0, 3)
        key = net * (1 + prior_weight * torch.where(use_scale, torch.zeros_like(aligned), aligned)).flatten()
    order = key.argsort(descending=True)[:int((net > 0).sum())]
    columns = (use_scale.flatten()[order], value.flatten()[order], gain.flatten()[order], kl.flatten()[order])
    return [Candidate(*divmod(flat, att.tox_g.shape[1]), "scale" if scale else "set", v, g, k)
            for flat, scale, v, g, k in zip(order.tolist(), *(c.tolist() for c in columns))]


def spec_from(candidates_: Sequence[Candidate], model, name: str = "steer", **meta) -> Spec:
    return Spec.build(name, [(c.layer, c.index, c.op, round(c.value, 4)) for c in candidates_], model=model, **meta)
