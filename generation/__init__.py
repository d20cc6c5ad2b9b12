"""Early-exit generation: skip the upper layers of a decoder-only model once the prediction has settled.

>>> from steer.generation import fit_exit_model, load_exit_model, early_exit      # doctest: +SKIP
>>> exit_model = fit_exit_model(model, tokenizer, text)                     # or load_exit_model(DIR)
>>> with early_exit(model, exit_model, threshold=exit_model.default_threshold) as stats:
...     out = model.generate(**inputs, max_new_tokens=40)
>>> stats.layers_saved_fraction

Modules: ``features`` (cheap exit features), ``probe`` (the exit classifier), ``rules`` (exit
criteria), ``exit_model`` (what is fitted and saved), ``collect``, ``fit`` and ``calibrate``,
``runtime`` (the early-exit forward), ``kv_schemes`` (how an exited position's skipped layers get
their K/V), ``simulate`` (teacher-forced curves, threshold picking), ``corpus`` and ``selfgen``
(text to fit on). The layer maps are ``steer.maps``; measuring is ``steer.evaluation.early_exit``
and the CLI ``steer.ui.commands.early_exit``.
"""
from .exit_model import ExitModel, load_exit_model
from .fit import fit_exit_model
from steer.maps import LayerMaps, MapFitter
from .runtime import ExitStats, early_exit

__all__ = ["ExitModel", "ExitStats", "LayerMaps", "MapFitter", "early_exit", "fit_exit_model", "load_exit_model"]
