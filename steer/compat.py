"""The one place that knows which transformers API is installed.

transformers 5.25 renamed the KV-cache argument and output field (``past_key_values`` ->
``cache``; the old name warns and goes in 5.40 for models, 6.0 for ``generate``). Everything
in steer that passes, reads or looks for a cache goes through this module, decided once at
import from the installed library, so our own calls never raise a ``FutureWarning`` and a
new rename is one edit here. Tested ranges are declared in ``pyproject.toml``.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch
from transformers.cache_utils import Cache
from transformers.modeling_outputs import CausalLMOutputWithPast


def _cache_name() -> str:
    fields = {f.name for f in dataclasses.fields(CausalLMOutputWithPast)}
    return "cache" if "cache" in fields else "past_key_values"


CACHE_KWARG: str = _cache_name()
"""The keyword a model's ``forward``, its decoder layers and ``generate`` take the KV cache by."""


def with_cache(cache: Cache | None, **kwargs: Any) -> dict[str, Any]:
    """``kwargs`` plus the cache under the installed library's name: ``model(**with_cache(c, input_ids=...))``."""
    return {**kwargs, CACHE_KWARG: cache}


def cache_of(output: Any) -> Cache | None:
    """The cache a model's forward or ``generate(return_dict_in_generate=True)`` returned."""
    return getattr(output, CACHE_KWARG, None)


def find_cache(args: tuple, kwargs: dict) -> Cache | None:
    """The cache among a layer call's arguments, whatever it is called."""
    for value in list(kwargs.values()) + list(args):
        if isinstance(value, Cache):
            return value
    return None


def layer_hidden(output: Any) -> torch.Tensor:
    """A decoder layer's hidden states: transformers 5 returns the tensor, older layers a tuple."""
    return output[0] if isinstance(output, tuple) else output
