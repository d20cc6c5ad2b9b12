"""Shipped specs: the detox preset made for a model's weights, found by shape and fingerprint."""
from __future__ import annotations

from importlib import resources
from pathlib import Path

import torch

from .errors import SteerError
from .families import Adapter
from .spec import ModelShape, Spec

PRESET_DIR = "data/presets"
PRESETS = {"SmolLM2-135M-Instruct": "smollm2-135m-detox.json"}


def fingerprint(model, n: int = 6) -> list[float]:
    """Norms of a few value vectors: tells apart models of one shape, robust to dtype and device."""
    adapter = Adapter(model)
    rows = [adapter.value_vectors(layer)[:n].detach().float().norm(dim=1) for layer in (0, adapter.n_layers - 1)]
    return [round(float(x), 4) for x in torch.cat(rows)]


def _matches(spec: Spec, model) -> bool:
    shape = ModelShape.of(model)
    if spec.model is None or (spec.model.n_layers, spec.model.d_ff, spec.model.d_model) != (
            shape.n_layers, shape.d_ff, shape.d_model):
        return False
    stored = spec.meta.get("fingerprint")
    return stored is None or torch.allclose(torch.tensor(stored), torch.tensor(fingerprint(model)), rtol=2e-2, atol=1e-3)


def preset_for(model) -> Spec:
    """The shipped detox preset made for ``model``'s weights, or a ValueError saying how to build one."""
    for model_label, file in PRESETS.items():
        path = resources.files("steer").joinpath(f"{PRESET_DIR}/{file}")
        if not path.is_file():
            continue
        spec = Spec.load(Path(str(path)))
        if _matches(spec, model):
            return spec.validate(model)
    shape = ModelShape.of(model)
    raise SteerError(
        f"no shipped detox preset fits {shape.name} ({shape.n_layers} layers, d_ff {shape.d_ff}, d_model "
        f"{shape.d_model}); presets exist for: {', '.join(PRESETS)}. Build one with "
        "`steer detox build --model NAME --out detox.json` and load it with Spec.load"
    )
