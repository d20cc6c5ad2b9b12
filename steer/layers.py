"""Layer ops (Sun et al. 2024, "Transformer Layers as Painters"): skip, reorder, parallel, repeat.

Ops rewrite *positions* of the layer stack; each position is touched by at most one op::

    layers:
      - {op: skip, layers: [3, 5]}                      # positions 3 and 5 pass their input through
      - {op: reorder, range: [8, 11], order: [11, 10, 9, 8]}   # position 8 runs layer 11, ...
      - {op: parallel, range: [14, 17]}                 # layers 14..17 read one input, outputs averaged
                                                          # (for residual blocks: h + mean of their updates)
      - {op: repeat, layer: 20, times: 2}               # layer 20 runs twice in a row

Ranges are inclusive (``[8, 11]`` is four layers). While :func:`layer_ops` is active, each touched
layer's ``forward`` is replaced by its position's program and restored in ``finally``
(tuned-lens ``model_surgery`` style); the ModuleList, the weights and the model's own loop are
left alone, so value-vector hooks, ``output_hidden_states`` and ``generate`` work unchanged.
Hooks on a decoder layer module see its *position*'s input and output; a layer run at another
position (reorder, parallel, repeat) is called through its original forward, so its FFN hooks fire
every time it runs. A position is called with the attention mask of its own type, so on models
mixing sliding and full attention a layer may only run at a position of its type (checked).

KV cache. Every *execution* of a layer gets its own cache slot: the k-th executed layer of an
attention type (full, sliding, ...) writes the k-th slot of that type, and executions beyond the
model's slots (repeats) get slots appended to the cache. A skipped layer writes nothing, and the
slots the model itself reads (slot 0 for positions, the first slot of each type for masks) always
belong to a layer that ran, so skipping layer 0 still gives correct positions. With no op the
mapping is the identity. The slot is set through the attention module's ``layer_idx`` for the
duration of the call.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch

from .compat import cache_layer_types, find_cache
from .hooks import replaced_forwards
from .families import Adapter
from .errors import SpecError

OPS = ("skip", "reorder", "parallel", "repeat")
_KEYS = {"skip": {"op", "layers"}, "reorder": {"op", "range", "order"}, "parallel": {"op", "range"},
         "repeat": {"op", "layer", "times"}}
_EXAMPLE = {"skip": "{op: skip, layers: [3]}", "reorder": "{op: reorder, range: [4, 7], order: [7, 6, 5, 4]}",
            "parallel": "{op: parallel, range: [4, 7]}", "repeat": "{op: repeat, layer: 5, times: 2}"}

Program = tuple[tuple[int, ...], ...]  # steps run in sequence; a step's layers read one input, outputs averaged


def _int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise SpecError(f"{what} must be an integer, got {value!r}")
    if value < 0:
        raise SpecError(f"{what} must be >= 0, got {value}")
    return value


@dataclass(frozen=True)
class LayerOp:
    """One op. ``layers``: the positions it touches, in order (a range's every layer)."""

    op: str
    layers: tuple[int, ...]
    order: tuple[int, ...] = ()  # reorder: the layer run at each position of the range
    times: int = 1  # repeat: how many runs in total (1 = unchanged)

    def __post_init__(self) -> None:
        if self.op not in OPS:
            raise SpecError(f"unknown layer op {self.op!r}: use one of {', '.join(OPS)}")
        if not self.layers:
            raise SpecError(f"{self.op}: no layers given (an empty range?)")
        for layer in self.layers:
            _int(layer, f"{self.op}: layer")
        if len(set(self.layers)) != len(self.layers):
            raise SpecError(f"{self.op}: layer listed twice in {list(self.layers)}")
        if self.op in ("reorder", "parallel") and list(self.layers) != list(range(self.layers[0], self.layers[-1] + 1)):
            raise SpecError(f"{self.op}: layers must be one contiguous range, got {list(self.layers)}")
        if self.op == "reorder" and sorted(self.order) != list(self.layers):
            raise SpecError(f"reorder {self.span}: order {list(self.order)} must list each layer of the range exactly once")
        if self.op == "repeat":
            if len(self.layers) != 1:
                raise SpecError(f"repeat takes one layer, got {list(self.layers)}")
            if _int(self.times, "repeat: times") < 1:
                raise SpecError("repeat: times must be >= 1 (the total number of runs)")

    # -- construction ----------------------------------------------------------------------
    @classmethod
    def skip(cls, *layers: int) -> "LayerOp":
        return cls("skip", tuple(sorted(layers)))

    @classmethod
    def reorder(cls, first: int, last: int, order: Sequence[int]) -> "LayerOp":
        return cls("reorder", _range(first, last, "reorder"), tuple(order))

    @classmethod
    def parallel(cls, first: int, last: int) -> "LayerOp":
        return cls("parallel", _range(first, last, "parallel"))

    @classmethod
    def repeat(cls, layer: int, times: int = 2) -> "LayerOp":
        return cls("repeat", (layer,), times=times)

    @property
    def span(self) -> str:
        return f"{self.layers[0]}..{self.layers[-1]}"

    def __str__(self) -> str:
        if self.op == "skip":
            return "skip " + ",".join(map(str, self.layers))
        if self.op == "reorder":
            return f"reorder {self.span} as " + ",".join(map(str, self.order))
        if self.op == "parallel":
            return f"parallel {self.span}"
        return f"repeat {self.layers[0]} x{self.times}"

    # -- (de)serialization -----------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        if self.op == "skip":
            return {"op": "skip", "layers": list(self.layers)}
        if self.op == "repeat":
            return {"op": "repeat", "layer": self.layers[0], "times": self.times}
        out: dict[str, Any] = {"op": self.op, "range": [self.layers[0], self.layers[-1]]}
        if self.op == "reorder":
            out["order"] = list(self.order)
        return out

    @classmethod
    def from_dict(cls, data: Any, where: str = "layer op") -> "LayerOp":
        try:
            if not isinstance(data, dict) or data.get("op") not in OPS:
                got = data.get("op") if isinstance(data, dict) else data
                raise SpecError(f"unknown layer op {got!r}: use one of {', '.join(OPS)}")
            op = data["op"]
            if set(data) != _KEYS[op]:
                raise SpecError(f"{op} needs exactly the keys {', '.join(sorted(_KEYS[op]))}, e.g. {_EXAMPLE[op]}; "
                                f"got {sorted(data)}")
            if op == "skip":
                layers = data["layers"]
                if isinstance(layers, int) and not isinstance(layers, bool):
                    layers = [layers]
                if not isinstance(layers, list):
                    raise SpecError(f"skip: 'layers' must be a list of layer numbers, got {layers!r}")
                return cls("skip", tuple(_int(x, "skip: layer") for x in layers))
            if op == "repeat":
                return cls("repeat", (_int(data["layer"], "repeat: layer"),), times=_int(data["times"], "repeat: times"))
            span = data["range"]
            if not isinstance(span, list) or len(span) != 2:
                raise SpecError(f"{op}: 'range' must be [first, last] (inclusive), got {span!r}")
            layers = _range(_int(span[0], f"{op}: range start"), _int(span[1], f"{op}: range end"), op)
            if op == "parallel":
                return cls("parallel", layers)
            order = data["order"]
            if not isinstance(order, list):
                raise SpecError(f"reorder: 'order' must be a list of the range's layers, got {order!r}")
            return cls("reorder", layers, tuple(_int(x, "reorder: order entry") for x in order))
        except SpecError as err:
            raise SpecError(f"{where}: {err}") from None


def _range(first: int, last: int, op: str) -> tuple[int, ...]:
    if last < first:
        raise SpecError(f"{op}: empty range [{first}, {last}]: ranges are inclusive [first, last] with first <= last")
    return tuple(range(first, last + 1))


# -- checks and plans --------------------------------------------------------------------------
def check_ops(ops: Sequence[LayerOp], n_layers: int | None = None, where: str = "layers") -> None:
    """Raise :class:`SpecError` for ops that overlap or name layers the model does not have."""
    owner: dict[int, int] = {}
    for i, op in enumerate(ops):
        if not isinstance(op, LayerOp):
            raise SpecError(f"{where}[{i}]: expected a LayerOp, got {op!r}")
        for layer in op.layers + op.order:
            if n_layers is not None and layer >= n_layers:
                raise SpecError(f"{where}[{i}] ({op}): unknown layer {layer}; this model has layers 0..{n_layers - 1}")
        for layer in op.layers:
            if layer in owner:
                j = owner[layer]
                raise SpecError(f"{where}: overlapping ops: [{j}] ({ops[j]}) and [{i}] ({op}) both touch layer {layer}")
            owner[layer] = i


def programs(ops: Sequence[LayerOp], n_layers: int) -> list[Program]:
    """What each position runs: ``((i,),)`` for an untouched position, ``()`` for a skipped one."""
    check_ops(ops, n_layers)
    plan: list[Program] = [((i,),) for i in range(n_layers)]
    for op in ops:
        if op.op == "skip":
            for layer in op.layers:
                plan[layer] = ()
        elif op.op == "reorder":
            for position, layer in zip(op.layers, op.order):
                plan[position] = ((layer,),)
        elif op.op == "parallel":
            plan[op.layers[0]] = (op.layers,)
            for position in op.layers[1:]:
                plan[position] = ()
        else:
            plan[op.layers[0]] = ((op.layers[0],),) * op.times
    return plan


def executed_layers(ops: Sequence[LayerOp], n_layers: int) -> list[int]:
    """Layers in the order they run (a layer per execution): its length over ``n_layers`` is the compute share."""
    return [layer for program in programs(ops, n_layers) for step in program for layer in step]


def layer_types(model) -> tuple[list[str], list[dict]]:
    """Each layer's attention type and cache-layer kwargs, as transformers' DynamicCache sees them."""
    return cache_layer_types(model, Adapter(model).n_layers)


def check_ops_for(model, ops: Sequence[LayerOp], where: str = "layers") -> None:
    """Raise :class:`SpecError` unless ``ops`` fit ``model``: layers exist, no layer moves to another attention type.

    A position is called with the attention mask of its own type, so on models mixing sliding and
    full attention (Gemma 2) a layer can only run at a position of its own type.
    """
    n = Adapter(model).n_layers
    check_ops(ops, n, where)
    types, _ = layer_types(model)
    for position, program in enumerate(programs(ops, n)):
        for layer in (x for step in program for x in step):
            if types[layer] != types[position]:
                raise SpecError(f"{where}: layer {layer} ({types[layer]}) cannot run at position {position} "
                                f"({types[position]}): this model mixes attention types")


def _slots(model, plan: list[Program]) -> tuple[list[list[tuple[int, ...]]], list[tuple[str, dict]]]:
    """Cache slot of every execution (see the module docstring) and the extra slots to append."""
    types, kwargs = layer_types(model)
    n = len(types)
    free: dict[str, list[int]] = {}
    for i, kind in enumerate(types):
        free.setdefault(kind, []).append(i)
    used: dict[str, int] = {}
    extra: list[tuple[str, dict]] = []
    slots = []
    for program in plan:
        program_slots = []
        for step in program:
            step_slots = []
            for layer in step:
                kind = types[layer]
                k = used.get(kind, 0)
                used[kind] = k + 1
                if k < len(free.get(kind, ())):
                    step_slots.append(free[kind][k])
                else:
                    step_slots.append(n + len(extra))
                    extra.append((kind, kwargs[layer]))
            program_slots.append(tuple(step_slots))
        slots.append(program_slots)
    return slots, extra


def _ensure_slots(cache, n: int, extra: list[tuple[str, dict]]) -> None:
    """Append cache layers for executions beyond the model's own slots (repeats)."""
    layers = getattr(cache, "layers", None)
    if getattr(cache, "layer_class_to_replicate", None) is not None or (layers is not None and len(layers) >= n + len(extra)):
        return  # a lazily growing cache appends its own layers
    from transformers.cache_utils import DYNAMIC_LAYER_TYPE_MAPPING, DynamicCache

    if not isinstance(cache, DynamicCache) or layers is None or len(layers) < n:
        raise ValueError(f"repeated layers need extra cache slots, which only a DynamicCache can add; "
                         f"got {type(cache).__name__}: generate with the default cache")
    while len(layers) < n + len(extra):
        kind, kw = extra[len(layers) - n]
        layers.append(DYNAMIC_LAYER_TYPE_MAPPING[kind](**kw))


def _tensor(output: Any) -> torch.Tensor:
    if not isinstance(output, torch.Tensor):
        raise TypeError(f"a decoder layer returned {type(output).__name__}, not a tensor: layer ops need "
                        "transformers >= 5, whose decoder layers return the hidden states")
    return output


class _Position:
    """The replacement ``forward`` of one position: runs its program with its layers' original forwards."""

    def __init__(self, forwards: list[Callable], slot_modules: list[list], program: Program,
                 slots: list[tuple[int, ...]], n: int, extra: list, replay: torch.Tensor | None):
        self.forwards, self.slot_modules, self.program, self.slots = forwards, slot_modules, program, slots
        self.n, self.extra, self.replay = n, extra, replay

    def _run(self, layer: int, slot: int, hidden: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
        modules = self.slot_modules[layer]
        if not modules or modules[0].layer_idx == slot:
            return _tensor(self.forwards[layer](hidden, *args, **kwargs))
        saved = [m.layer_idx for m in modules]
        try:
            for module in modules:
                module.layer_idx = slot
            return _tensor(self.forwards[layer](hidden, *args, **kwargs))
        finally:
            for module, idx in zip(modules, saved):
                module.layer_idx = idx

    def __call__(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        if args:
            hidden, args = args[0], args[1:]
        else:
            hidden = kwargs.pop("hidden_states")
        if self.replay is not None:
            return self.replay
        if self.extra:
            cache = find_cache(args, kwargs)
            if cache is not None:
                _ensure_slots(cache, self.n, self.extra)
        for step, slots in zip(self.program, self.slots):
            outputs = [self._run(layer, slot, hidden, args, kwargs) for layer, slot in zip(step, slots)]
            hidden = outputs[0] if len(outputs) == 1 else torch.stack(outputs).mean(0)
        return hidden


@contextmanager
def layer_ops(model: torch.nn.Module, ops: Sequence[LayerOp], *,
              replay: Sequence[torch.Tensor] | None = None) -> Iterator[None]:
    """Run ``model`` with ``ops`` applied inside the block (forward and ``generate``); restored on any exit.

    ``replay``: outputs of the first ``len(replay)`` positions from an earlier run on the same
    input; those positions return them instead of computing (the cheap layer scan).
    """
    ops = tuple(ops)
    replay = list(replay or ())
    if not ops and not replay:
        yield
        return
    check_ops_for(model, ops)
    layers = list(Adapter(model).layers)
    n = len(layers)
    plan = programs(ops, n)
    slots, extra = _slots(model, plan)
    forwards = [layer.forward for layer in layers]  # bound, or someone else's patch: call what would run
    slot_modules = [[m for m in layer.modules() if isinstance(getattr(m, "layer_idx", None), int)] for layer in layers]
    replaced = []
    for i, layer in enumerate(layers):
        fixed = replay[i] if i < len(replay) else None
        if fixed is None and plan[i] == ((i,),) and slots[i] == [(i,)]:
            continue  # untouched position, own slot
        replaced.append((layer, _Position(forwards, slot_modules, plan[i], slots[i], n, extra, fixed)))
    with replaced_forwards(replaced):
        yield


def shared_ops(specs) -> tuple[LayerOp, ...]:
    """The layer ops of one spec, or of per-row specs (which must agree: a batch runs one layer stack)."""
    rows = list(specs) if isinstance(specs, (list, tuple)) else [specs]
    found = {tuple(getattr(spec, "layers", ()) or ()) for spec in rows}
    if len(found) > 1:
        raise ValueError("per-row specs must share their layer ops (one batch runs one layer stack); "
                         f"got {len(found)} different ones: " + "; ".join(", ".join(map(str, ops)) or "none" for ops in found))
    return found.pop() if found else ()
