"""Early exit inside ``model.generate``: skipped layers are really not computed.

While :func:`early_exit` is active every decoder layer's ``forward`` is wrapped (tuned-lens
``model_surgery`` style, restored in ``finally``). The model's own loop still calls each
layer in turn, so ``generate``, the cache, masks and hooks (``steering`` included) are the
stock ones; the wrapper decides what each layer does for the new token:

* before the exit: run the layer; at a check layer ask the exit rule;
* after the exit: do not run the layer. At the last layer the token's output is replaced by
  the mapped state ``map[exit](h_exit)``, so the model's own final norm and LM head give the
  logits; a hook on the LM head multiplies an exited position's logits by its exit layer's
  inverse temperature (``ExitModel.exit_scale``, :mod:`generation.calibrate`).

Later tokens attend to an exited position at every layer, so its key/value entries must exist.
How they are filled is a K/V scheme (``propagate=``, :mod:`generation.kv_schemes`, measured in
docs/early_exit.md): ``"defer"`` (default, exact: computed with the next token), ``"hidden"``
(CALM: from the exited state), ``"mapped"`` (from the mapped state) or ``"recompute"`` (every
layer computed, a reference), or an instance of one of those classes.

Batches: rows exit at different layers. The batch stops once its last row exited; until then an
exited row keeps being computed exactly (``"defer"``, so that it behaves as it would alone) or
keeps its exit state (``"hidden"``/``"mapped"``); ``"recompute"`` never stops.
``wanted_saved_fraction`` is what the rows asked for, ``layers_saved_fraction`` the layer passes
really skipped.

>>> with early_exit(model, exit_model, threshold=0.6) as stats:        # doctest: +SKIP
...     out = model.generate(**inputs, max_new_tokens=40)
>>> stats.layers_saved_fraction                                       # doctest: +SKIP
"""
from __future__ import annotations

import copy
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterator, Literal

import torch

from steer import Adapter
from steer.hooks import hooks, replaced_forwards

from .kv_schemes import SCHEMES, KVScheme
from .rules import ExitRule

if TYPE_CHECKING:
    from .exit_model import ExitModel

Positions = Literal["last", "all"]
Propagate = Literal["defer", "hidden", "mapped", "recompute"]
PROPAGATE = tuple(SCHEMES)


@dataclass
class ExitStats:
    """What early exit did so far. ``tokens`` counts (row, position) decisions."""

    n_layers: int
    tokens: int = 0
    layers_computed: int = 0  # layer passes run for those tokens (per row)
    exit_layers: Counter = field(default_factory=Counter)  # layer after which a token exited (n_layers-1: none)
    deferred: int = 0  # position-layers of exited positions computed later, alongside a new token (per row; Defer)

    @property
    def layers_saved_fraction(self) -> float:
        """Share of the layer passes skipped (deferred positions ride along in passes that run anyway)."""
        return 1.0 - self.layers_computed / (self.tokens * self.n_layers) if self.tokens else 0.0

    @property
    def wanted_saved_fraction(self) -> float:
        """Share the rows' exit decisions asked for (equals the above at batch 1)."""
        if not self.tokens:
            return 0.0
        wanted = sum((self.n_layers - 1 - layer) * n for layer, n in self.exit_layers.items())
        return wanted / (self.tokens * self.n_layers)


class _Controller:
    """Exit state shared by the wrapped layers of one model, per forward; the K/V go to ``scheme``."""

    def __init__(self, model: torch.nn.Module, exit_model: "ExitModel", rule: ExitRule,
                 positions: Positions, scheme: KVScheme):
        self.n_layers = Adapter(model).n_layers
        self.maps = exit_model.maps
        self.rule = rule
        self.positions = positions
        self.scheme = scheme
        self.keep_going = scheme.keep_going(positions == "all")
        self.protect = 0  # teacher forcing: positions before this never exit (they play the prompt)
        self.check = set(rule.layers)
        self.stats = ExitStats(self.n_layers)
        self.ffn: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        # calibrated exits: exited positions' logits are multiplied by their exit layer's inverse temperature
        self.scale_of: torch.Tensor | None = None
        if exit_model.exit_scale is not None and any(b != 1.0 for b in exit_model.exit_scale):
            self.scale_of = torch.ones(self.n_layers)
            for layer, beta in zip(exit_model.check_layers, exit_model.exit_scale):
                self.scale_of[layer] = beta
        self.logit_scale: torch.Tensor | None = None  # (batch, positions) for the next LM-head call
        self._begin(None)

    # -- one forward ---------------------------------------------------------------------
    def _begin(self, hidden: torch.Tensor | None) -> None:
        self.exited: torch.Tensor | None = None  # bool over hidden.shape[:-1]
        self.frozen: torch.Tensor | None = None  # state that exited rows keep; after the stop, what layers pass on
        self.final: torch.Tensor | None = None  # mapped state of exited rows
        self.exit_layer: torch.Tensor | None = None
        self.stopped = False
        self.computed = 0
        # decode steps only (one new position), unless every position is decided (teacher forcing)
        self.deciding = hidden is not None and (self.positions == "all" or hidden.shape[1] == 1)

    def scale_logits(self, module, args, output):
        """LM-head hook: calibrate the logits of exited positions (:mod:`generation.calibrate`)."""
        scale, self.logit_scale = self.logit_scale, None
        if scale is None or output.dim() != 3:
            return None
        return output * scale[:, -output.shape[1]:, None].to(output.device, output.dtype)

    def ffn_hook(self, layer: int):
        def hook(module, args, output):
            self.ffn[layer] = (args[0], output)
        return hook

    def run(self, layer: int, original, hidden: torch.Tensor, *args, **kwargs):
        if layer == 0:
            self._begin(hidden)
        if self.stopped:
            self.scheme.skip(original, self.frozen, args, kwargs)
            out = self.frozen
        else:
            out = self.scheme.call(layer, original, hidden, args, kwargs)
            self.computed += 1
            if self.frozen is not None:
                out = torch.where(self.exited.unsqueeze(-1), self.frozen, out)
            if self.deciding and layer in self.check:
                self._decide(layer, hidden, out)
        if layer == self.n_layers - 1:
            out = self._finish(out)
        return out

    def _decide(self, layer: int, hidden: torch.Tensor, out: torch.Tensor) -> None:
        ffn = self.ffn.get(layer)
        if ffn is not None and ffn[0].shape[-2] != out.shape[-2]:  # pending positions rode along (Defer)
            ffn = tuple(t[..., -out.shape[-2]:, :] for t in ffn)
        want = self.rule.decide(layer, hidden, out, ffn)
        if self.protect and want.dim() > 1:
            want[:, :self.protect] = False
        if self.exited is not None:
            want = want & ~self.exited
        if not bool(want.any()):
            return
        if self.exited is None:
            self.exited = torch.zeros_like(want)
            self.final = torch.empty_like(out)
            self.exit_layer = torch.full(want.shape, self.n_layers - 1, dtype=torch.long, device=want.device)
        mapped = self.maps.apply(layer, out[want])
        self.final[want] = mapped
        kept = self.scheme.exited_state(out[want], mapped)
        if kept is not None:
            if self.frozen is None:
                self.frozen = out.clone()
            self.frozen[want] = kept
        self.exit_layer[want] = layer
        self.exited |= want
        if self.keep_going or not bool(self.exited.all()):
            return
        self.stopped = True
        if self.frozen is None:
            self.frozen = out  # what the skipped layers pass on
        self.scheme.stop(layer, out)

    def _finish(self, out: torch.Tensor) -> torch.Tensor:
        if self.deciding:
            decided = out.shape[:-1].numel()
            self.stats.tokens += decided
            self.stats.layers_computed += decided * self.computed
            if self.exit_layer is None:
                self.stats.exit_layers[self.n_layers - 1] += decided
            else:
                self.stats.exit_layers.update(self.exit_layer.flatten().tolist())
        if self.exit_layer is not None and self.scale_of is not None:
            self.logit_scale = self.scale_of.to(self.exit_layer.device)[self.exit_layer]
        if self.stopped:
            out = self.final
        elif self.exited is not None:
            out = torch.where(self.exited.unsqueeze(-1), self.final, out)
        self._begin(None)
        self.ffn.clear()
        return out


@contextmanager
def early_exit(model: torch.nn.Module, exit_model: "ExitModel", threshold: float, rule: str | None = None,
               positions: Positions = "last", propagate: Propagate | KVScheme = "defer",
               prompt_positions: int = 0) -> Iterator[ExitStats]:
    """Run every forward of ``model`` inside the block with early exit; yields live :class:`ExitStats`.

    ``threshold`` in [0, 1] is the rule's exit threshold (1 never exits). ``positions="last"``
    decides for new tokens only (the prompt is computed in full, as in generation);
    ``"all"`` decides for every position of a teacher-forced forward, which reproduces
    token-by-token early-exit decoding in one pass. ``propagate`` picks how skipped layers'
    K/V are filled: a name in ``PROPAGATE`` or a :class:`~generation.kv_schemes.KVScheme`
    (:mod:`generation.kv_schemes`). With ``"defer"`` the last exited positions are completed
    when the block exits, so a cache returned by ``generate`` holds every layer for every position.
    ``prompt_positions`` (with ``positions="all"``): the first positions never exit, as a prompt.
    """
    exit_model.check_model(model)
    if positions not in ("last", "all"):
        raise ValueError(f"positions must be 'last' or 'all', not {positions!r}")
    if type(propagate) is KVScheme:  # its defaults write no K/V for skipped layers: the cache would go stale
        raise ValueError("KVScheme is the base of the schemes, it fills no K/V: pass Defer(), HiddenState(), "
                         "MappedState(), Recompute() or a subclass")
    if isinstance(propagate, KVScheme):
        scheme = copy.copy(propagate)  # a block's state lives in its copy: one instance can serve several blocks
    elif propagate in PROPAGATE:
        scheme = SCHEMES[propagate]()
    else:
        raise ValueError(f"propagate must be one of {', '.join(PROPAGATE)}, not {propagate!r}")
    adapter = Adapter(model)
    exit_rule = exit_model.rule(rule, threshold, readout=adapter.readout)
    controller = _Controller(model, exit_model, exit_rule, positions, scheme)
    controller.protect = int(prompt_positions)
    def forward_of(layer: int, original):
        def forward(hidden_states, *args, **kwargs):
            return controller.run(layer, original, hidden_states, *args, **kwargs)
        return forward

    originals = [module.forward for module in adapter.layers]  # bound methods, or accelerate's instance-level wrappers
    ffn_hooks = [(adapter.ffn_out(layer), "post", controller.ffn_hook(layer))
                 for layer in exit_rule.layers] if exit_rule.needs_ffn else []
    if controller.scale_of is not None:
        ffn_hooks.append((adapter.unembed, "post", controller.scale_logits))
    try:
        with replaced_forwards([(module, forward_of(layer, originals[layer]))
                                for layer, module in enumerate(adapter.layers)]), hooks(*ffn_hooks), \
                scheme.block(model, originals, controller.stats):
            yield controller.stats
    finally:
        controller.ffn.clear()
