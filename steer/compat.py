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


def may_compile(model: torch.nn.Module, kwargs: dict[str, Any]) -> bool:
    """Whether ``model.generate(**kwargs)`` may run a compiled decode step: transformers compiles it
    for a static cache on an accelerator or when a ``compile_config`` asks; a model whose forward
    is already compiled runs compiled everywhere. Over-approximated: steering slots are exact
    in eager mode too, so a false positive costs nothing but two gathers per layer."""
    from transformers.generation.configuration_utils import ALL_STATIC_CACHE_IMPLEMENTATIONS

    config = kwargs.get("generation_config") or getattr(model, "generation_config", None)
    get = lambda name: kwargs.get(name, getattr(config, name, None))  # noqa: E731
    if get("disable_compile"):
        return False
    cache = kwargs.get(CACHE_KWARG)
    static = get("cache_implementation") in ALL_STATIC_CACHE_IMPLEMENTATIONS or (
        cache is not None and getattr(cache, "is_compileable", False) and type(cache).__name__ != "DynamicCache")
    forward = model.__dict__.get("forward")
    return static or get("compile_config") is not None or hasattr(forward, "_torchdynamo_orig_callable") \
        or "_compiled_call" in model.__dict__


def repeat_factor(model: torch.nn.Module, kwargs: dict[str, Any]) -> int:
    """Rows ``generate`` makes of each input row (beams x return sequences): per-row specs repeat so."""
    config = kwargs.get("generation_config") or getattr(model, "generation_config", None)
    get = lambda name: kwargs.get(name, getattr(config, name, None)) or 1  # noqa: E731
    return int(get("num_beams")) * int(get("num_return_sequences"))


def cache_layer_types(model: torch.nn.Module, n_layers: int) -> tuple[list[str], list[dict]]:
    """Each layer's attention type and its cache layer's kwargs, as ``DynamicCache`` builds them
    (transformers 5.17 returns one kwargs dict for all layers, 5.25 one per layer)."""
    try:
        from transformers.cache_utils import get_layer_types_and_kwargs

        types, kwargs = get_layer_types_and_kwargs(model.config.get_text_config(decoder=True))
    except (ImportError, AttributeError, TypeError):
        return ["full_attention"] * n_layers, [{} for _ in range(n_layers)]
    if len(types) != n_layers:
        return ["full_attention"] * n_layers, [{} for _ in range(n_layers)]
    kwargs = [dict(kwargs) for _ in types] if isinstance(kwargs, dict) else list(kwargs)
    return list(types), kwargs


def compile_config(model: torch.nn.Module):
    """transformers' settings for a compiled decode step: its defaults (inductor, CUDA graphs) on
    an accelerator; on CPU, where it compiles only when told, inductor without CUDA graphs."""
    from transformers import CompileConfig

    if next(model.parameters()).device.type == "cuda":
        return CompileConfig()
    config = CompileConfig(mode="default")
    config._compile_all_devices = True
    return config
