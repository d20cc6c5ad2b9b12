"""Every value vector projected onto the vocabulary: its top and bottom tokens.

``E @ v`` (unembedding times value vector) says which tokens a neuron promotes when its
coefficient is positive (top) and, since SwiGLU/GeLU coefficients can be negative, which it
promotes when negative (bottom). The index is computed in chunks of vectors, each chunk's
logits reduced to top-k/bottom-k right away, so memory stays at ``chunk x vocab`` floats.
Selection is exact but cheap: the vocabulary is cut into groups of 64, the k groups with the
largest maxima must hold the k largest entries, and only those ``k*64`` candidates are sorted.
Results are cached on disk under a hash of the weights involved, so a second call is instant.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import SteerError
from .families import Adapter
from .identity import atomic_write, weights_digest
from .models import cache_dir
from .names import VectorName

GROUP = 64
CHUNK_FLOATS = 2**27  # logits held at once (512 MB in float32): bounds memory, keeps matmuls large


def _select(logits: torch.Tensor, k: int, largest: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact ``topk`` along dim 1 through group maxima (much cheaper than ``topk`` on CPU)."""
    n, vocab = logits.shape
    if vocab % GROUP or vocab // GROUP < k:
        return logits.topk(k, dim=1, largest=largest)
    groups = logits.view(n, vocab // GROUP, GROUP)
    extreme = groups.amax(dim=2) if largest else groups.amin(dim=2)
    best = extreme.topk(k, dim=1, largest=largest).indices
    candidates = groups[torch.arange(n, device=logits.device)[:, None], best].reshape(n, k * GROUP)
    values, where = candidates.topk(k, dim=1, largest=largest)
    return values, best.gather(1, where // GROUP) * GROUP + where % GROUP


def project(adapter: Adapter, vectors: torch.Tensor, through_norm: bool = False) -> torch.Tensor:
    """Vocabulary logits ``(n, vocab)`` of ``(n, d_model)`` value vectors."""
    if through_norm:
        return adapter.readout(vectors, through_norm=True)
    if adapter.pre_unembed is not None:
        vectors = adapter.pre_unembed(vectors)
    return vectors @ adapter.unembed.weight.T


def weights_key(adapter: Adapter, k: int, through_norm: bool) -> str:
    """Hash of every weight the index depends on (value vectors, unembedding, final norm)."""
    tensors = [adapter.value_vectors(layer) for layer in range(adapter.n_layers)]
    tensors.append(adapter.unembed.weight)
    for module in (adapter.final_norm, adapter.pre_unembed):
        if module is not None:
            tensors.extend(module.parameters())
    return weights_digest(f"{adapter.family.name}:{k}:{through_norm}:{GROUP}", tensors)


@dataclass
class VocabIndex:
    """Top/bottom ``k`` tokens of every value vector: ``top_ids[layer, index, rank]``."""

    top_ids: torch.Tensor  # (n_layers, d_ff, k) int32
    top_scores: torch.Tensor  # (n_layers, d_ff, k) float16
    bottom_ids: torch.Tensor
    bottom_scores: torch.Tensor
    through_norm: bool

    @classmethod
    @torch.no_grad()
    def build(cls, model, k: int = 30, through_norm: bool = False, chunk: int | None = None,
              dtype: torch.dtype | None = None, cache: bool = True, progress: bool = False) -> "VocabIndex":
        """Index all value vectors of ``model`` (cached on disk keyed by the weights)."""
        adapter = Adapter(model)
        path = cache_dir() / "index" / f"{weights_key(adapter, k, through_norm)}.pt" if cache else None
        if path is not None and path.exists():
            return cls(**torch.load(path))
        device = adapter.unembed.weight.device
        on_cpu = device.type == "cpu"
        dtype = dtype or (torch.float32 if on_cpu else torch.bfloat16)
        chunk = chunk or max(64, min(adapter.d_ff, CHUNK_FLOATS // adapter.vocab_size))
        shape = (adapter.n_layers, adapter.d_ff, k)
        out = {name: torch.empty(shape, device=device, dtype=torch.int32 if name.endswith("ids") else torch.float16)
               for name in ("top_ids", "top_scores", "bottom_ids", "bottom_scores")}
        unembed = adapter.unembed.weight.to(dtype).T.contiguous() if not through_norm else None
        layers = range(adapter.n_layers)
        if progress:
            from tqdm.auto import tqdm

            layers = tqdm(layers, desc="indexing value vectors", unit="layer")
        for layer in layers:
            vectors = adapter.value_vectors(layer)
            for start in range(0, vectors.shape[0], chunk):
                part = vectors[start:start + chunk].to(device)
                if unembed is not None and adapter.pre_unembed is None:
                    logits = part.to(dtype) @ unembed
                else:
                    logits = project(adapter, part, through_norm).to(dtype)
                end = start + part.shape[0]
                for side, largest in (("top", True), ("bottom", False)):
                    values, ids = _select(logits, k, largest)
                    out[f"{side}_ids"][layer, start:end] = ids
                    out[f"{side}_scores"][layer, start:end] = values
        out = {name: tensor.cpu() for name, tensor in out.items()}
        index = cls(**out, through_norm=through_norm)
        if path is not None:
            atomic_write(path, lambda tmp: torch.save({**out, "through_norm": through_norm}, tmp))
        return index

    @property
    def k(self) -> int:
        return self.top_ids.shape[2]

    def tokens(self, layer: int, index: int, tokenizer, n: int = 10, bottom: bool = False) -> list[tuple[str, float]]:
        """The ``n`` tokens vector ``L{layer}.N{index}`` promotes most (``bottom``: least)."""
        n_layers, d_ff, _ = self.top_ids.shape
        if not 0 <= layer < n_layers:
            raise SteerError(f"unknown layer {layer}: this model has layers 0..{n_layers - 1}")
        if not 0 <= index < d_ff:
            raise SteerError(f"index {index} out of range: layers have {d_ff} value vectors (0..{d_ff - 1})")
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= self.k:
            raise SteerError(f"number of tokens must be between 1 and {self.k} (the index keeps the top {self.k}), got {n!r}")
        ids = (self.bottom_ids if bottom else self.top_ids)[layer, index, :n].tolist()
        scores = (self.bottom_scores if bottom else self.top_scores)[layer, index, :n].tolist()
        return [(tokenizer.convert_ids_to_tokens(i), s) for i, s in zip(ids, scores)]

    def search(self, token_ids: list[int], top: int = 20, bottom: bool = False) -> list[tuple[VectorName, int, int]]:
        """Value vectors with any of ``token_ids`` among their top-k: (name, hits, best rank)."""
        ids = self.bottom_ids if bottom else self.top_ids
        wanted = torch.tensor(sorted(set(token_ids)), dtype=ids.dtype)
        member = torch.isin(ids, wanted)  # (L, d_ff, k)
        hits = member.sum(-1)
        ranks = torch.where(member, torch.arange(self.k), self.k).amin(-1)
        order = sorted(zip(*torch.nonzero(hits, as_tuple=True)),
                       key=lambda li: (-int(hits[li]), int(ranks[li])))
        return [(VectorName(int(layer), int(idx)), int(hits[layer, idx]), int(ranks[layer, idx]))
                for layer, idx in order[:top]]


def index_path_for(model, k: int = 30, through_norm: bool = False) -> Path:
    return cache_dir() / "index" / f"{weights_key(Adapter(model), k, through_norm)}.pt"
