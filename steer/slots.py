"""Steering inside a compiled, graph-captured decode step: fixed-shape slots every layer reads.

``model.generate(..., cache_implementation="static")`` on a GPU compiles the decode step and
replays it as a CUDA graph; a hook attached after that capture never runs in the replayed
steps. Slots make the edits part of the graph: every layer's FFN output projection gets, once,
a permanent pre-hook and four small non-persistent buffers

* ``index`` (K,): the coefficients the layer may edit (unused entries name other, untouched ones),
* ``mult``, ``add`` (S, K): the affine map ``a -> a*mult + add`` of each spec row (identity: 1, 0),
* ``rows`` (B,): which spec row each batch row uses (beams and ``num_return_sequences`` repeat rows),

so one capture serves every spec: steering, changing the spec or its strength, or giving each
row of a batch its own spec rewrites the buffers' *contents* (``copy_``), which neither
recompiles nor re-captures. A layer with nothing to edit computes ``a*1 + 0`` on K coefficients:
bit-identical output at the cost of two tiny gathers. A spec needing more than K edits in one
layer, or more than S spec rows, grows the buffers once (one recompile).

:func:`steering` and :class:`SteeringProcessor` use the slots whenever a model has them, and put
them on a model that is compiled or about to compile its decode step. Install them yourself
before compiling to choose the capacity:

>>> install_slots(model, edits_per_layer=128)                     # doctest: +SKIP
>>> model.forward = torch.compile(model.forward, mode="reduce-overhead")   # doctest: +SKIP

Layer ops (skip, reorder) and early exit change the control flow and stay on the eager path.
"""
from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Any, Iterator

import torch
from torch import nn

from .errors import SteerError
from .families import Adapter

LayerEdits = dict[int, Any]  # layer -> steering.LayerEdit (index, mult (R, n), add (R, n))

log = logging.getLogger(__name__)
_ATTR = "_steer_slots"
_BUFFERS = ("_steer_index", "_steer_mult", "_steer_add", "_steer_rows")


class _SlotHook:
    """The pre-hook of one layer: tensor ops only, so it traces into any compiled graph (the
    batch check runs in eager calls only, e.g. transformers' uncompiled prefill)."""

    def __init__(self, slots: "SteeringSlots | None"):
        self.slots = slots

    def __call__(self, module: nn.Module, args: tuple) -> tuple:
        a = args[0]
        if self.slots is not None and not torch.compiler.is_compiling():
            self.slots.check_batch(a.shape[0])
        rows = module._steer_rows[: a.shape[0]]
        shape = (a.shape[0],) + (1,) * (a.dim() - 2) + (-1,)
        mult = module._steer_mult.index_select(0, rows).view(shape).to(a.dtype)
        add = module._steer_add.index_select(0, rows).view(shape).to(a.dtype)
        index = module._steer_index
        edited = torch.addcmul(add, a.index_select(-1, index), mult)
        if torch.is_grad_enabled() and a.requires_grad or torch.compiler.is_compiling():
            return (a.index_copy(-1, index, edited),) + tuple(args[1:])
        a.index_copy_(-1, index, edited)  # eager: no copy of the (batch, seq, d_ff) tensor
        return (a,) + tuple(args[1:])


class SteeringSlots:
    """The slots of one model (see module docstring); find them with :func:`slots_of`."""

    def __init__(self, model: nn.Module, edits_per_layer: int, spec_rows: int, batch_rows: int):
        self.adapter = Adapter(model)
        self.edits_per_layer, self.spec_rows, self.batch_rows = edits_per_layer, spec_rows, batch_rows
        self.active: list[LayerEdits] = []  # entered steering blocks, outermost first
        self.factor, self.rows = 1, 1  # batch rows per spec row; spec rows of the active blocks
        self.handles = []
        for layer in range(self.adapter.n_layers):
            module = self.adapter.ffn_out(layer)
            self.handles.append(module.register_forward_pre_hook(_SlotHook(self if layer == 0 else None)))
        self._allocate()

    # -- buffers ----------------------------------------------------------------------------
    def _allocate(self) -> None:
        for layer in range(self.adapter.n_layers):
            module = self.adapter.ffn_out(layer)
            weight = self.adapter.value_vectors(layer)
            d_ff = weight.shape[0]
            if self.edits_per_layer > d_ff:
                self.edits_per_layer = d_ff
            k, device, dtype = self.edits_per_layer, weight.device, weight.dtype  # the model's dtype: no cast a step
            module.register_buffer("_steer_index", torch.arange(k, device=device), persistent=False)
            module.register_buffer("_steer_mult", torch.ones(self.spec_rows, k, device=device, dtype=dtype),
                                   persistent=False)
            module.register_buffer("_steer_add", torch.zeros(self.spec_rows, k, device=device, dtype=dtype),
                                   persistent=False)
            module.register_buffer("_steer_rows", torch.zeros(self.batch_rows, dtype=torch.long, device=device),
                                   persistent=False)
        self._edited: set[int] = set()  # layers whose buffers hold more than the identity
        self._row_map: tuple[int, int] | None = None  # (spec rows, factor) the rows buffers hold

    def _grow(self, edits: int, rows: int) -> None:
        edits_per_layer = max(self.edits_per_layer, _round_up(edits))
        spec_rows = max(self.spec_rows, _round_up(rows))
        if (edits_per_layer, spec_rows) == (self.edits_per_layer, self.spec_rows):
            return
        log.warning("steer: growing steering slots to %d edits per layer and %d spec rows; the compiled "
                    "step recompiles once (install_slots(model, edits_per_layer=...) sizes them up front)",
                    edits_per_layer, spec_rows)
        self.edits_per_layer, self.spec_rows = edits_per_layer, spec_rows
        self._allocate()

    # -- contents ---------------------------------------------------------------------------
    def write(self) -> None:
        """Fold the active blocks (applied in the order entered) into the buffers' contents."""
        rows = max([edit.mult.shape[0] for entry in self.active for edit in entry.values()], default=1)
        per_layer = _compose(self.active, rows)
        self._grow(max((len(index) for index, _, _ in per_layer.values()), default=0), rows)
        for layer in sorted(set(per_layer) | self._edited):  # the rest already holds the identity
            module = self.adapter.ffn_out(layer)
            index, mult, add = per_layer.get(layer, ([], None, None))
            k = self.edits_per_layer
            full_index = _padded(index, k, self.adapter.value_vectors(layer).shape[0])
            full_mult = torch.ones(self.spec_rows, k, dtype=torch.float64)
            full_add = torch.zeros(self.spec_rows, k, dtype=torch.float64)
            if index:
                full_mult[:rows, :len(index)] = mult
                full_add[:rows, :len(index)] = add
            module._steer_index.copy_(full_index)
            module._steer_mult.copy_(full_mult)
            module._steer_add.copy_(full_add)
        self._edited = set(per_layer)
        self.rows = rows
        self.set_factor(self.factor)

    def set_factor(self, factor: int) -> None:
        """Batch row b uses spec row b // factor (factor = beams x return sequences; 1 spec row: all 0)."""
        self.factor = factor
        if self._row_map == (self.rows, factor):
            return
        self._row_map = (self.rows, factor)
        batch = torch.arange(self.batch_rows)
        rows = torch.zeros_like(batch) if self.rows == 1 else (batch // factor).clamp(max=self.spec_rows - 1)
        for layer in range(self.adapter.n_layers):
            self.adapter.ffn_out(layer)._steer_rows.copy_(rows)

    def check_batch(self, batch: int) -> None:
        """Eager-side check of a forward's batch against the active spec rows (sets the factor)."""
        if batch > self.batch_rows:
            raise SteerError(f"steering slots hold {self.batch_rows} batch rows, this batch has {batch}: "
                             f"install_slots(model, batch_rows={_round_up(batch)})")
        if self.rows > 1:
            if batch % self.rows:
                raise SteerError(f"per-row steering got {self.rows} specs for a batch of {batch} rows")
            if batch // self.rows != self.factor:
                self.set_factor(batch // self.rows)

    @contextmanager
    def applied(self, edits: LayerEdits) -> Iterator[None]:
        """The edits of one steering block live in the slots for the block's duration."""
        self.active.append(edits)
        try:
            self.write()
            yield
        finally:
            self.active.remove(edits)
            self.write()

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        for layer in range(self.adapter.n_layers):
            module = self.adapter.ffn_out(layer)
            for name in _BUFFERS:
                module._buffers.pop(name, None)


def _round_up(n: int, minimum: int = 16) -> int:
    size = minimum
    while size < n:
        size *= 2
    return size


def _padded(index: list[int], k: int, d_ff: int) -> torch.Tensor:
    """``index`` followed by distinct untouched coefficients up to length ``k`` (no duplicates to write)."""
    free = torch.ones(d_ff, dtype=torch.bool)
    free[index] = False
    return torch.cat([torch.tensor(index, dtype=torch.long), free.nonzero()[: k - len(index), 0]])


def _compose(active: list[LayerEdits], rows: int):
    """Per layer: (indices, mult (rows, n), add (rows, n)) of the blocks applied in order."""
    out: dict[int, tuple[list[int], torch.Tensor, torch.Tensor]] = {}
    for entry in active:
        for layer, edit in entry.items():
            index, mult, add = out.get(layer, ([], torch.ones(rows, 0, dtype=torch.float64),
                                               torch.zeros(rows, 0, dtype=torch.float64)))
            new = [i for i in edit.index.tolist() if i not in index]
            index = index + new
            mult = torch.cat([mult, torch.ones(rows, len(new), dtype=torch.float64)], 1)
            add = torch.cat([add, torch.zeros(rows, len(new), dtype=torch.float64)], 1)
            cols = torch.tensor([index.index(i) for i in edit.index.tolist()], dtype=torch.long)
            m, c = edit.mult.expand(rows, -1), edit.add.expand(rows, -1)  # (rows, n_edit): a -> a*m + c after
            mult[:, cols], add[:, cols] = mult[:, cols] * m, add[:, cols] * m + c
            out[layer] = (index, mult, add)
    return out


def slots_of(model: nn.Module) -> SteeringSlots | None:
    return model.__dict__.get(_ATTR)


def install_slots(model: nn.Module, *, edits_per_layer: int = 16, spec_rows: int = 16,
                  batch_rows: int = 256) -> SteeringSlots:
    """Give ``model`` steering slots (once; later calls return them). Graphs compiled before
    without them are dropped (``torch._dynamo.reset()``) so the next compile captures them."""
    slots = slots_of(model)
    if slots is not None:
        return slots
    slots = SteeringSlots(model, edits_per_layer, spec_rows, batch_rows)
    model.__dict__[_ATTR] = slots
    if is_compiled(model) or torch._dynamo.utils.counters["stats"].get("unique_graphs"):
        model.__dict__.pop("_compiled_call", None)
        torch._dynamo.reset()
    return slots


def remove_slots(model: nn.Module) -> None:
    """Take the slots off ``model`` (compiled graphs that captured them are dropped too)."""
    slots = model.__dict__.pop(_ATTR, None)
    if slots is not None:
        if slots.active:
            raise SteerError("remove_slots inside a steering block: leave the block first")
        slots.remove()
        model.__dict__.pop("_compiled_call", None)
        torch._dynamo.reset()


def is_compiled(model: nn.Module) -> bool:
    """Whether ``model``'s forward was compiled (by transformers' generate or by the user)."""
    forward = model.__dict__.get("forward")
    return "_compiled_call" in model.__dict__ or hasattr(forward, "_torchdynamo_orig_callable")
