"""Shipped specs made for a model's weights (detox, positive, negative), found by shape and fingerprint."""
from __future__ import annotations

from importlib import resources
from pathlib import Path

import torch

from .errors import SteerError
from .identity import weight_norms as fingerprint
from .spec import ModelShape, Spec

PRESET_DIR = "data/presets"
PRESETS = {"SmolLM2-135M-Instruct": "smollm2-135m-detox.json"}
# specs the builder made for a concept and direction (``steer build``), per model
CONCEPT_PRESETS = {("positive", "up"): {"SmolLM2-135M-Instruct": "smollm2-135m-positive-up.json"},
                   ("negative", "up"): {"SmolLM2-135M-Instruct": "smollm2-135m-negative-up.json"}}


def _matches(spec: Spec, model) -> bool:
    shape = ModelShape.of(model)
    if spec.model is None or (spec.model.n_layers, spec.model.d_ff, spec.model.d_model) != (
            shape.n_layers, shape.d_ff, shape.d_model):
        return False
    stored = spec.meta.get("fingerprint")
    return stored is None or torch.allclose(torch.tensor(stored), torch.tensor(fingerprint(model)), rtol=2e-2, atol=1e-3)


def concept_preset_for(model, concept: str, direction: str = "up") -> Spec | None:
    """The shipped spec the builder made for ``concept`` / ``direction`` on ``model``'s weights, or None."""
    for file in CONCEPT_PRESETS.get((concept, direction), {}).values():
        path = resources.files("steer").joinpath(f"{PRESET_DIR}/{file}")
        if path.is_file():
            spec = Spec.load(Path(str(path)))
            if _matches(spec, model):
                return spec.validate(model)
    return None


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
