"""How alike are the layers' representations (Jiang et al. 2024)?

Three views of one teacher-forced pass over held-out text, on every decoder layer's output (the
residual stream):

- the layer x layer matrix of the mean per-token cosine similarity (cheap, every token);
- linear CKA (Kornblith et al. 2019) on a token subsample, the standard it is compared with;
- per layer, how often the layer already predicts the final top-1 token, read through the logit
  lens and through fitted least-squares maps to the last layer (``steer.maps``, shared with
  early exit). Maps are fitted on the first half of the blocks and scored on the second half.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .errors import SteerError
from .families import Adapter
from .layer_scan import recording

if TYPE_CHECKING:
    from .maps import LayerMaps


@dataclass
class Similarity:
    cosine: torch.Tensor  # (n, n) mean per-token cosine similarity of layer outputs
    cka: torch.Tensor  # (n, n) linear CKA on a token subsample
    lens: torch.Tensor  # (n,) top-1 agreement with the final output through the logit lens
    mapped: torch.Tensor | None  # (n,) the same through fitted maps (None without maps)
    tokens: int  # tokens behind the cosine matrix
    cka_tokens: int
    heldout_tokens: int  # tokens behind the agreement


def _hidden(output) -> torch.Tensor:
    """A recorded layer output as float (transformers < 5 layers return a tuple, hidden states first)."""
    return (output[0] if isinstance(output, tuple) else output).detach().float()


@torch.no_grad()
def hidden_states(model, blocks: torch.Tensor, batch_size: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Every layer's output ``(n_layers, tokens, d)`` and the model's top-1 token per position."""
    device = next(model.parameters()).device
    adapter = Adapter(model)
    store: list = [None] * adapter.n_layers
    hidden, top1 = [], []
    with recording(adapter.layers, store):
        for ids in torch.split(blocks, batch_size):
            logits = model(ids.to(device), use_cache=False).logits
            top1.append(logits.argmax(-1).flatten().cpu())
            hidden.append(torch.stack([_hidden(output).flatten(0, 1).cpu() for output in store]))
    return torch.cat(hidden, 1), torch.cat(top1)


def cosine_matrix(hidden: torch.Tensor) -> torch.Tensor:
    """``M[i, j]`` = mean over tokens of cos(h_i(t), h_j(t)); ``hidden`` is ``(n, tokens, d)``."""
    unit = torch.nn.functional.normalize(hidden.double(), dim=-1)
    flat = unit.reshape(unit.shape[0], -1)
    return (flat @ flat.T / hidden.shape[1]).float()


def linear_cka(hidden: torch.Tensor, sample: int | None = 1024, seed: int = 0) -> torch.Tensor:
    """Linear CKA between every pair of layers on ``sample`` random tokens (all when None).

    With centred features X, CKA = <K_i, K_j> / (|K_i| |K_j|) for the Gram matrices K = X X^T.
    """
    n, tokens, _ = hidden.shape
    if sample is not None and sample < tokens:
        index = torch.randperm(tokens, generator=torch.Generator().manual_seed(seed))[:sample]
        hidden = hidden[:, index]
    x = hidden.double()
    x = x - x.mean(1, keepdim=True)
    grams = torch.stack([xi @ xi.T for xi in x]).reshape(n, -1)
    inner = grams @ grams.T
    norms = inner.diagonal().sqrt()
    return (inner / norms[:, None] / norms[None, :]).float()


@torch.no_grad()
def _agreements(model, hidden: torch.Tensor, final_top1: torch.Tensor, readings: list[LayerMaps | None],
                chunk: int = 512) -> torch.Tensor:
    """``top1_agreement`` for every entry of ``readings`` (maps, or None for the logit lens) in one
    pass: each chunk goes to the device once and the lens is read once per chunk."""
    adapter = Adapter(model)
    param = next(model.parameters())
    agree = torch.zeros(len(readings), hidden.shape[0], dtype=torch.long)
    for layer in range(hidden.shape[0]):
        for start in range(0, hidden.shape[1], chunk):
            h = hidden[layer, start:start + chunk].to(param.device, param.dtype)
            target = final_top1[start:start + chunk]
            lens = None
            for r, maps in enumerate(readings):
                if maps is not None and layer in maps:
                    top1 = adapter.readout(maps.apply(layer, h)).argmax(-1).cpu()
                else:
                    lens = adapter.readout(h).argmax(-1).cpu() if lens is None else lens
                    top1 = lens
                agree[r, layer] += int((top1 == target).sum())
    return agree.double() / hidden.shape[1]


def top1_agreement(model, hidden: torch.Tensor, final_top1: torch.Tensor, maps: LayerMaps | None = None,
                   chunk: int = 512) -> torch.Tensor:
    """Per layer: share of positions whose top-1 token read from that layer equals the model's
    (through ``maps`` for the layers it has, through the logit lens for the others)."""
    return _agreements(model, hidden, final_top1, [maps], chunk)[0]


def fit_maps(hidden: torch.Tensor):
    """Least-squares maps from every layer's output to the last layer's (``steer.maps``).

    The last layer needs none: it is read as is (a fitted identity would only add ridge error).
    """
    from .maps import MapFitter

    fitter = MapFitter(d_model=hidden.shape[-1])
    for layer in range(hidden.shape[0] - 1):
        fitter.add(layer, hidden[layer], hidden[-1])
    return fitter.solve()


def analyze(model, blocks: torch.Tensor, cka_tokens: int | None = 1024, batch_size: int = 4,
            with_maps: bool = True) -> Similarity:
    """All three views on ``blocks`` of token ids (at least two blocks when ``with_maps``)."""
    if with_maps and blocks.shape[0] < 2:
        raise SteerError("fitting maps needs at least two blocks of text (one to fit, one to score)")
    hidden, top1 = hidden_states(model, blocks, batch_size)
    cosine = cosine_matrix(hidden)
    cka = linear_cka(hidden, cka_tokens)
    # What linear_cka sampled: every token when cka_tokens is None or at least their number.
    used = hidden.shape[1] if cka_tokens is None else min(cka_tokens, hidden.shape[1])
    if not with_maps:
        lens = top1_agreement(model, hidden, top1)
        return Similarity(cosine, cka, lens, None, blocks.numel(), used, hidden.shape[1])
    split = (blocks.shape[0] + 1) // 2 * blocks.shape[1]
    maps = fit_maps(hidden[:, :split])
    hidden, top1 = hidden[:, split:], top1[split:]
    mapped, lens = _agreements(model, hidden, top1, [maps, None])
    return Similarity(cosine, cka, lens, mapped, blocks.numel(), used, hidden.shape[1])
