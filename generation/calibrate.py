"""Calibrating the distribution emitted at an exit: one temperature per check layer.

Why: early exit samples (p = 0.9) from the exited distribution, so its whole shape matters, not
only its top-1. A least-squares map gets the direction of the last layer's state roughly right
but not its scale through the final norm, so the mapped logits are systematically too flat or
too sharp; on held-out docstrings, at 95% top-1 agreement, perplexity rose 24% uncalibrated.
The inverse temperature ``beta`` of each layer minimises the cross-entropy from the full
model's distribution to ``softmax(beta * mapped logits)``, i.e. the expected negative
log-likelihood of the tokens the full model samples (equivalently its KL to the full model).
The problem is convex in ``beta`` (a log-partition function minus a linear term): Newton's
method converges in a few steps.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

BETA_RANGE = (0.1, 10.0)


def fit_inverse_temperature(mapped: torch.Tensor, full_logprobs: torch.Tensor, iters: int = 25,
                            batch: int = 512) -> float:
    """``beta`` minimising ``mean_i CE(p_full_i, softmax(beta * mapped_i))`` over rows ``(M, V)``."""
    p = full_logprobs.float().exp()
    target = (p * mapped.float()).sum(-1)  # E_p[z] per row
    beta = 1.0
    for _ in range(iters):
        grad, hess = 0.0, 0.0
        for start in range(0, mapped.shape[0], batch):
            z = mapped[start:start + batch].float()
            q = torch.softmax(beta * z, -1)
            mean = (q * z).sum(-1)
            grad += float((mean - target[start:start + batch]).sum())
            hess += float(((q * z * z).sum(-1) - mean * mean).sum())
        if hess <= 1e-12:
            break
        step = grad / hess
        beta = float(np.clip(beta - step, *BETA_RANGE))
        if abs(step) < 1e-4 * beta:
            break
    return beta


@dataclass
class TokenStats:
    """Per token and check layer: what exiting there gives, against the full model."""

    correct: np.ndarray  # (N, n_check) bool: mapped top-1 equals the full model's
    top_prob: np.ndarray  # (N, n_check) mapped top probability (the confidence baseline's score)
    kl: np.ndarray  # (N, n_check) KL(full || calibrated exit distribution), nats
    nll: np.ndarray  # (N, n_check) -log of the next token under the calibrated exit distribution (nan: none)


def token_stats(mapped: torch.Tensor, full_logprobs: torch.Tensor, beta: float, next_ids: torch.Tensor,
                top1: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(correct, top_prob, kl, nll)`` for rows of mapped logits ``(B, V)`` at one layer.

    ``next_ids``: the next token per row, negative where there is none (its ``nll`` is nan);
    ``top1``: the full model's top-1 as its own forward computed it (the label)."""
    z = mapped.float()
    best = z.max(-1)
    top_prob = 1.0 / (z - best.values[:, None]).exp().sum(-1)
    logq = torch.log_softmax(beta * z, -1)
    p = full_logprobs.exp()
    kl = (p * (full_logprobs - logq)).sum(-1).clamp_min(0.0)
    has = next_ids >= 0
    nll = torch.where(has, -logq.gather(1, next_ids.clamp_min(0)[:, None])[:, 0], torch.full_like(kl, float("nan")))
    correct = best.indices == top1
    return tuple(t.cpu().numpy() for t in (correct, top_prob, kl, nll))
