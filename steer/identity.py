"""One identity for a model's weights, and one way to write what is cached from them.

Everything derived from a model and kept on disk (the converted GGUF, the vocabulary index, exit
models, detox samples, run records) is keyed by :func:`weights_digest` and written with
:func:`atomic_write`, so a cache is found again for the same weights and a killed process never
leaves half a file or folder behind.

Values are hashed after rounding to bfloat16: a float32 model and its bfloat16 copy (the same
weights, another dtype) have one identity; other checkpoints differ. Shipped presets, which
must also match a model quantized differently, use :func:`weight_norms` and a tolerance.
"""
from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path
from typing import Callable, Iterable

import torch

from .families import Adapter


def weights_digest(header: str, tensors: Iterable[torch.Tensor]) -> str:
    """16 hex digits naming ``header`` and the shapes and bfloat16-rounded values of ``tensors``."""
    digest = hashlib.sha1(header.encode())
    for tensor in tensors:
        digest.update(str(tuple(tensor.shape)).encode())
        rounded = tensor.detach().to(torch.bfloat16).contiguous().view(torch.int16)  # same bits for fp32 and bf16 copies
        digest.update(rounded.contiguous().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def model_fingerprint(model: torch.nn.Module) -> str:
    """Cheap identity of a model: its shape and a few of its weights (differs between checkpoints)."""
    adapter = Adapter(model)
    tensors = [adapter.unembed.weight[:64], adapter.value_vectors(0)[:8], adapter.value_vectors(adapter.n_layers - 1)[:8]]
    if adapter.final_norm is not None and getattr(adapter.final_norm, "weight", None) is not None:
        tensors.append(adapter.final_norm.weight)
    return weights_digest(f"{model.config.model_type}:{adapter.n_layers}:{adapter.vocab_size}", tensors)


def weight_norms(model: torch.nn.Module, n: int = 6) -> list[float]:
    """Norms of a few value vectors: compared with a tolerance, they survive dtype, device and
    quantization changes that a digest does not (shipped presets are matched so)."""
    adapter = Adapter(model)
    rows = [adapter.value_vectors(layer)[:n].detach().float().norm(dim=1) for layer in (0, adapter.n_layers - 1)]
    return [round(float(x), 4) for x in torch.cat(rows)]


def atomic_write(path: str | Path, write: Callable[[Path], object]) -> Path:
    """Call ``write(tmp)`` on a temporary sibling of ``path`` (a file or a folder), then move it into
    place in one step. If ``path`` appeared meanwhile (another process), the temporary is dropped."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        if tmp.is_dir():
            if path.exists():
                shutil.rmtree(tmp)
            else:
                tmp.rename(path)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()
    return path
