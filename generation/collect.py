"""Teacher-forced passes that record what the exit rules and maps are fitted on.

One forward per chunk of text records every decoder layer's output (the residual stream),
and at the layers asked for, the FFN coefficients (input of the family's ``ffn_out``) and the
FFN update (its output). Hooks are removed on any exit.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch

from steer import Adapter
from steer.hooks import hooks


@dataclass
class Trace:
    """One chunk's record; ``hidden[l]`` is layer ``l``'s output, ``hidden[-1]`` the last layer's."""

    hidden: torch.Tensor  # (n_layers, T, d) float32
    embedded: torch.Tensor  # (T, d) the input of layer 0
    coef: dict[int, torch.Tensor]  # layer -> (T, d_ff)
    update: dict[int, torch.Tensor]  # layer -> (T, d)
    logits: torch.Tensor  # (T, vocab) the full model's


@contextmanager
def recording(model: torch.nn.Module, ffn_layers: list[int]) -> Iterator[dict]:
    """Hooks filling ``store['hidden'][l]``, ``store['coef'][l]``, ``store['update'][l]`` (batch row 0)."""
    adapter = Adapter(model)
    store: dict = {"hidden": {}, "coef": {}, "update": {}}

    def on_input(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        store["embedded"] = hidden[0].detach().float()

    def on_layer(layer: int):
        def hook(module, args, output):
            store["hidden"][layer] = (output[0] if isinstance(output, tuple) else output)[0].detach().float()
        return hook

    def on_ffn(layer: int):
        def hook(module, args, output):
            store["coef"][layer] = args[0][0].detach().float()
            store["update"][layer] = output[0].detach().float()
        return hook

    entries = [(adapter.layers[0], "pre_kwargs", on_input)]
    entries += [(module, "post", on_layer(layer)) for layer, module in enumerate(adapter.layers)]
    entries += [(adapter.ffn_out(layer), "post", on_ffn(layer)) for layer in ffn_layers]
    try:
        with hooks(*entries):
            yield store
    finally:
        for part in store.values():
            if isinstance(part, dict):
                part.clear()
        store.pop("embedded", None)


@torch.no_grad()
def trace_chunks(model: torch.nn.Module, chunks: list[torch.Tensor], ffn_layers: list[int]) -> Iterator[Trace]:
    """Yield one :class:`Trace` per ``(1, T)`` chunk of token ids."""
    device = next(model.parameters()).device
    n_layers = Adapter(model).n_layers
    with recording(model, ffn_layers) as store:
        for ids in chunks:
            logits = model(ids.to(device), use_cache=False).logits[0].float()
            hidden = torch.stack([store["hidden"][layer] for layer in range(n_layers)])
            yield Trace(hidden, store["embedded"], dict(store["coef"]), dict(store["update"]), logits)
