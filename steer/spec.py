"""Intervention specs: which value vectors get which coefficient edits, for which model.

A spec is plain data, saved as JSON or YAML and validated on load, so it can be written by
hand, produced by ``steer detox build``, downloaded from the UI and diffed in review::

    name: detox
    model: {name: SmolLM2-135M-Instruct, n_layers: 30, d_ff: 1536, d_model: 576}
    edits:
      - {vector: L25.N829, op: set, value: 3.0}
      - {vector: L12.N7, op: scale, value: 0.0}

Ops act on the coefficient ``a`` feeding the FFN output projection: ``scale`` gives ``a*v``,
``set`` gives ``v``, ``add`` gives ``a+v``. Several edits of one vector compose in order.
An optional ``layers`` list holds layer ops (skip, reorder, parallel, repeat; see steer/layers.py).
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import SpecError, SteerError
from .families import Adapter
from .inputs import load_data, number, shown, whole
from .layers import LayerOp, check_ops, check_ops_for
from .names import VectorName

OPS = ("scale", "set", "add")


@dataclass(frozen=True)
class Edit:
    layer: int
    index: int
    op: str
    value: float

    def __post_init__(self) -> None:
        for what in ("layer", "index"):
            try:
                whole(getattr(self, what), what, low=0)
            except SteerError as err:
                raise SpecError(f"value vector {self.name}: {err}") from None
        if not isinstance(self.op, str) or self.op not in OPS:
            raise SpecError(f"unknown op {self.op!r} for {self.name}: use one of {', '.join(OPS)}")
        try:
            value = number(self.value, f"value for {self.name}")
        except SteerError as err:
            raise SpecError(str(err)) from None
        object.__setattr__(self, "value", value)  # always a float, so save/load is the identity

    @property
    def name(self) -> str:
        return str(VectorName(self.layer, self.index))

    def to_dict(self) -> dict[str, Any]:
        return {"vector": self.name, "op": self.op, "value": float(self.value)}


@dataclass(frozen=True)
class ModelShape:
    """What a spec must match: the model it was made for."""

    name: str
    n_layers: int
    d_ff: int
    d_model: int

    @classmethod
    def of(cls, model) -> "ModelShape":
        adapter = Adapter(model)
        vectors = adapter.value_vectors(0)
        from .models import model_name

        return cls(model_name(model), adapter.n_layers, vectors.shape[0], vectors.shape[1])


@dataclass(frozen=True)
class Spec:
    name: str
    edits: tuple[Edit, ...] = ()
    model: ModelShape | None = None
    meta: dict[str, Any] = field(default_factory=dict, compare=False)
    layers: tuple = ()  # LayerOp items (steer/layers.py), applied by the same steering() call

    # -- construction ----------------------------------------------------------------------
    @classmethod
    def build(cls, name: str, edits, model=None, layers=(), **meta: Any) -> "Spec":
        """From ``(layer, index, op, value)`` tuples or ``("L3.N5", op, value)`` triples; ``layers``: LayerOps or dicts."""
        parsed = []
        for i, item in enumerate(edits):
            if isinstance(item, Edit):
                parsed.append(item)
            elif isinstance(item, (tuple, list)) and len(item) == 3:
                vector = VectorName.parse(item[0])
                parsed.append(Edit(vector.layer, vector.index, item[1], item[2]))
            elif isinstance(item, (tuple, list)) and len(item) == 4:
                parsed.append(Edit(*item))
            else:
                raise SpecError(f"spec {name!r}: edits[{i}] must be (layer, index, op, value) or "
                                f"(\"L3.N5\", op, value), got {shown(item, 80)}")
        spec = cls(name, tuple(parsed), ModelShape.of(model) if model is not None else None, meta,
                   _layer_ops(layers, "layers"))
        if model is not None:
            spec.validate(model)
        return spec

    def with_edits(self, edits, name: str | None = None) -> "Spec":
        return Spec(name or self.name, tuple(edits), self.model, dict(self.meta), self.layers)

    def scaled(self, strength: float) -> "Spec":
        """The spec at ``strength``: 0 = unchanged model, 1 = as built, in between (or beyond) interpolated.

        Each vector's edits fold to ``a -> a*m + c`` (:meth:`affine`); strength ``s`` gives
        ``a -> (1-s)*a + s*(a*m + c)``, one ``scale`` and (when ``c != 0``) one ``add``. This is the
        one meaning of "strength" everywhere (sweeps, benchmarks, CLI, demo); layer ops are kept.
        """
        if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not math.isfinite(strength):
            raise SpecError(f"strength must be a finite number, got {strength!r}")
        if strength == 1:
            return self
        edits = []
        for (layer, index), (m, c) in self.affine().items():
            edits.append(Edit(layer, index, "scale", 1 + strength * (m - 1)))
            if c:
                edits.append(Edit(layer, index, "add", strength * c))
        return self.with_edits(edits)

    def first(self, n: int) -> "Spec":
        """The edits of the first ``n`` distinct vectors (builders list vectors best first)."""
        order = list(dict.fromkeys((e.layer, e.index) for e in self.edits))
        if isinstance(n, bool) or not isinstance(n, int) or n < 1 or n > len(order):
            raise SpecError(f"spec {self.name!r} has {len(order)} vectors; cannot keep the first {n!r}")
        keep = set(order[:n])
        return self.with_edits([e for e in self.edits if (e.layer, e.index) in keep])

    def combined(self, *others: "Spec", name: str | None = None) -> "Spec":
        """This spec's edits, then each of ``others``' (edits of one vector compose in order): two
        interventions as one, e.g. detox down + positive up in a single ``generate``."""
        edits = list(self.edits)
        layers = list(self.layers)
        for other in others:
            edits += other.edits
            layers += other.layers
        joined = Spec(name or "+".join([self.name] + [o.name for o in others]), tuple(edits), self.model,
                      dict(self.meta), ())
        return Spec(joined.name, joined.edits, joined.model, joined.meta, _layer_ops(layers, "combined layers"))

    def affine(self) -> dict[tuple[int, int], tuple[float, float]]:
        """Each edited vector's edits, applied in order, folded into ``a -> a*m + c``: ``(layer, index) -> (m, c)``."""
        folded: dict[tuple[int, int], tuple[float, float]] = {}
        for e in self.edits:
            m, c = folded.get((e.layer, e.index), (1.0, 0.0))
            folded[(e.layer, e.index)] = {"scale": (m * e.value, c * e.value), "set": (0.0, e.value),
                                          "add": (m, c + e.value)}[e.op]
        return folded

    # -- (de)serialization -----------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name}
        if self.model is not None:
            out["model"] = asdict(self.model)
        if self.meta:
            out["meta"] = self.meta
        out["edits"] = [e.to_dict() for e in self.edits]
        if self.layers:
            out["layers"] = [op.to_dict() for op in self.layers]
        return out

    @classmethod
    def from_dict(cls, data: Any, source: str = "spec") -> "Spec":
        if not isinstance(data, dict):
            raise SpecError(f"{source}: expected a mapping with 'name' and 'edits'")
        unknown = set(data) - {"name", "model", "edits", "meta", "layers"}
        if unknown:
            raise SpecError(f"{source}: unknown key(s) {sorted(map(str, unknown))}; allowed: name, model, edits, meta, layers")
        if not isinstance(data.get("name"), str) or not data["name"].strip():
            raise SpecError(f"{source}: 'name' must be a non-empty string")
        items = data.get("edits")
        if items is not None and not isinstance(items, list):
            raise SpecError(f"{source}: 'edits' must be a list of {{vector, op, value}} entries, got {shown(items)}")
        meta = data.get("meta")
        if meta is not None and not isinstance(meta, dict):
            raise SpecError(f"{source}: 'meta' must be a mapping, got {shown(meta)}")
        edits = []
        for i, item in enumerate(items or []):
            where = f"{source}: edits[{i}]"
            if not isinstance(item, dict) or set(item) != {"vector", "op", "value"}:
                raise SpecError(f"{where} must have exactly the keys vector, op, value; got {shown(item, 80)}")
            try:
                vector = VectorName.parse(str(item["vector"]))
                edits.append(Edit(vector.layer, vector.index, item["op"], item["value"]))
            except (SpecError, ValueError) as err:
                raise SpecError(f"{where}: {err}") from None
        model = _shape(data.get("model"), source)
        layers = _layer_ops(data.get("layers") or [], f"{source}: layers")
        return cls(data["name"], tuple(edits), model, dict(meta or {}), layers)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        text = (yaml.safe_dump(self.to_dict(), sort_keys=False) if path.suffix in (".yaml", ".yml")
                else json.dumps(self.to_dict(), indent=2) + "\n")
        path.write_text(text, encoding="utf-8")
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Spec":
        """A spec file (JSON, or YAML by its suffix); every problem is a :class:`SpecError` naming the file."""
        try:
            data = load_data(path, "spec")
        except SteerError as err:
            raise SpecError(str(err)) from None
        return cls.from_dict(data, str(path))

    # -- checks ----------------------------------------------------------------------------
    def validate(self, model) -> "Spec":
        """Raise :class:`SpecError` unless every edit exists in ``model`` and shapes match."""
        shape = ModelShape.of(model)
        if self.model is not None and (self.model.n_layers, self.model.d_ff, self.model.d_model) != (
            shape.n_layers, shape.d_ff, shape.d_model
        ):
            raise SpecError(
                f"spec {self.name!r} was made for {self.model.name} ({self.model.n_layers} layers, "
                f"d_ff {self.model.d_ff}, d_model {self.model.d_model}) but this model is {shape.name} "
                f"({shape.n_layers} layers, d_ff {shape.d_ff}, d_model {shape.d_model})"
            )
        for edit in self.edits:
            if edit.layer >= shape.n_layers:
                raise SpecError(f"{edit.name}: unknown layer {edit.layer}; this model has layers 0..{shape.n_layers - 1}")
            if edit.index >= shape.d_ff:
                raise SpecError(f"{edit.name}: index {edit.index} out of range; layers have {shape.d_ff} value vectors")
        if self.layers:
            check_ops_for(model, self.layers, f"spec {self.name!r}: layers")
        return self


def _shape(model: Any, source: str) -> ModelShape | None:
    """The ``model`` entry of a spec file: name, n_layers, d_ff and d_model, each of its type."""
    if model is None:
        return None
    if not isinstance(model, dict) or set(model) != {"name", "n_layers", "d_ff", "d_model"}:
        raise SpecError(f"{source}: 'model' needs name, n_layers, d_ff, d_model; got {shown(model, 80)}")
    if not isinstance(model["name"], str):
        raise SpecError(f"{source}: model.name must be a string, got {shown(model['name'])}")
    try:
        sizes = {k: whole(model[k], f"model.{k}", low=1) for k in ("n_layers", "d_ff", "d_model")}
    except SteerError as err:
        raise SpecError(f"{source}: {err}") from None
    return ModelShape(model["name"], **sizes)


def _layer_ops(items, where: str) -> tuple:
    """Parse layer ops (LayerOp or dict items) and check they do not overlap."""
    if not isinstance(items, (list, tuple)):
        raise SpecError(f"{where} must be a list of layer ops, e.g. [{{op: skip, layers: [3]}}]")
    ops = tuple(x if isinstance(x, LayerOp) else LayerOp.from_dict(x, f"{where}[{i}]") for i, x in enumerate(items))
    check_ops(ops, None, where)
    return ops
