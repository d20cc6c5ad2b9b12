"""K/V schemes of early exit: how the skipped layers of an exited position get their keys and values.

Later tokens attend to an exited position at every layer, so its key/value entries must exist
(:mod:`generation.runtime` decides the exits; a scheme fills what they leave out). One idea a
class, in the style of transformers' ``logits_process.py``; measured in docs/early_exit.md
(first 1,024 held-out tokens at t = 0.64; exact simulation: 17.2% saved, 93.6% top-1 agreement):

* :class:`Defer` (default, exact): the skipped layers are computed in the next decode step,
  together with the new token. 16.6% saved, 93.6% agreement.
* :class:`HiddenState` (CALM): computed at once from the exited state. 15.8%, 71.1%.
* :class:`MappedState`: computed at once from the mapped state. 16.2%, 26.0%.
* :class:`Recompute` (reference): every layer is computed, only the output comes from the exit.
  93.6% agreement, nothing really saved.

:func:`generation.runtime.early_exit` takes a scheme's name (``propagate="hidden"``, names in
:data:`SCHEMES`) or an instance. A scheme answers the runtime's hooks, with defaults in
:class:`KVScheme`: ``block`` (around an ``early_exit`` block), ``call`` (a layer that runs),
``exited_state`` (what exited rows keep while the others go on), ``keep_going`` (whether to go
on once every row exited), ``stop`` (every row exited) and ``skip`` (a layer after the stop).
"""
from __future__ import annotations

import inspect
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Protocol

import torch
from transformers.cache_utils import Cache

from steer import Adapter
from steer.compat import find_cache, layer_hidden

_POSITION_KWARGS = {"position_embeddings": 1, "position_ids": 1, "cache_position": 0}  # name -> sequence dim


class Counts(Protocol):
    """What a scheme counts into (:class:`generation.runtime.ExitStats`)."""

    deferred: int


class KVScheme:
    """The hooks (see the module docstring); a scheme overrides those its idea needs.

    By default exited rows keep being computed, the batch stops once every row exited, and a
    skipped layer writes no K/V."""

    @contextmanager
    def block(self, model: torch.nn.Module, originals: list[Callable], stats: Counts) -> Iterator[None]:
        """Around an ``early_exit`` block; ``originals``: each layer's own forward."""
        yield

    def call(self, layer: int, original: Callable, hidden: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
        """A layer that runs: its output for ``hidden`` (the new positions of this forward)."""
        return layer_hidden(original(hidden, *args, **kwargs))

    def exited_state(self, state: torch.Tensor, mapped: torch.Tensor) -> torch.Tensor | None:
        """What newly exited rows keep through the later layers (None: they keep being computed)."""
        return None

    def keep_going(self, teacher_forced: bool) -> bool:
        """Whether every layer runs even once every row exited (``teacher_forced``: one pass decides
        every position, so there is no later step)."""
        return False

    def stop(self, layer: int, out: torch.Tensor) -> None:
        """Every row exited after ``layer`` with output ``out``: the later layers are skipped."""

    def skip(self, original: Callable, state: torch.Tensor, args: tuple, kwargs: dict) -> None:
        """A layer after the stop, called with ``state`` (what the rows kept)."""


@dataclass(eq=False)
class _Pending:
    """An exited position whose upper layers are still to be computed (:class:`Defer`)."""

    depth: int  # the last layer computed for it
    state: torch.Tensor  # (batch, 1, d) its output of that layer
    pos: dict  # its position tensors (name -> tensor with a length-1 sequence dim)
    kv: int  # sequence length including it


def _mask_slot(module: torch.nn.Module) -> int | None:
    """Index among ``*args`` (after ``hidden_states``) of a layer's ``attention_mask`` parameter."""
    names = list(inspect.signature(type(module).forward).parameters)[2:]
    return names.index("attention_mask") if "attention_mask" in names else None


def _cat(parts: list, dim: int):
    if isinstance(parts[0], tuple):
        return tuple(torch.cat([p[i] for p in parts], dim) for i in range(len(parts[0])))
    return torch.cat(parts, dim)


class Defer(KVScheme):
    """Exact: an exited position's skipped layers are computed later, with the next token.

    In the next decode step each skipped layer is called once on ``[pending positions, new
    token]``: its cache receives both, in order, and the mask and position tensors are widened to
    match. A decode step reads every weight once whatever the number of positions, so a deferred
    position rides along for about 30% of the layer it skipped (batch 1, CPU), and its K/V are
    exactly the full model's: later tokens see what they would see without early exit. Pending
    positions are completed when the block exits (or before a forward on another cache), so the
    cache then holds every layer for every position. docs/early_exit.md: 16.6% of layers saved at
    93.6% top-1 agreement, as the exact simulation. In a batch, a row that exits keeps being
    computed until the last row exits (so it gets what it would get alone); at batch 4 that left
    nothing skipped.

    >>> from steer.generation import early_exit
    >>> from steer.generation.kv_schemes import Defer
    >>> with early_exit(model, exit_model, 0.6, propagate=Defer()) as stats:  # doctest: +SKIP
    ...     out = model.generate(**inputs, max_new_tokens=40)
    >>> stats.deferred  # position-layers computed later, riding along  # doctest: +SKIP
    """

    @contextmanager
    def block(self, model: torch.nn.Module, originals: list[Callable], stats: Counts) -> Iterator[None]:
        self.originals, self.stats = originals, stats
        self.n_layers = len(originals)
        self.mask_slots = [_mask_slot(layer) for layer in Adapter(model).layers]
        self.eager = getattr(model.config, "_attn_implementation", "eager") == "eager"
        self.pending: list[_Pending] = []
        self.pending_cache: Cache | None = None
        self.templates: dict[int, tuple[tuple, dict]] = {}  # each layer's last arguments: what flush() calls it with
        try:
            yield
            self.flush()
        finally:
            self.pending.clear()
            self.templates.clear()
            self.originals = []

    def call(self, layer: int, original: Callable, hidden: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
        if layer == 0:
            self._begin(hidden, args, kwargs)
        self.active = self._active(layer) if self.pending and self.step_pos is not None else []
        if self.active:
            out = self._run_together(layer, original, hidden, args, kwargs)
        else:
            out = super().call(layer, original, hidden, args, kwargs)
        self.templates[layer] = (args, kwargs)
        if layer == self.n_layers - 1:
            self.pending.clear()  # the new token went through every layer, and the pending ones with it
        return out

    def keep_going(self, teacher_forced: bool) -> bool:
        return teacher_forced  # one pass: no next step to carry the deferred positions

    def stop(self, layer: int, out: torch.Tensor) -> None:
        if self.step_pos is None:
            return  # no cache: nothing later tokens could read
        for entry in self.active:
            entry.depth, entry.state = layer, self.running[id(entry)]
        self.pending.append(_Pending(layer, out, self.step_pos, self.kv))
        self.pending_cache = self.cache

    def _begin(self, hidden: torch.Tensor, args: tuple, kwargs: dict) -> None:
        """A forward begins: complete what it cannot carry, note a decode step's positions and mask."""
        self.running: dict[int, torch.Tensor] = {}  # pending positions' states in this forward
        self.widened: dict = {}  # positions and mask for pending positions riding along, per set of them
        self.step_pos: dict | None = None  # the new token's position tensors (decode steps)
        cache = find_cache(args, kwargs)
        if self.pending and (cache is not self.pending_cache or hidden.shape[1] != 1):
            self.flush()
        if hidden.shape[1] == 1 and cache is not None:
            self.step_pos = {name: kwargs[name] for name in _POSITION_KWARGS if kwargs.get(name) is not None}
            self.kv = cache.get_seq_length() + 1
            self.cache = cache
            slot = self.mask_slots[0]
            self.last_mask = args[slot] if slot is not None and slot < len(args) else kwargs.get("attention_mask")

    def _active(self, layer: int) -> list[_Pending]:
        """Pending positions that need ``layer`` (a suffix: depths never increase along positions)."""
        active = [entry for entry in self.pending if entry.depth < layer]
        for entry in active:
            if entry.depth == layer - 1:
                self.running[id(entry)] = entry.state
        return active

    def _run_together(self, layer: int, original: Callable, hidden: torch.Tensor, args: tuple, kwargs: dict):
        states = torch.cat([self.running[id(entry)] for entry in self.active] + [hidden], dim=1)
        args, kwargs = self._widen(layer, self.active, args, kwargs, self.step_pos, self.kv, self.last_mask)
        out = layer_hidden(original(states, *args, **kwargs))
        for i, entry in enumerate(self.active):
            self.running[id(entry)] = out[:, i:i + 1]
        self.stats.deferred += len(self.active) * out.shape[0]
        return out[:, -1:]

    def _widen(self, layer: int, entries: list[_Pending], args: tuple, kwargs: dict, new_pos: dict | None,
               kv: int, mask_row: torch.Tensor | None) -> tuple[tuple, dict]:
        """A layer call's arguments for ``entries`` (+ the new token): positions and a causal mask."""
        q = len(entries) + (new_pos is not None)
        key = (id(entries[0]), q, kv, new_pos is None)  # entries are a suffix of the pending list: its first one names it
        if key not in self.widened:  # the same for every layer this step runs with these entries
            positions = {name: _cat([entry.pos[name] for entry in entries] + ([new_pos[name]] if new_pos else []), dim)
                         for name, dim in _POSITION_KWARGS.items() if kwargs.get(name) is not None}
            self.widened[key] = positions, self._mask(mask_row, q, kv, entries[0].state)
        positions, mask = self.widened[key]
        kwargs = {**kwargs, **positions}
        slot = self.mask_slots[layer]
        if slot is not None and slot < len(args):
            args = args[:slot] + (mask,) + args[slot + 1:]
        else:
            kwargs["attention_mask"] = mask
        return args, kwargs

    def _mask(self, row: torch.Tensor | None, q: int, kv: int, like: torch.Tensor) -> torch.Tensor:
        """``(batch|1, 1, q, kv)``: the last ``q`` positions, causal, with ``row``'s padding."""
        allowed = torch.ones(q, kv, dtype=torch.bool, device=like.device).tril(kv - q)
        if row is not None and row.shape[-1] != kv:
            raise RuntimeError(f"attention mask covers {row.shape[-1]} positions, expected {kv}")
        if row is None:
            if not self.eager:
                return allowed[None, None]
            return torch.zeros(q, kv, dtype=like.dtype, device=like.device).masked_fill(
                ~allowed, torch.finfo(like.dtype).min)[None, None]
        row = row[..., -1:, :]
        if row.dtype == torch.bool:
            return row & allowed
        return row.expand(*row.shape[:2], q, kv).masked_fill(~allowed, torch.finfo(row.dtype).min)

    @torch.no_grad()
    def flush(self) -> None:
        """Compute the pending positions' remaining layers so the cache holds every layer."""
        if not self.pending:
            return
        pending, self.pending = self.pending, []
        kv, running = pending[-1].kv, {}
        for layer in range(min(entry.depth for entry in pending) + 1, self.n_layers):
            active = [entry for entry in pending if entry.depth < layer]
            for entry in active:
                if entry.depth == layer - 1:
                    running[id(entry)] = entry.state
            # the model passes every layer the same arguments; layers never reached reuse layer 0's
            args, kwargs = self.templates.get(layer) or self.templates[0]
            args, kwargs = self._widen(layer, active, args, kwargs, None, kv, self.last_mask)
            out = layer_hidden(self.originals[layer](torch.cat([running[id(entry)] for entry in active], 1), *args, **kwargs))
            for i, entry in enumerate(active):
                running[id(entry)] = out[:, i:i + 1]
            self.stats.deferred += len(active) * out.shape[0]
        self.pending_cache = None


class _KVWritten(Exception):
    """Raised by :class:`_CacheProxy` once a skipped layer has written its K/V."""


class _CacheProxy:
    """Stands in for the cache during a skipped layer's call: store the entries, then stop."""

    def __init__(self, cache: Cache):
        self._cache = cache

    def update(self, *args: Any, **kwargs: Any):
        self._cache.update(*args, **kwargs)
        raise _KVWritten

    def __getattr__(self, name: str) -> Any:
        return getattr(self._cache, name)


def _with_proxy(args: tuple, kwargs: dict) -> tuple[tuple, dict, bool]:
    """Swap the cache among a layer call's arguments for a proxy (False when there is none)."""
    found = False
    new_args = list(args)
    for i, value in enumerate(new_args):
        if isinstance(value, Cache):
            new_args[i], found = _CacheProxy(value), True
    new_kwargs = dict(kwargs)
    for key, value in new_kwargs.items():
        if isinstance(value, Cache):
            new_kwargs[key], found = _CacheProxy(value), True
    return tuple(new_args), new_kwargs, found


class HiddenState(KVScheme):
    """CALM's state propagation (Schuster et al. 2022): a skipped layer's K/V come from the exited state.

    An exited row keeps its exit state through the later layers: while other rows of the batch
    go on, the layers run on that state (and so write its K/V); once every row exited, each
    skipped layer only writes its K/V for it. The entries are produced by the layer's own code,
    stopped right after it writes the cache (the cache is handed over behind a proxy whose
    ``update`` stores them and raises), so any family works without per-family code. Cheaper
    than :class:`Defer` (nothing rides along later), but later tokens see K/V the full model
    never computes. docs/early_exit.md: 15.8% saved, top-1 agreement 71.1% (93.6% with
    :class:`Defer`), perplexity 69.1 (60.0; the full model's 46.7).

    >>> from steer.generation import early_exit
    >>> from steer.generation.kv_schemes import HiddenState
    >>> with early_exit(model, exit_model, 0.6, propagate=HiddenState()):  # doctest: +SKIP
    ...     out = model.generate(**inputs, max_new_tokens=40)
    """

    def exited_state(self, state: torch.Tensor, mapped: torch.Tensor) -> torch.Tensor:
        return state

    def skip(self, original: Callable, state: torch.Tensor, args: tuple, kwargs: dict) -> None:
        proxied_args, proxied_kwargs, has_cache = _with_proxy(args, kwargs)
        if not has_cache:
            return  # no cache: nothing later tokens could read
        try:
            original(state, *proxied_args, **proxied_kwargs)
        except _KVWritten:
            return
        raise RuntimeError("a skipped layer did not write its key/value cache; early exit cannot keep it consistent")


class MappedState(HiddenState):
    """As :class:`HiddenState`, from the mapped state ``map[exit](h_exit)`` instead of the exited one.

    The mapped state approximates the last layer's, not the input the skipped layers expect, so
    their K/V are further off. docs/early_exit.md: 16.2% saved, top-1 agreement 26.0%, perplexity
    3185: kept as a measured negative result.

    >>> from steer.generation import early_exit
    >>> from steer.generation.kv_schemes import MappedState
    >>> with early_exit(model, exit_model, 0.6, propagate=MappedState()):  # doctest: +SKIP
    ...     out = model.generate(**inputs, max_new_tokens=40)
    """

    def exited_state(self, state: torch.Tensor, mapped: torch.Tensor) -> torch.Tensor:
        return mapped


class Recompute(KVScheme):
    """Reference: every layer is computed for every token; only the output comes from the exit.

    The K/V are the full model's and nothing is saved (``layers_saved_fraction`` is 0): it
    checks the exits and the other schemes (docs/early_exit.md: the same 93.6% agreement and
    perplexity 60.0 as :class:`Defer`).

    >>> from steer.generation import early_exit
    >>> from steer.generation.kv_schemes import Recompute
    >>> with early_exit(model, exit_model, 0.6, propagate=Recompute()) as stats:  # doctest: +SKIP
    ...     out = model.generate(**inputs, max_new_tokens=40)
    >>> stats.wanted_saved_fraction  # what the exits asked for  # doctest: +SKIP
    """

    def keep_going(self, teacher_forced: bool) -> bool:
        return True


SCHEMES: dict[str, type[KVScheme]] = {"defer": Defer, "hidden": HiddenState, "mapped": MappedState,
                                      "recompute": Recompute}
