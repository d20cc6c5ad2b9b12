"""One declarative table of model families, read by every function that touches a model.

A *value vector* (Geva et al. 2022) is what one FFN neuron writes into the residual stream:
a row of GPT-2's ``mlp.c_proj.weight`` (Conv1D stores ``(d_ff, d_model)``), a column of a
``nn.Linear`` output projection such as Llama's ``down_proj`` (stored ``(d_model, d_ff)``).
Its *coefficient* is the activation entering that projection, so every intervention is a
forward pre-hook on the family's ``ffn_out`` module. Adding a family is one row below.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from .errors import SteerError


@dataclass(frozen=True)
class Family:
    """Where things live in one model family (paths are relative to the ``*ForCausalLM``)."""

    name: str
    model_types: tuple[str, ...]
    layers: str  # the ModuleList of decoder blocks (``a|b``: first path that exists)
    ffn_out: str  # relative to a block: the projection whose *input* holds the coefficients
    value_layout: Literal["rows", "columns"]  # value vectors are rows or columns of ffn_out.weight
    final_norm: str
    unembed: str
    pre_unembed: str | None = None  # a projection between final norm and unembedding (OPT-350m)


FAMILIES: tuple[Family, ...] = (
    Family("gpt2", ("gpt2",), "transformer.h", "mlp.c_proj", "rows", "transformer.ln_f", "lm_head"),
    Family(
        "llama",
        ("llama", "mistral", "qwen2", "qwen3", "smollm3", "olmo", "olmo2"),
        "model.layers", "mlp.down_proj", "columns", "model.norm", "lm_head",
    ),
    Family("gpt_neox", ("gpt_neox",), "gpt_neox.layers", "mlp.dense_4h_to_h", "columns",
           "gpt_neox.final_layer_norm", "lm_head|embed_out"),
    Family("opt", ("opt",), "model.decoder.layers", "fc2", "columns", "model.decoder.final_layer_norm",
           "lm_head", pre_unembed="model.decoder.project_out"),
    Family("gemma", ("gemma", "gemma2"), "model.layers", "mlp.down_proj", "columns", "model.norm", "lm_head"),
    Family("phi", ("phi",), "model.layers", "mlp.fc2", "columns", "model.final_layernorm", "lm_head"),
    Family("phi3", ("phi3",), "model.layers", "mlp.down_proj", "columns", "model.norm", "lm_head"),
)


class UnsupportedModelError(SteerError):
    """Raised for a model whose family is not in :data:`FAMILIES`."""


def _supported() -> str:
    return ", ".join(t for f in FAMILIES for t in f.model_types)


def family_of(model: nn.Module) -> Family:
    """The table row for ``model`` (matched on ``config.model_type``)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    raise UnsupportedModelError(
        f"unsupported architecture {model_type!r} ({type(model).__name__}). Supported model types: "
        f"{_supported()}. To add one, append a Family row to steer/families.py naming its decoder "
        "layers, the FFN output projection, how value vectors sit in its weight, the final norm "
        "and the unembedding."
    )


def _get(root: nn.Module, path: str | None) -> nn.Module | None:
    """The submodule at a dotted ``path``; ``a|b`` tries alternatives (names differ across versions)."""
    if path is None:
        return None
    if "|" in path:
        return next((m for p in path.split("|") if (m := _get(root, p)) is not None), None)
    module: nn.Module | None = root
    for part in path.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module


class Adapter:
    """A model seen through its family row: layers, value vectors, read-out."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.family = family_of(model)
        layers = _get(model, self.family.layers)
        if layers is None:
            raise UnsupportedModelError(
                f"{type(model).__name__} has model_type {model.config.model_type!r} but no "
                f"{self.family.layers!r}; is it a *ForCausalLM model?"
            )
        self.layers: nn.ModuleList = layers  # type: ignore[assignment]
        self.final_norm = _get(model, self.family.final_norm)
        self.pre_unembed = _get(model, self.family.pre_unembed)
        self.unembed: nn.Linear = _get(model, self.family.unembed)  # type: ignore[assignment]

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def d_ff(self) -> int:
        return self.value_vectors(0).shape[0]

    @property
    def vocab_size(self) -> int:
        return self.unembed.weight.shape[0]

    def ffn_out(self, layer: int) -> nn.Module:
        """The module whose input is layer ``layer``'s coefficient vector."""
        return _get(self.layers[layer], self.family.ffn_out)  # type: ignore[return-value]

    def value_vectors(self, layer: int) -> torch.Tensor:
        """``(d_ff, d_model)`` view: row ``i`` is value vector ``i`` of ``layer``."""
        weight = self.ffn_out(layer).weight
        return weight if self.family.value_layout == "rows" else weight.T

    def readout(self, hidden: torch.Tensor, through_norm: bool = True) -> torch.Tensor:
        """Logits for residual-stream vectors (the logit lens when applied to a mid layer)."""
        if through_norm and self.final_norm is not None:
            hidden = self.final_norm(hidden)
        if self.pre_unembed is not None:
            hidden = self.pre_unembed(hidden)
        return self.unembed(hidden)

    def check_layer(self, layer: int) -> None:
        if not isinstance(layer, int) or not 0 <= layer < self.n_layers:
            raise SteerError(f"unknown layer {layer!r}: this model has layers 0..{self.n_layers - 1}")
