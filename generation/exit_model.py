"""What ``steer early-exit fit`` produces: layer maps, an exit classifier, and whose model it is.

Saved as a folder: ``exit_model.json`` (metadata, classifier, calibration measured on the fit
text) and ``maps.safetensors`` (the least-squares maps). Loading checks nothing about the
model; :meth:`ExitModel.check_model` (called by :func:`generation.early_exit`) refuses a model
other than the one the maps were fitted for, naming both.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from steer import Adapter, model_name
from steer.errors import MissingFileError, SteerError
from steer.identity import atomic_write, model_fingerprint as fingerprint

from steer.maps import LayerMaps
from .probe import Probe
from .rules import ClassifierRule, ConfidenceRule, ExitRule

FORMAT = 1
RULES = ("classifier", "confidence")


@dataclass
class ExitModel:
    """Everything early exit needs for one model."""

    model_name: str
    fingerprint: str
    n_layers: int
    d_model: int
    maps: LayerMaps
    check_layers: list[int]
    weight: torch.Tensor  # (n_check, hidden units, or n_features without a probe) the classifier's heads
    bias: torch.Tensor  # (n_check,)
    default_threshold: float = 0.9
    feature_set: str = "direction"  # see generation.features
    info: dict = field(default_factory=dict)  # fit statistics and the calibration curve
    probe: Probe | None = None  # the classifier's MLP body (None: linear on the features)
    exit_scale: list[float] | None = None  # per check layer, inverse temperature of exited logits (None: 1)

    def __post_init__(self) -> None:
        from .features import SCALARS, check_feature_set

        width = self.d_model + (len(SCALARS) if check_feature_set(self.feature_set) == "ffn" else 0)
        if self.probe is not None:
            if self.probe.width[0] != width or self.probe.emb.shape[0] != len(self.check_layers):
                raise ValueError(f"exit classifier's MLP reads {self.probe.width[0]} features at "
                                 f"{self.probe.emb.shape[0]} layers, expected {width} at {len(self.check_layers)}")
            width = self.probe.width[1]
        if tuple(self.weight.shape) != (len(self.check_layers), width) or self.bias.shape[0] != len(self.check_layers):
            raise ValueError(f"exit classifier has shape {tuple(self.weight.shape)}, expected "
                             f"({len(self.check_layers)}, {width}) for {len(self.check_layers)} check layers and "
                             f"feature set {self.feature_set!r}")
        if self.exit_scale is not None and len(self.exit_scale) != len(self.check_layers):
            raise ValueError(f"exit model has {len(self.exit_scale)} exit temperatures for "
                             f"{len(self.check_layers)} check layers")
        missing = [layer for layer in self.check_layers if layer not in self.maps]
        if missing:
            raise ValueError(f"no layer map for check layers {missing}")

    def check_model(self, model: torch.nn.Module) -> None:
        """Raise a clear error if ``model`` is not the model this exit model was fitted for."""
        adapter = Adapter(model)
        found = fingerprint(model)
        if adapter.n_layers != self.n_layers or found != self.fingerprint:
            mine = f"{self.model_name!r} ({self.n_layers} layers, fingerprint {self.fingerprint})"
            theirs = f"{model_name(model)!r} ({adapter.n_layers} layers, fingerprint {found})"
            raise SteerError(f"this exit model was fitted for {mine}, not for {theirs}: "
                             "fit one for this model with `steer early-exit fit`")

    def rule(self, name: str | None, threshold: float, readout=None) -> ExitRule:
        """The named rule (default: the classifier) at ``threshold`` in [0, 1] (each rule checks it)."""
        name = name or "classifier"
        if name == "classifier":
            return ClassifierRule(self.check_layers, self.weight, self.bias, self.n_layers, threshold, self.feature_set,
                                  self.probe)
        if name == "confidence":
            if readout is None:
                raise ValueError("the confidence rule needs the model's readout")
            return ConfidenceRule(self.check_layers, self.maps, readout, threshold)
        raise ValueError(f"unknown exit rule {name!r}: choose from {', '.join(RULES)}")

    def threshold_for(self, agreement: float | None = None, kl: float | None = None,
                      ppl_rise: float | None = None) -> float:
        """The threshold meeting these targets on the fit's held-back tokens (its calibration curve):
        top-1 agreement, mean KL to the full model (nats a token), perplexity rise (0.08 = +8%)."""
        from .simulate import pick_threshold

        points = [dict(threshold=p[0], saved=p[1], agreement=p[2], kl=p[3] if len(p) > 3 else float("nan"),
                       ppl_rise=p[4] if len(p) > 4 else float("nan")) for p in self.info.get("calibration", [])]
        if (kl is not None or ppl_rise is not None) and points and points[0]["kl"] != points[0]["kl"]:
            raise ValueError("this exit model's calibration curve has no KL or perplexity: refit it with "
                             "`steer early-exit fit` to target them")
        return pick_threshold(points, agreement, kl, ppl_rise)

    def log_odds(self, features: torch.Tensor, j: int) -> torch.Tensor:
        """The classifier's log-odds at check layer number ``j`` for features ``(..., F)`` (float32)."""
        body = features.float() if self.probe is None else self.probe.encode(features.float(), j)
        return body @ self.weight[j] + self.bias[j]

    def save(self, path: str | Path) -> Path:
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        meta = {
            "format": FORMAT, "model_name": self.model_name, "fingerprint": self.fingerprint,
            "n_layers": self.n_layers, "d_model": self.d_model, "check_layers": self.check_layers,
            "default_threshold": self.default_threshold, "feature_set": self.feature_set, "info": self.info,
            "exit_scale": self.exit_scale,
        }
        tensors = dict(self.maps.state_dict(), **{"classifier.weight": self.weight.contiguous(),
                                                  "classifier.bias": self.bias.contiguous()})
        if self.probe is not None:
            tensors.update({f"probe.{k}": v.contiguous() for k, v in self.probe.state_dict().items()})
        save_file(tensors, str(folder / "maps.safetensors"))
        (folder / "exit_model.json").write_text(json.dumps(meta, indent=1))
        return folder

    def save_atomic(self, path: str | Path) -> Path:
        """:meth:`save` through a temporary folder moved into place (kept if another process won)."""
        return atomic_write(path, self.save)


def load_exit_model(path: str | Path) -> ExitModel:
    """Load a folder written by :meth:`ExitModel.save` (or ``steer early-exit fit``)."""
    folder = Path(path)
    meta_path, tensor_path = folder / "exit_model.json", folder / "maps.safetensors"
    if not meta_path.is_file() or not tensor_path.is_file():
        raise MissingFileError(f"{folder} is not an exit model folder (expected exit_model.json and "
                               "maps.safetensors, written by `steer early-exit fit --out DIR`)")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            found = meta.get("format") if isinstance(meta, dict) else None
            raise SteerError(f"{meta_path} has format {found!r}; this version reads format {FORMAT}")
        return _from_saved(meta, load_file(str(tensor_path)))
    except SteerError:
        raise
    except Exception as err:  # noqa: BLE001 - any damage to the files: one line naming the folder
        raise SteerError(f"{folder} holds a damaged exit model ({type(err).__name__}: "
                         f"{' '.join(str(err).split())[:200]}); fit it again with `steer early-exit fit`") from None


def _from_saved(meta: dict, tensors: dict) -> ExitModel:
    return ExitModel(
        model_name=meta["model_name"], fingerprint=meta["fingerprint"], n_layers=meta["n_layers"],
        d_model=meta["d_model"], maps=LayerMaps.from_state_dict(tensors), check_layers=list(meta["check_layers"]),
        weight=tensors["classifier.weight"], bias=tensors["classifier.bias"],
        default_threshold=float(meta["default_threshold"]), feature_set=meta.get("feature_set", "ffn"),
        info=meta.get("info", {}), exit_scale=meta.get("exit_scale"),
        probe=Probe(**{k[len("probe."):]: v for k, v in tensors.items() if k.startswith("probe.")})
        if "probe.w1" in tensors else None,
    )
