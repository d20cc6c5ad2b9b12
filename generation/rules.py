"""Exit rules: after a check layer, decide per row whether the rest of the layers can be skipped.

Each rule has ``layers`` (where it is asked), ``needs_ffn`` (whether the runtime must capture
the FFN coefficients and update there) and ``decide(layer, h_in, h_out, ffn) -> bool tensor
over h_out.shape[:-1]``. A threshold of 1 never exits, 0 exits at the first check layer; each
rule's constructor checks that it is in [0, 1].

* :class:`ClassifierRule` (ours): a small MLP on cheap features (:mod:`generation.features`,
  :mod:`generation.probe`; or a linear probe) estimates ``p`` = P(the mapped top-1 here equals the full
  model's). The criterion is deterministic and cost-aware: exit at layer ``l`` when
  ``1 - p < (1 - threshold) * saving(l) / saving(first check)`` where ``saving(l)`` is the number
  of layers skipped by exiting there. Exiting late saves little, so it must risk little; on
  the embedded model this doubles the compute saved at 95% agreement against "first ``p``
  above a threshold" (measured in docs/early_exit.md).
* :class:`ConfidenceRule` (baseline): exit when the mapped distribution's top probability
  exceeds the threshold; it projects onto the whole vocabulary at every check layer.
"""
from __future__ import annotations

import math

import torch

from steer.errors import SteerError
from .features import SCALARS, check_feature_set, direction, scalar_features
from steer.maps import LayerMaps
from .probe import Probe


class ExitRule:
    """Interface of an exit rule (see the module docstring)."""

    layers: tuple[int, ...] = ()
    needs_ffn: bool = False

    def decide(self, layer: int, h_in: torch.Tensor, h_out: torch.Tensor,
               ffn: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        raise NotImplementedError


def check_threshold(threshold: float) -> float:
    """Thresholds are probabilities: a clear error for anything outside [0, 1]."""
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0.0 <= threshold <= 1.0 \
            or math.isnan(threshold):
        raise SteerError(f"threshold must be a number in [0, 1] (1 never exits), got {threshold!r}")
    return float(threshold)


def layer_bounds(layers: list[int], n_layers: int, threshold: float) -> list[float]:
    """Per-layer logit bounds of the cost-aware criterion (``inf`` = never exit there)."""
    first = n_layers - 1 - min(layers)
    if first <= 0 or max(layers) >= n_layers - 1:
        raise ValueError(f"exit check layers must lie below the last layer ({n_layers - 1}), got {sorted(layers)}")
    bounds = []
    for layer in layers:
        risk = (1.0 - threshold) * (n_layers - 1 - layer) / first  # allowed 1 - p at this layer
        if risk <= 0.0:
            bounds.append(math.inf)
        elif risk >= 1.0:
            bounds.append(-math.inf)
        else:
            bounds.append(math.log((1.0 - risk) / risk))  # p > 1 - risk  <=>  logit(p) > bound
    return bounds


class ClassifierRule(ExitRule):
    """Cost-aware exit on a classifier over cheap features.

    Without a probe, ``weight`` has ``d_model`` columns (the ``"direction"`` feature set: the
    log-odds are ``h @ w / |h| + b``, one dot product) or ``6 + d_model`` (``"ffn"``: the FFN
    statistics too). With a probe, the features go through its MLP and ``weight`` are the heads.
    """

    def __init__(self, layers: list[int], weight: torch.Tensor, bias: torch.Tensor, n_layers: int, threshold: float,
                 feature_set: str = "direction", probe: Probe | None = None):
        self.layers = tuple(layers)
        self.threshold = check_threshold(threshold)
        self._index = {layer: i for i, layer in enumerate(layers)}
        self.weight, self.bias = weight.float(), bias.float()
        self.n_scalars = len(SCALARS) if check_feature_set(feature_set) == "ffn" else 0
        self.needs_ffn = self.n_scalars > 0
        self.bounds = layer_bounds(list(layers), n_layers, self.threshold)
        self.probe = probe
        self._on: dict = {}

    def logits(self, layer: int, h_in: torch.Tensor, h_out: torch.Tensor, ffn) -> torch.Tensor:
        """The classifier's log-odds that exiting after ``layer`` keeps the full model's top-1."""
        key = (h_out.device, h_out.dtype)
        if key not in self._on:
            dtype = torch.float32 if self.probe is not None else h_out.dtype
            folded = self.probe.to(h_out.device, dtype).folded() if self.probe is not None else None
            self._on[key] = (self.weight.to(h_out.device, dtype), self.bias.to(h_out.device, dtype), folded)
        weight, bias, folded = self._on[key]
        i = self._index[layer]
        if folded is not None:
            linear, gelu = torch.nn.functional.linear, torch.nn.functional.gelu
            w1t, b1, w2t, b2 = folded
            x = direction(h_out)
            if self.n_scalars:
                x = torch.cat([self._scalars(layer, h_in, h_out, ffn), x], -1)
            z = gelu(linear(gelu(linear(x, w1t, b1[i])), w2t, b2))
            return linear(z, weight[i:i + 1], bias[i:i + 1])[..., 0]
        w = weight[i]
        z = (h_out @ w[self.n_scalars:]) / torch.linalg.vector_norm(h_out, dim=-1).clamp_min(1e-6) + bias[i]
        if self.n_scalars:
            z = z + self._scalars(layer, h_in, h_out, ffn).to(h_out.dtype) @ w[:self.n_scalars]
        return z

    @staticmethod
    def _scalars(layer: int, h_in, h_out, ffn) -> torch.Tensor:
        if ffn is None:
            raise RuntimeError(f"the FFN of layer {layer} was not captured; is its ffn_out module bypassed?")
        return scalar_features(h_in, h_out, *ffn)

    def decide(self, layer, h_in, h_out, ffn):
        bound = self.bounds[self._index[layer]]
        if bound == math.inf:
            return torch.zeros(h_out.shape[:-1], dtype=torch.bool, device=h_out.device)
        return self.logits(layer, h_in, h_out, ffn) > bound


class ConfidenceRule(ExitRule):
    """Baseline: exit when the mapped distribution's top probability exceeds the threshold."""

    def __init__(self, layers: list[int], maps: LayerMaps, readout, threshold: float):
        self.layers = tuple(layers)
        self.threshold = check_threshold(threshold)
        self.maps, self.readout = maps, readout

    def top_probability(self, layer: int, h_out: torch.Tensor) -> torch.Tensor:
        logits = self.readout(self.maps.apply(layer, h_out)).float()
        return 1.0 / (logits - logits.amax(-1, keepdim=True)).exp().sum(-1)

    def decide(self, layer, h_in, h_out, ffn):
        if self.threshold >= 1.0:
            return torch.zeros(h_out.shape[:-1], dtype=torch.bool, device=h_out.device)
        return self.top_probability(layer, h_out) > self.threshold
