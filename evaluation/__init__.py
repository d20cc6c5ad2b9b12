"""Evaluation: toxicity / perplexity / diversity scorers, prompt sets, the RealToxicityPrompts
protocol, resumable sweeps, tables and plots. See ``steer eval --help`` and ``steer sweep --help``.

Names are imported on first use, so ``import steer.evaluation.diversity`` stays light.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "continuation_perplexity": "perplexity", "distinct_n": "diversity", "get_toxicity_scorer": "toxicity",
    "load_prompt_set": "prompts", "load_prompts": "prompts", "run_eval": "protocol",
    "SweepConfig": "sweep", "run_sweep": "sweep", "neutral_prompts": "prompts", "run_task": "steer_eval",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'evaluation' has no attribute {name!r}")
