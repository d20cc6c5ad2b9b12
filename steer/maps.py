"""Least-squares linear maps from a layer's residual stream to the last layer's (Din et al. 2023).

Reading a mid layer through the final norm and unembedding (the logit lens) assumes the
residual stream is already in the last layer's basis; on the embedded model that gives 31%
top-1 agreement at layer 24 against 63% for a fitted map. ``h_last ~= h_layer @ W + b`` is
solved per layer by ridge-regularised least squares on normal equations accumulated in
float64, so any number of tokens can be streamed through in chunks.

>>> fitter = MapFitter(d_model=576)                          # doctest: +SKIP
>>> fitter.add(24, hidden[24], hidden[-1])                   # any number of times
>>> maps = fitter.solve(); maps.apply(24, h)                 # h_last estimate
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class LayerMaps:
    """Affine maps ``layer -> last layer``: ``apply(layer, h) = h @ weight[i] + bias[i]``."""

    layers: list[int]
    weight: torch.Tensor  # (n, d, d)
    bias: torch.Tensor  # (n, d)
    _position: dict[int, int] = field(default_factory=dict, repr=False)
    _on: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self._position = {layer: i for i, layer in enumerate(self.layers)}

    def __contains__(self, layer: int) -> bool:
        return layer in self._position

    def _tensors(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        key = (like.device, like.dtype)
        if key not in self._on:
            self._on[key] = (self.weight.to(like.device, like.dtype), self.bias.to(like.device, like.dtype))
        return self._on[key]

    def apply(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """Estimate of the last layer's residual stream from ``layer``'s output ``(..., d)``."""
        if layer not in self._position:
            raise KeyError(f"no map was fitted for layer {layer} (fitted: {self.layers})")
        weight, bias = self._tensors(hidden)
        i = self._position[layer]
        return torch.addmm(bias[i], hidden.reshape(-1, hidden.shape[-1]), weight[i]).view(hidden.shape)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"maps.layers": torch.tensor(self.layers), "maps.weight": self.weight.contiguous(),
                "maps.bias": self.bias.contiguous()}

    @classmethod
    def from_state_dict(cls, tensors: dict[str, torch.Tensor]) -> "LayerMaps":
        return cls([int(x) for x in tensors["maps.layers"]], tensors["maps.weight"].float(),
                   tensors["maps.bias"].float())

    @classmethod
    def identity(cls, layers: list[int], d_model: int) -> "LayerMaps":
        """The logit lens as a map (for comparison, and for models fitted without maps)."""
        n = len(layers)
        return cls(list(layers), torch.eye(d_model).expand(n, d_model, d_model).clone(), torch.zeros(n, d_model))


class MapFitter:
    """Accumulates ``X^T X`` and ``X^T Y`` per layer (X with a bias column), then solves."""

    def __init__(self, d_model: int, ridge: float = 1e-3):
        self.d_model, self.ridge = d_model, ridge
        self._xtx: dict[int, torch.Tensor] = {}
        self._xty: dict[int, torch.Tensor] = {}

    def add(self, layer: int, source: torch.Tensor, target: torch.Tensor) -> None:
        """Add rows: ``source`` is ``layer``'s output, ``target`` the last layer's, both ``(n, d)``."""
        x = torch.cat([source.reshape(-1, self.d_model).double(),
                       torch.ones(source.numel() // self.d_model, 1, dtype=torch.float64, device=source.device)], 1)
        y = target.reshape(-1, self.d_model).double()
        if layer not in self._xtx:
            self._xtx[layer] = torch.zeros(self.d_model + 1, self.d_model + 1, dtype=torch.float64, device=x.device)
            self._xty[layer] = torch.zeros(self.d_model + 1, self.d_model, dtype=torch.float64, device=x.device)
        self._xtx[layer] += x.T @ x
        self._xty[layer] += x.T @ y

    def merge(self, other: "MapFitter") -> "MapFitter":
        """Add ``other``'s rows to this fitter (e.g. two folds into one); returns self."""
        for layer, xtx in other._xtx.items():
            if layer in self._xtx:
                self._xtx[layer] += xtx
                self._xty[layer] += other._xty[layer]
            else:
                self._xtx[layer], self._xty[layer] = xtx.clone(), other._xty[layer].clone()
        return self

    def solve(self) -> LayerMaps:
        """Ridge solution per layer; ``ridge`` is relative to the mean diagonal of ``X^T X``."""
        if not self._xtx:
            raise ValueError("no data was added to fit the layer maps on")
        layers = sorted(self._xtx)
        weights, biases = [], []
        for layer in layers:
            xtx = self._xtx[layer]
            penalty = self.ridge * xtx.diagonal()[:-1].mean()
            reg = xtx.clone()
            reg.diagonal()[:-1] += penalty  # the bias column is not penalised
            solution = torch.linalg.solve(reg, self._xty[layer])
            weights.append(solution[:-1].float().cpu())
            biases.append(solution[-1].float().cpu())
        return LayerMaps(layers, torch.stack(weights), torch.stack(biases))
