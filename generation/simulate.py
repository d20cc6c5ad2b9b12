"""Offline (teacher-forced) simulation of exit rules from per-token, per-check-layer records.

Given, for N tokens and the check layers, whether the mapped top-1 equals the full model's
(``correct``) and each rule's score, these compute where every token would exit and what that
saves. This is how curves over many thresholds are drawn cheaply; :mod:`steer.evaluation.early_exit`
also runs the real thing (KV propagation included) at a few thresholds.
"""
from __future__ import annotations

import numpy as np

from .rules import layer_bounds


def first_exit(fires: np.ndarray, layers: list[int], n_layers: int) -> np.ndarray:
    """Exit layer per token: the first check layer whose column fires, else the last layer."""
    exit_layer = np.full(fires.shape[0], n_layers - 1)
    for j in range(len(layers) - 1, -1, -1):
        exit_layer = np.where(fires[:, j], layers[j], exit_layer)
    return exit_layer


def classifier_exits(logits: np.ndarray, layers: list[int], n_layers: int, threshold: float) -> np.ndarray:
    return first_exit(logits > np.array(layer_bounds(layers, n_layers, threshold)), layers, n_layers)


def confidence_exits(top_prob: np.ndarray, layers: list[int], n_layers: int, threshold: float) -> np.ndarray:
    if threshold >= 1.0:
        return np.full(top_prob.shape[0], n_layers - 1)
    return first_exit(top_prob > threshold, layers, n_layers)


def oracle_exits(correct: np.ndarray, layers: list[int], n_layers: int) -> np.ndarray:
    """The earliest check layer from which the mapped top-1 equals the final one and stays so."""
    stays = np.ones(correct.shape[0], dtype=bool)
    fires = np.zeros_like(correct, dtype=bool)
    for j in range(len(layers) - 1, -1, -1):
        stays &= correct[:, j].astype(bool)
        fires[:, j] = stays
    return first_exit(fires, layers, n_layers)


def budget_oracle(kl: np.ndarray, layers: list[int], n_layers: int, max_mean_kl: float) -> np.ndarray:
    """Exit layers saving the most compute while the mean KL(full || exit) over tokens stays within
    ``max_mean_kl`` (nats): the ceiling of any rule under a distribution budget (``log 1.08`` for
    about +8% perplexity). Lagrangian: each token takes the check layer maximising
    ``layers skipped - lam * KL`` (or none), ``lam`` the smallest that meets the budget (bisection)."""
    saving = (n_layers - 1 - np.asarray(layers, dtype=float))[None, :]
    kl = np.nan_to_num(np.asarray(kl, dtype=float), nan=np.inf)

    def exits(lam: float) -> tuple[np.ndarray, float]:
        value = saving - lam * kl
        best = value.argmax(1)
        take = value[np.arange(kl.shape[0]), best] > 0
        chosen = np.where(take, kl[np.arange(kl.shape[0]), best], 0.0)
        return np.where(take, np.asarray(layers)[best], n_layers - 1), float(chosen.mean()) if chosen.size else 0.0

    low, high = 1e-4, 1e8
    cheapest, spent = exits(low)
    if spent <= max_mean_kl:
        return cheapest
    for _ in range(60):
        mid = (low * high) ** 0.5
        low, high = (low, mid) if exits(mid)[1] <= max_mean_kl else (mid, high)
    return exits(high)[0]


def outcome(exit_layer: np.ndarray, correct: np.ndarray, layers: list[int], n_layers: int) -> tuple[float, float]:
    """(share of layer compute saved, top-1 agreement with the full model)."""
    agree = np.ones(exit_layer.shape[0], dtype=bool)
    for j, layer in enumerate(layers):
        agree = np.where(exit_layer == layer, correct[:, j].astype(bool), agree)
    return float(((n_layers - 1 - exit_layer) / n_layers).mean()), float(agree.mean())


def saved_at(points: list[tuple[float, float]], agreement: float = 0.95) -> float:
    """Most compute saved among curve points whose agreement is at least ``agreement``."""
    ok = [saved for saved, agree in points if agree >= agreement]
    return max(ok) if ok else 0.0


def distribution_outcome(exit_layer: np.ndarray, stats, full_nll: np.ndarray, layers: list[int],
                         n_layers: int) -> dict[str, float]:
    """Saved, top-1 agreement, mean KL to the full model (nats a token) and the perplexity rise of
    the text under the exit distributions, for exits ``exit_layer`` over :class:`TokenStats` rows.

    ``full_nll``: the full model's negative log-likelihood of each next token (nan: none)."""
    saved, agree = outcome(exit_layer, stats.correct, layers, n_layers)
    kl = np.zeros(exit_layer.shape[0])
    nll = np.array(full_nll, dtype=float)
    for j, layer in enumerate(layers):
        at = exit_layer == layer
        kl = np.where(at, stats.kl[:, j], kl)
        nll = np.where(at, stats.nll[:, j], nll)
    has = np.isfinite(full_nll) & np.isfinite(nll)
    rise = float(np.exp(nll[has].mean() - np.asarray(full_nll)[has].mean()) - 1) if has.any() else float("nan")
    return {"saved": saved, "agreement": agree, "kl": float(np.nanmean(kl)) if kl.size else 0.0, "ppl_rise": rise}


def pick_threshold(points: list[dict], agreement: float | None = None, kl: float | None = None,
                   ppl_rise: float | None = None) -> float:
    """The threshold saving the most among curve points (dicts with ``threshold``, ``saved``,
    ``agreement``, ``kl``, ``ppl_rise``) meeting every target given; 1.0 (never exit) if none does.

    ``agreement``: top-1 agreement at least this; ``kl``: mean KL to the full model (nats a token)
    at most this; ``ppl_rise``: relative perplexity rise at most this (0.08 = +8%)."""
    ok = [p for p in points
          if (agreement is None or p["agreement"] >= agreement) and (kl is None or p["kl"] <= kl)
          and (ppl_rise is None or p["ppl_rise"] <= ppl_rise)]
    return max(ok, key=lambda p: (p["saved"], -p["threshold"]))["threshold"] if ok else 1.0
