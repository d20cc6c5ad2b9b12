"""Applying specs: edit FFN coefficients while a model runs.

Every edit of a layer is folded into one affine map on the coefficients it touches,
``a[idx] <- a[idx] * mult + add`` (``scale``: mult=v; ``set``: mult=0, add=v; ``add``: add=v;
edits of one vector compose in order), applied by one forward pre-hook on the layer's FFN
output projection. Untouched coefficients are never written, so an empty spec or ``scale 1.0``
leaves logits bit-identical. ``mult``/``add`` have one row per spec, so one batch can carry a
different spec on every row (rows are repeated for beams and ``num_return_sequences``).

Two ways in:

>>> with steering(model, spec):                                   # doctest: +SKIP
...     out = model.generate(**inputs, max_new_tokens=20)
>>> out = model.generate(**inputs, logits_processor=[SteeringProcessor(model, spec)])  # doctest: +SKIP
"""
from __future__ import annotations

import functools
from contextlib import ExitStack, contextmanager
from typing import Iterator, Sequence

import torch
from transformers import LogitsProcessor

from .compat import may_compile, repeat_factor
from .errors import SteerError
from .families import Adapter
from .hooks import has_replaced_forward, hooks
from .layers import layer_ops, shared_ops
from .slots import install_slots, is_compiled, slots_of
from .spec import Spec

SpecLike = Spec | None
Specs = SpecLike | Sequence[SpecLike]


class LayerEdit:
    """The affine coefficient map of one layer, for R rows (R=1: the same for every row).

    As an eager pre-hook it counts its calls (``calls``): a forward that ran without it, such
    as a compiled step captured before it was attached, shows up as a count that stood still.
    """

    def __init__(self, index: torch.Tensor, mult: torch.Tensor, add: torch.Tensor):
        self.index, self.mult, self.add = index, mult, add
        self.scale_only = not bool(add.any())
        self.calls = 0
        self._on: dict[tuple, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def _tensors(self, like: torch.Tensor):
        key = (like.device, like.dtype)
        if key not in self._on:
            self._on[key] = (self.index.to(like.device), self.mult.to(like.device, like.dtype),
                             self.add.to(like.device, like.dtype))
        return self._on[key]

    def __call__(self, module: torch.nn.Module, args: tuple) -> tuple | None:
        self.calls += 1
        coefficients = args[0]
        index, mult, add = self._tensors(coefficients)
        rows = mult.shape[0]
        if rows > 1:
            batch = coefficients.shape[0]
            if batch % rows:
                raise SteerError(f"per-row steering got {rows} specs for a batch of {batch} rows")
            if batch != rows:  # beams / num_return_sequences repeat each row consecutively
                mult, add = mult.repeat_interleave(batch // rows, 0), add.repeat_interleave(batch // rows, 0)
            shape = (batch,) + (1,) * (coefficients.dim() - 2) + (index.numel(),)
            mult, add = mult.view(shape), add.view(shape)
        selected = coefficients[..., index]
        edited = selected * mult if self.scale_only else torch.addcmul(add, selected, mult)
        if torch.is_grad_enabled() and coefficients.requires_grad:
            coefficients = coefficients.clone()
            coefficients[..., index] = edited
            return (coefficients,) + tuple(args[1:])
        coefficients[..., index] = edited  # in place: no copy of the (batch, seq, d_ff) tensor
        return None


def compile_specs(model: torch.nn.Module, specs: Specs) -> dict[int, LayerEdit]:
    """Fold one spec (or one per row) into per-layer affine maps, validating each against ``model``."""
    rows = list(specs) if isinstance(specs, (list, tuple)) else [specs]
    if not rows:
        raise ValueError("steering needs a spec, or one spec (or None) per batch row")
    for spec in rows:
        if spec is not None:
            spec.validate(model)
    shared_ops(rows)  # layer ops: one set for the whole batch
    folded = [spec.affine() if spec is not None else {} for spec in rows]
    per_layer: dict[int, list[int]] = {}
    for row in folded:
        for layer, index in row:
            indices = per_layer.setdefault(layer, [])
            if index not in indices:
                indices.append(index)
    compiled = {}
    for layer, indices in per_layer.items():
        mult = torch.ones(len(rows), len(indices), dtype=torch.float64)
        add = torch.zeros(len(rows), len(indices), dtype=torch.float64)
        for r, row in enumerate(folded):
            for i, index in enumerate(indices):
                mult[r, i], add[r, i] = row.get((layer, index), (1.0, 0.0))
        compiled[layer] = LayerEdit(torch.tensor(indices), mult, add)
    return compiled


@contextmanager
def steering(model: torch.nn.Module, specs: Specs) -> Iterator[dict[int, LayerEdit]]:
    """Apply ``specs`` (value-vector edits and layer ops) to every forward inside the block; undone on any exit.

    A model with steering slots (``steer.slots``: compiled or compiling models get them) is
    steered through the slots, inside its compiled graph; any other through eager pre-hooks.
    """
    wrapped = hasattr(model, "_orig_mod")  # torch.compile(model) wraps the module: calls to it run compiled
    model = getattr(model, "_orig_mod", model)
    compiled = compile_specs(model, specs)
    ops = shared_ops(specs)
    slots = slots_of(model)
    if slots is None and (wrapped or is_compiled(model)):
        slots = install_slots(model)
    if slots is not None:
        if ops:
            raise SteerError("layer ops (skip, reorder, parallel, repeat) change the control flow and cannot run "
                             "inside a compiled step: generate without a static cache or compile for them")
        with slots.applied(compiled):
            yield compiled
        return
    adapter = Adapter(model)
    with hooks(*[(adapter.ffn_out(layer), "pre", edit) for layer, edit in compiled.items()]), layer_ops(model, ops):
        yield compiled


class HookedProcessor(LogitsProcessor):
    """A ``LogitsProcessor`` whose real work is forward hooks, attached for one ``generate`` call.

    Logits processors are first called *after* the prompt's forward pass, too late to steer
    it, so importing steer wraps transformers' ``GenerationMixin.generate`` once: when the call
    carries HookedProcessors, the wrapper enters their :meth:`hooks` context before the first
    forward and leaves it when ``generate`` returns or raises (KeyboardInterrupt included);
    without one it calls the original directly. Scores pass through unchanged.
    Subclasses: :class:`SteeringProcessor` (value-vector edits), ``steer.baselines.ActAddProcessor``.
    """

    model: torch.nn.Module

    def hooks(self):
        """A context manager that attaches this processor's hooks to ``self.model``."""
        raise NotImplementedError

    @contextmanager
    def attached(self, factor: int = 1) -> Iterator[None]:
        """``factor``: rows ``generate`` makes of each input row (beams x return sequences)."""
        with self.hooks():
            self.active = True
            try:
                yield
            finally:
                self.active = False

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if not getattr(self, "active", False):
            raise RuntimeError(
                f"{type(self).__name__} was not attached: this model's class overrides generate(); "
                "wrap the call in the processor's `hooks()` context (for specs: `with steering(model, spec):`) instead"
            )
        return scores


class SteeringProcessor(HookedProcessor):
    """Pass to ``model.generate(logits_processor=[...])`` to steer that generation only.

    Several in one call compose in list order (edits of one vector apply one after the other),
    e.g. a detox spec and a "positive" spec together. See :class:`HookedProcessor` for how the
    hooks reach the prompt's forward pass. A ``generate`` that may compile its decode step (a
    static cache, a ``compile_config``, a compiled model) steers through slots inside the graph
    (steer.slots). At every eager step the processor checks that the edits ran in the forward
    that produced the scores, and raises otherwise: steering is never dropped silently.

    >>> model.generate(**inputs, logits_processor=[SteeringProcessor(model, spec)])  # doctest: +SKIP
    """

    def __init__(self, model: torch.nn.Module, specs: Specs):
        compile_specs(model, specs)  # validate now, not mid-generation
        self.model, self.specs = getattr(model, "_orig_mod", model), specs
        self.active = False
        self._edit: LayerEdit | None = None  # one eager hook to watch (None: slots, or nothing to edit)
        self._seen = 0

    def hooks(self):
        return steering(self.model, self.specs)

    @contextmanager
    def attached(self, factor: int = 1) -> Iterator[None]:
        with steering(self.model, self.specs) as compiled:
            slots = slots_of(self.model)
            if slots is not None:
                slots.set_factor(factor)
            self._edit = None if slots is not None else next(iter(compiled.values()), None)
            self._seen = self._edit.calls if self._edit is not None else 0
            self.active = True
            try:
                yield
            finally:
                self.active = False
                self._edit = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        scores = super().__call__(input_ids, scores)
        if self._edit is not None:
            if self._edit.calls == self._seen:
                raise SteerError(
                    "steering edits did not run in this decoding step: the forward was compiled without "
                    "them. Call steer.install_slots(model) before compiling, or generate without compiling")
            self._seen = self._edit.calls
        return scores


def _processors_in(args: tuple, kwargs: dict) -> list[HookedProcessor]:
    candidates = [kwargs.get("logits_processor")] + [a for a in args if isinstance(a, list)]
    return [p for group in candidates if group for p in group if isinstance(p, HookedProcessor)]


def _wrap_generate() -> None:
    """Make ``GenerationMixin.generate`` attach the HookedProcessors it is given (once per process)."""
    from transformers.generation.utils import GenerationMixin

    original = GenerationMixin.generate
    if getattr(original, "_steer_wrapped", False):
        return

    @functools.wraps(original)
    def generate(self, *args, **kwargs):
        processors = _processors_in(args, kwargs)
        compiling = may_compile(self, kwargs)
        if compiling and has_replaced_forward(self):
            raise SteerError("early exit and layer ops change the control flow and run on the eager path: "
                             "inside them, generate without a static cache or compile_config")
        if not processors:
            return original(self, *args, **kwargs)
        if compiling:
            install_slots(self)
        factor = repeat_factor(self, kwargs)
        with ExitStack() as stack:
            for processor in processors:
                if processor.model is not self:
                    raise ValueError(f"a {type(processor).__name__} was passed to the generate() of another model")
                if compiling and not isinstance(processor, SteeringProcessor):
                    raise SteerError(f"{type(processor).__name__} works through eager hooks, which a compiled decode "
                                     "step would skip: generate without a static cache / compile_config for it")
                stack.enter_context(processor.attached(factor))
            return original(self, *args, **kwargs)

    generate._steer_wrapped = True  # type: ignore[attr-defined]
    GenerationMixin.generate = generate


_wrap_generate()
