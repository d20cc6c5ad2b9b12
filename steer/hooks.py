"""Every temporary change of a model goes through here, and is undone in ``finally``.

Three shapes, in the spirit of tuned-lens' ``model_surgery``: hooks on modules
(:func:`hooks`), replaced ``forward`` methods (:func:`replaced_forwards`) and activation
recorders (:func:`recording`). The cache a layer call carries is found by :func:`find_cache`.

``torch.compile`` does not re-check module hooks by default
(``torch._dynamo.config.skip_nnmodule_hook_guards``): a graph traced while a hook is attached
would keep it after removal, and a graph traced before would never run it. While any
:func:`hooks` block is open, graphs are traced with hook guards, so a graph traced with our
hooks is not reused without them. Edits that must live *inside* a compiled, graph-captured
step use the permanent slots of :mod:`steer.slots` instead.

>>> with hooks((model.lm_head, "pre", lambda module, args: None)):     # doctest: +SKIP
...     model(**inputs)
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Hashable, Iterable, Iterator, Literal

import torch
from torch import nn

from .compat import find_cache

__all__ = ["find_cache", "has_replaced_forward", "hooks", "recording", "replaced_forwards"]

Kind = Literal["pre", "pre_kwargs", "post"]
_REPLACED = "_steer_replaced_forward"
_open_blocks = 0
_saved_guard_setting: bool | None = None


@contextmanager
def _hook_guards() -> Iterator[None]:
    """Trace graphs with module-hook guards while our hooks may be attached (nesting-safe)."""
    global _open_blocks, _saved_guard_setting
    config = torch._dynamo.config
    if _open_blocks == 0:
        _saved_guard_setting = config.skip_nnmodule_hook_guards
        config.skip_nnmodule_hook_guards = False
    _open_blocks += 1
    try:
        yield
    finally:
        _open_blocks -= 1
        if _open_blocks == 0:
            config.skip_nnmodule_hook_guards = _saved_guard_setting


@contextmanager
def hooks(*entries: tuple[nn.Module, Kind, Callable]) -> Iterator[None]:
    """Attach ``(module, kind, fn)`` hooks for the block: ``pre`` (``fn(module, args)``),
    ``pre_kwargs`` (``fn(module, args, kwargs)``) or ``post`` (``fn(module, args, output)``)."""
    handles = []
    with _hook_guards():
        try:
            for module, kind, fn in entries:
                if kind == "pre":
                    handles.append(module.register_forward_pre_hook(fn))
                elif kind == "pre_kwargs":
                    handles.append(module.register_forward_pre_hook(fn, with_kwargs=True))
                elif kind == "post":
                    handles.append(module.register_forward_hook(fn))
                else:
                    raise ValueError(f"unknown hook kind {kind!r}: use pre, pre_kwargs or post")
            yield
        finally:
            for handle in reversed(handles):
                handle.remove()


@contextmanager
def replaced_forwards(pairs: Iterable[tuple[nn.Module, Callable]]) -> Iterator[None]:
    """Give each module a new ``forward`` for the block (an instance attribute, as accelerate's
    wrappers are); the previous one, instance-level or the class's, is restored on any exit."""
    saved: list[tuple[nn.Module, Any]] = []
    try:
        for module, forward in pairs:
            if _REPLACED in module.__dict__:
                raise RuntimeError(f"{type(module).__name__}.forward is already replaced: early exit or layer ops are "
                                   "already active on this model (they do not nest); nest steering inside them instead")
            saved.append((module, module.__dict__.get("forward")))
            module.forward = forward
            module.__dict__[_REPLACED] = True
        yield
    finally:
        for module, previous in reversed(saved):
            module.__dict__.pop(_REPLACED, None)
            if previous is None:
                module.__dict__.pop("forward", None)
            else:
                module.forward = previous


def has_replaced_forward(model: nn.Module) -> bool:
    """Whether a :func:`replaced_forwards` block is open on a submodule: eager-only control flow."""
    return any(_REPLACED in module.__dict__ for module in model.modules())


@contextmanager
def recording(modules: dict[Hashable, nn.Module], what: Literal["input", "output"] = "output",
              keep: Callable[[torch.Tensor], torch.Tensor] = lambda t: t.detach()) -> Iterator[dict]:
    """Record each module's first input or its output (tensor, or a tuple's first item) into the
    yielded dict under its key, as ``keep(tensor)``; the latest call wins. Emptied on exit, so
    no tensor outlives the block unless the caller took it."""
    store: dict[Hashable, torch.Tensor] = {}

    def hook_for(key: Hashable) -> Callable:
        if what == "input":
            return lambda module, args: store.__setitem__(key, keep(args[0])) or None
        return lambda module, args, output: store.__setitem__(
            key, keep(output[0] if isinstance(output, tuple) else output)) or None

    kind: Kind = "pre" if what == "input" else "post"
    try:
        with hooks(*[(module, kind, hook_for(key)) for key, module in modules.items()]):
            yield store
    finally:
        store.clear()
