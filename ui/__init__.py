"""Gradio demo: steered and unsteered continuations side by side, and a value-vector explorer.

>>> from steer import load_model                                    # doctest: +SKIP
>>> from steer.ui import SteerDemo, build_app, launch                      # doctest: +SKIP
>>> launch(build_app(SteerDemo(*load_model())), port=7860)           # doctest: +SKIP

Importing :mod:`ui.app` pulls in Gradio (slow); the engine alone does not.
"""
from .engine import Continuation, Limits, Sampling, SteerDemo, apply_strength

__all__ = ["Continuation", "Limits", "Sampling", "SteerDemo", "apply_strength", "build_app", "launch"]


def __getattr__(name: str):
    if name in ("build_app", "launch"):
        from . import app

        return getattr(app, name)
    raise AttributeError(f"module 'ui' has no attribute {name!r}")
