"""Early-exit generation: skip the upper layers of a decoder-only model once the prediction has settled.

>>> from steer.generation import fit_exit_model, load_exit_model, early_exit      # doctest: +SKIP
>>> exit_model = fit_exit_model(model, tokenizer, text)                     # or load_exit_model(DIR)
>>> with early_exit(model, exit_model, threshold=exit_model.default_threshold) as stats:
...     out = model.generate(**inputs, max_new_tokens=40)
>>> stats.layers_saved_fraction

Modules: ``maps`` (least-squares layer -> last-layer maps), ``features`` (cheap exit features),
``rules`` (exit criteria), ``exit_model`` (what is fitted and saved), ``fit``, ``runtime`` (the
early-exit forward and its KV cache), ``simulate`` and ``evaluate`` (curves and measurements),
``corpus`` (offline prose from Python's docstrings), ``commands`` (the CLI).
"""
from .exit_model import ExitModel, load_exit_model
from .fit import fit_exit_model
from steer.maps import LayerMaps, MapFitter
from .runtime import ExitStats, early_exit

__all__ = ["ExitModel", "ExitStats", "LayerMaps", "MapFitter", "early_exit", "fit_exit_model", "load_exit_model"]
