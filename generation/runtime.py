"""Early exit inside ``model.generate``: skipped layers are really not computed.

While :func:`early_exit` is active every decoder layer's ``forward`` is wrapped (tuned-lens
``model_surgery`` style, restored in ``finally``). The model's own loop still calls each
layer in turn, so ``generate``, the cache, masks and hooks (``steering`` included) are all the
stock ones; the wrapper decides what a layer does for the current token:

* before the exit: run the layer; at a check layer ask the exit rule;
* after the exit: **do not run the layer**. Later tokens still attend to this position at
  every layer, so its key/value entries must exist. We use CALM's state propagation (Schuster
  et al. 2022): a skipped layer's K/V are computed from the exited hidden state, i.e. exactly
  what the layer would write if the exited state were copied upwards. They are produced by the
  layer's own code, stopped right after it writes the cache: the cache is handed to the layer
  behind a proxy whose ``update`` stores the entries and raises :class:`_KVWritten`, so no
  attention, output projection or FFN is computed, for any family, without per-family code;
* at the last layer the exited rows' output is replaced by the mapped state
  ``map[exit](h_exit)``, so the model's own final norm and LM head produce the logits.

Batches: rows that want to exit at different layers are *frozen* at their exit layer (their
state stops changing, their later layers' K/V are computed from it by the same layer call, so
every row behaves exactly as it would alone); the batch stops computing layers when its last
row has exited. ``stats.wanted_saved_fraction`` is what the rows asked for, while
``stats.layers_saved_fraction`` is the row-layers really skipped.

>>> with early_exit(model, exit_model, threshold=0.9) as stats:       # doctest: +SKIP
...     out = model.generate(**inputs, max_new_tokens=40)
>>> stats.layers_saved_fraction                                       # doctest: +SKIP
"""
from __future__ import annotations

from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterator, Literal

import torch
from transformers.cache_utils import Cache

from steer import Adapter

from .rules import ExitRule

if TYPE_CHECKING:
    from .exit_model import ExitModel

Positions = Literal["last", "all"]


@dataclass
class ExitStats:
    """What early exit did so far. ``tokens`` counts (row, position) decisions."""

    n_layers: int
    tokens: int = 0
    layers_computed: int = 0  # row-layers really computed for those tokens
    exit_layers: Counter = field(default_factory=Counter)  # layer after which a token exited (n_layers-1: none)

    @property
    def layers_saved_fraction(self) -> float:
        """Share of layer compute really skipped (row-layers)."""
        return 1.0 - self.layers_computed / (self.tokens * self.n_layers) if self.tokens else 0.0

    @property
    def wanted_saved_fraction(self) -> float:
        """Share the rows' exit decisions asked for (equals the above at batch 1)."""
        if not self.tokens:
            return 0.0
        wanted = sum((self.n_layers - 1 - layer) * n for layer, n in self.exit_layers.items())
        return wanted / (self.tokens * self.n_layers)

    @property
    def mean_exit_layer(self) -> float:
        return sum(layer * n for layer, n in self.exit_layers.items()) / max(self.tokens, 1)


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


class _Controller:
    """Per-forward exit state, shared by the wrapped layers of one model."""

    def __init__(self, model: torch.nn.Module, exit_model: "ExitModel", rule: ExitRule,
                 positions: Positions, propagate: Literal["hidden", "mapped"]):
        self.adapter = Adapter(model)
        self.n_layers = self.adapter.n_layers
        self.maps = exit_model.maps
        self.rule = rule
        self.positions = positions
        self.propagate = propagate
        self.check = set(rule.layers)
        self.stats = ExitStats(self.n_layers)
        self.ffn: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._reset(None)

    def _reset(self, hidden: torch.Tensor | None) -> None:
        self.exited: torch.Tensor | None = None  # bool over hidden.shape[:-1]
        self.frozen: torch.Tensor | None = None  # state that exited rows keep (and propagate)
        self.final: torch.Tensor | None = None  # mapped state of exited rows
        self.exit_layer: torch.Tensor | None = None
        self.all_exited = False
        self.computed = 0
        # decode steps only (one new position), unless every position is decided (teacher forcing)
        self.deciding = hidden is not None and (self.positions == "all" or hidden.shape[1] == 1)
        if hidden is not None and self.deciding:
            self.rule.start(hidden.shape[:-1], hidden.device)

    def ffn_hook(self, layer: int):
        def hook(module, args, output):
            self.ffn[layer] = (args[0], output)
        return hook

    def run(self, layer: int, original, hidden: torch.Tensor, *args, **kwargs):
        if layer == 0:
            self._reset(hidden)
        if self.all_exited:
            self._write_kv(original, args, kwargs)
            out = self.frozen
        else:
            out = original(hidden, *args, **kwargs)
            if isinstance(out, tuple):  # older layer APIs: (hidden, ...)
                out = out[0]
            self.computed += 1
            if self.exited is not None:
                out = torch.where(self.exited.unsqueeze(-1), self.frozen, out)
            if self.deciding and layer in self.check:
                self._decide(layer, hidden, out)
        if layer == self.n_layers - 1:
            out = self._finish(out)
        return out

    def _decide(self, layer: int, hidden: torch.Tensor, out: torch.Tensor) -> None:
        want = self.rule.decide(layer, hidden, out, self.ffn.get(layer))
        if self.exited is not None:
            want = want & ~self.exited
        if not bool(want.any()):
            return
        if self.exited is None:
            self.exited = torch.zeros_like(want)
            self.frozen = out.clone()
            self.final = torch.empty_like(out)
            self.exit_layer = torch.full(want.shape, self.n_layers - 1, dtype=torch.long, device=want.device)
        mapped = self.maps.apply(layer, out[want])
        self.final[want] = mapped
        self.frozen[want] = mapped if self.propagate == "mapped" else out[want]
        self.exit_layer[want] = layer
        self.exited |= want
        self.all_exited = bool(self.exited.all())

    def _write_kv(self, original, args: tuple, kwargs: dict) -> None:
        proxied_args, proxied_kwargs, has_cache = _with_proxy(args, kwargs)
        if not has_cache:
            return  # no cache: nothing later tokens could read
        try:
            original(self.frozen, *proxied_args, **proxied_kwargs)
        except _KVWritten:
            return
        raise RuntimeError("a skipped layer did not write its key/value cache; early exit cannot keep it consistent")

    def _finish(self, out: torch.Tensor) -> torch.Tensor:
        if self.deciding:
            decided = out.shape[:-1].numel()
            self.stats.tokens += decided
            self.stats.layers_computed += decided * self.computed
            if self.exit_layer is None:
                self.stats.exit_layers[self.n_layers - 1] += decided
            else:
                self.stats.exit_layers.update(self.exit_layer.flatten().tolist())
        if self.all_exited:
            out = self.final
        elif self.exited is not None:
            out = torch.where(self.exited.unsqueeze(-1), self.final, out)
        self._reset(None)
        self.ffn.clear()
        return out


@contextmanager
def early_exit(model: torch.nn.Module, exit_model: "ExitModel", threshold: float, rule: str | None = None,
               positions: Positions = "last", propagate: Literal["hidden", "mapped"] = "hidden") -> Iterator[ExitStats]:
    """Run every forward of ``model`` inside the block with early exit; yields live :class:`ExitStats`.

    ``threshold`` in [0, 1] is the rule's exit threshold (1 never exits). ``positions="last"``
    decides for new tokens only (the prompt is computed in full, as in generation);
    ``"all"`` decides for every position of a teacher-forced forward, which reproduces
    token-by-token early-exit decoding in one pass. ``propagate`` picks the state the
    skipped layers' K/V are computed from (``"hidden"``: the exited state, CALM's choice).
    """
    exit_model.check_model(model)
    if positions not in ("last", "all"):
        raise ValueError(f"positions must be 'last' or 'all', not {positions!r}")
    if propagate not in ("hidden", "mapped"):
        raise ValueError(f"propagate must be 'hidden' or 'mapped', not {propagate!r}")
    adapter = Adapter(model)
    exit_rule = exit_model.rule(rule, threshold, readout=adapter.readout)
    controller = _Controller(model, exit_model, exit_rule, positions, propagate)
    saved: list[tuple[torch.nn.Module, Any]] = []
    handles = []
    try:
        for layer, module in enumerate(adapter.layers):
            if "_early_exit" in module.__dict__:
                raise RuntimeError("early_exit is already active on this model; nest steering inside it instead")
            original = module.forward  # bound method, or accelerate's instance-level wrapper
            saved.append((module, module.__dict__.get("forward")))

            def forward(hidden_states, *args, _layer=layer, _original=original, **kwargs):
                return controller.run(_layer, _original, hidden_states, *args, **kwargs)

            module.forward = forward
            module._early_exit = True
        if exit_rule.needs_ffn:
            for layer in exit_rule.layers:
                handles.append(adapter.ffn_out(layer).register_forward_hook(controller.ffn_hook(layer)))
        yield controller.stats
    finally:
        for handle in handles:
            handle.remove()
        for module, previous in saved:
            if previous is None:
                module.__dict__.pop("forward", None)
            else:
                module.forward = previous
            module.__dict__.pop("_early_exit", None)
        controller.ffn.clear()
