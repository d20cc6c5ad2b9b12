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

Later tokens attend to this position at every layer, so its key/value entries must exist.
Schemes (``propagate=``), measured in docs/early_exit.md:

* ``"defer"`` (default, exact): the skipped layers of an exited position are computed *later*,
  in the next decode step, together with the new token: the layer is called once on
  ``[pending positions, new token]`` (its cache receives both, in order; the mask and the
  position tensors are widened to match). A decode step reads every weight once whatever the
  number of positions, so the deferred positions ride along for a fraction of a layer's cost,
  and their K/V are exactly the full model's: later tokens see the same context as without
  early exit. Pending positions are completed when the context manager exits (or before a
  forward on another cache), so the cache then holds every layer for every position.
* ``"hidden"``: CALM's state propagation (Schuster et al. 2022): a skipped layer's K/V are
  computed at once from the exited state. They are produced by the layer's own code, stopped
  right after it writes the cache (the cache is handed over behind a proxy whose ``update``
  stores the entries and raises :class:`_KVWritten`), for any family without per-family code.
  Cheap, but on the embedded model it drops top-1 agreement from 92% to 72%.
* ``"mapped"``: the same from the mapped state (worse); ``"recompute"``: run every layer for
  every token and only take the output from the exit (exact, saves nothing; a reference).

Batches: a row that exits keeps being computed (exactly, so that it behaves as it would alone)
until the last row of the batch exits; then the batch stops (``"defer"``/``"recompute"``), or
exited rows are frozen at their exit state (``"hidden"``/``"mapped"``). ``wanted_saved_fraction``
is what the rows asked for, ``layers_saved_fraction`` the layer passes really skipped.

>>> with early_exit(model, exit_model, threshold=0.6) as stats:        # doctest: +SKIP
...     out = model.generate(**inputs, max_new_tokens=40)
>>> stats.layers_saved_fraction                                       # doctest: +SKIP
"""
from __future__ import annotations

import inspect
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterator, Literal

import torch
from transformers.cache_utils import Cache

from steer import Adapter
from steer.compat import find_cache, layer_hidden
from steer.hooks import hooks, replaced_forwards

from .rules import ExitRule

if TYPE_CHECKING:
    from .exit_model import ExitModel

Positions = Literal["last", "all"]
Propagate = Literal["defer", "hidden", "mapped", "recompute"]
PROPAGATE = ("defer", "hidden", "mapped", "recompute")
_POSITION_KWARGS = {"position_embeddings": 1, "position_ids": 1, "cache_position": 0}  # name -> sequence dim


@dataclass
class ExitStats:
    """What early exit did so far. ``tokens`` counts (row, position) decisions."""

    n_layers: int
    tokens: int = 0
    layers_computed: int = 0  # layer passes run for those tokens (per row)
    exit_layers: Counter = field(default_factory=Counter)  # layer after which a token exited (n_layers-1: none)
    deferred: int = 0  # position-layers of exited positions computed later, alongside a new token (per row)

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


@dataclass(eq=False)
class _Pending:
    """An exited position whose upper layers are still to be computed (``"defer"``)."""

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
    """Exit state shared by the wrapped layers of one model: per forward, and pending positions."""

    def __init__(self, model: torch.nn.Module, exit_model: "ExitModel", rule: ExitRule,
                 positions: Positions, propagate: Propagate):
        self.adapter = Adapter(model)
        self.n_layers = self.adapter.n_layers
        self.maps = exit_model.maps
        self.rule = rule
        self.positions = positions
        self.propagate = propagate
        self.freeze = propagate in ("hidden", "mapped")
        # in one teacher-forced pass, "defer" means computing every position fully, as "recompute"
        self.keep_going = propagate == "recompute" or (propagate == "defer" and positions == "all")
        self.protect = 0  # teacher forcing: positions before this never exit (they play the prompt)
        self.check = set(rule.layers)
        self.eager = getattr(model.config, "_attn_implementation", "eager") == "eager"
        self.mask_slots = [_mask_slot(layer) for layer in self.adapter.layers]
        self.originals: list = [None] * self.n_layers
        self.templates: dict[int, tuple[tuple, dict]] = {}
        self.stats = ExitStats(self.n_layers)
        self.ffn: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.pending: list[_Pending] = []
        self.pending_cache: Cache | None = None
        self.last_mask: torch.Tensor | None = None
        # calibrated exits: exited positions' logits are multiplied by their exit layer's inverse temperature
        self.scale_of: torch.Tensor | None = None
        if exit_model.exit_scale is not None and any(b != 1.0 for b in exit_model.exit_scale):
            self.scale_of = torch.ones(self.n_layers)
            for layer, beta in zip(exit_model.check_layers, exit_model.exit_scale):
                self.scale_of[layer] = beta
        self.logit_scale: torch.Tensor | None = None  # (batch, positions) for the next LM-head call
        self._begin(None, (), {})

    # -- one forward ---------------------------------------------------------------------
    def _begin(self, hidden: torch.Tensor | None, args: tuple, kwargs: dict) -> None:
        self.exited: torch.Tensor | None = None  # bool over hidden.shape[:-1]
        self.frozen: torch.Tensor | None = None  # state that exited rows keep
        self.final: torch.Tensor | None = None  # mapped state of exited rows
        self.exit_layer: torch.Tensor | None = None
        self.stopped = False
        self.computed = 0
        self.running: dict[int, torch.Tensor] = {}
        self.step_pos: dict | None = None  # the new token's position tensors ("defer" decode steps)
        self.widened: dict = {}  # positions and mask for pending positions riding along, per set of them
        # decode steps only (one new position), unless every position is decided (teacher forcing)
        self.deciding = hidden is not None and (self.positions == "all" or hidden.shape[1] == 1)
        if hidden is None:
            return
        if self.propagate != "defer" or self.positions != "last":
            return
        cache = find_cache(args, kwargs)
        if self.pending and (cache is not self.pending_cache or hidden.shape[1] != 1):
            self.flush()
        if hidden.shape[1] == 1 and cache is not None:
            self.step_pos = {name: kwargs[name] for name in _POSITION_KWARGS if kwargs.get(name) is not None}
            self.kv = cache.get_seq_length() + 1
            self.cache = cache
            slot = self.mask_slots[0]
            self.last_mask = args[slot] if slot is not None and slot < len(args) else kwargs.get("attention_mask")

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
            self._begin(hidden, args, kwargs)
        if self.stopped:
            if self.freeze:
                self._write_kv(original, args, kwargs)
            out = self.frozen
        else:
            active = self._active(layer) if self.pending and self.step_pos is not None else []
            if active:
                out = self._run_together(layer, original, hidden, active, args, kwargs)
            else:
                out = layer_hidden(original(hidden, *args, **kwargs))
            if self.propagate == "defer":
                self.templates[layer] = (args, kwargs)  # what flush() calls the layer with
            self.computed += 1
            if self.exited is not None and self.freeze:
                out = torch.where(self.exited.unsqueeze(-1), self.frozen, out)
            if self.deciding and layer in self.check:
                self._decide(layer, hidden, out, active)
        if layer == self.n_layers - 1:
            out = self._finish(out)
        return out

    def _decide(self, layer: int, hidden: torch.Tensor, out: torch.Tensor, active: list[_Pending]) -> None:
        ffn = self.ffn.get(layer)
        if ffn is not None and ffn[0].shape[-2] != out.shape[-2]:  # pending positions rode along
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
            if self.freeze:
                self.frozen = out.clone()
        mapped = self.maps.apply(layer, out[want])
        self.final[want] = mapped
        if self.freeze:
            self.frozen[want] = mapped if self.propagate == "mapped" else out[want]
        self.exit_layer[want] = layer
        self.exited |= want
        if self.keep_going or not bool(self.exited.all()):
            return
        self.stopped = True
        if self.propagate == "defer":
            self.frozen = out
            if self.step_pos is not None:  # no cache: nothing later tokens could read
                for entry in active:
                    entry.depth, entry.state = layer, self.running[id(entry)]
                self.pending.append(_Pending(layer, out, self.step_pos, self.kv))
                self.pending_cache = self.cache

    def _finish(self, out: torch.Tensor) -> torch.Tensor:
        if self.deciding:
            decided = out.shape[:-1].numel()
            self.stats.tokens += decided
            self.stats.layers_computed += decided * self.computed
            if self.exit_layer is None:
                self.stats.exit_layers[self.n_layers - 1] += decided
            else:
                self.stats.exit_layers.update(self.exit_layer.flatten().tolist())
        if not self.stopped and self.step_pos is not None:
            self.pending.clear()  # the new token went through every layer, and the pending ones with it
        if self.exit_layer is not None and self.scale_of is not None:
            self.logit_scale = self.scale_of.to(self.exit_layer.device)[self.exit_layer]
        if self.stopped:
            out = self.final
        elif self.exited is not None:
            out = torch.where(self.exited.unsqueeze(-1), self.final, out)
        self._begin(None, (), {})
        self.ffn.clear()
        return out

    # -- "defer": pending positions computed together with the new token -----------------
    def _active(self, layer: int) -> list[_Pending]:
        """Pending positions that need ``layer`` (a suffix: depths never increase along positions)."""
        active = [entry for entry in self.pending if entry.depth < layer]
        for entry in active:
            if entry.depth == layer - 1:
                self.running[id(entry)] = entry.state
        return active

    def _run_together(self, layer: int, original, hidden, active: list[_Pending], args: tuple, kwargs: dict):
        states = torch.cat([self.running[id(entry)] for entry in active] + [hidden], dim=1)
        args, kwargs = self._widen(layer, active, args, kwargs, self.step_pos, self.kv, self.last_mask)
        out = layer_hidden(original(states, *args, **kwargs))
        for i, entry in enumerate(active):
            self.running[id(entry)] = out[:, i:i + 1]
        self.stats.deferred += len(active) * out.shape[0]
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

    # -- "hidden" / "mapped": CALM propagation -------------------------------------------
    def _write_kv(self, original, args: tuple, kwargs: dict) -> None:
        proxied_args, proxied_kwargs, has_cache = _with_proxy(args, kwargs)
        if not has_cache:
            return  # no cache: nothing later tokens could read
        try:
            original(self.frozen, *proxied_args, **proxied_kwargs)
        except _KVWritten:
            return
        raise RuntimeError("a skipped layer did not write its key/value cache; early exit cannot keep it consistent")


@contextmanager
def early_exit(model: torch.nn.Module, exit_model: "ExitModel", threshold: float, rule: str | None = None,
               positions: Positions = "last", propagate: Propagate = "defer",
               prompt_positions: int = 0) -> Iterator[ExitStats]:
    """Run every forward of ``model`` inside the block with early exit; yields live :class:`ExitStats`.

    ``threshold`` in [0, 1] is the rule's exit threshold (1 never exits). ``positions="last"``
    decides for new tokens only (the prompt is computed in full, as in generation);
    ``"all"`` decides for every position of a teacher-forced forward, which reproduces
    token-by-token early-exit decoding in one pass. ``propagate`` picks how skipped layers'
    K/V are filled (module docstring). With ``"defer"`` the last exited positions are completed
    when the block exits, so a cache returned by ``generate`` holds every layer for every position.
    ``prompt_positions`` (with ``positions="all"``): the first positions never exit, as a prompt.
    """
    exit_model.check_model(model)
    if positions not in ("last", "all"):
        raise ValueError(f"positions must be 'last' or 'all', not {positions!r}")
    if propagate not in PROPAGATE:
        raise ValueError(f"propagate must be one of {', '.join(PROPAGATE)}, not {propagate!r}")
    adapter = Adapter(model)
    exit_rule = exit_model.rule(rule, threshold, readout=adapter.readout)
    controller = _Controller(model, exit_model, exit_rule, positions, propagate)
    controller.protect = int(prompt_positions)
    def forward_of(layer: int, original):
        def forward(hidden_states, *args, **kwargs):
            return controller.run(layer, original, hidden_states, *args, **kwargs)
        return forward

    for layer, module in enumerate(adapter.layers):
        controller.originals[layer] = module.forward  # bound method, or accelerate's instance-level wrapper
    ffn_hooks = [(adapter.ffn_out(layer), "post", controller.ffn_hook(layer))
                 for layer in exit_rule.layers] if exit_rule.needs_ffn else []
    if controller.scale_of is not None:
        ffn_hooks.append((adapter.unembed, "post", controller.scale_logits))
    try:
        with replaced_forwards([(module, forward_of(layer, controller.originals[layer]))
                                for layer, module in enumerate(adapter.layers)]), hooks(*ffn_hooks):
            yield controller.stats
            controller.flush()
    finally:
        controller.ffn.clear()
        controller.pending.clear()
        controller.templates.clear()
        controller.originals = [None] * controller.n_layers
