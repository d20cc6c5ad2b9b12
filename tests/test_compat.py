"""One compatibility point (steer/compat.py): our calls use the installed transformers' cache API,
so steering, evaluation, early exit and layer ops raise no FutureWarning and log no deprecation."""
from __future__ import annotations

import logging
import warnings

import torch
from transformers import DynamicCache

from conftest import tiny_model
from steer import Spec, steering
from steer.compat import CACHE_KWARG, cache_of, with_cache
from steer.evaluation.protocol import run_eval
from steer.evaluation.toxicity import ProfanityCheckScorer
from steer.layers import LayerOp
from test_early_exit import exit_model_for, greedy
from test_eval_helpers import tiny_lm


class _Deprecations(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        if "deprecat" in record.getMessage().lower():
            self.messages.append(record.getMessage())


def test_cache_name_matches_the_installed_model_signature():
    import inspect

    from transformers import LlamaForCausalLM

    assert CACHE_KWARG in inspect.signature(LlamaForCausalLM.forward).parameters
    model = tiny_model("llama")
    ids = torch.tensor([[5, 6, 7, 8]])
    first = model(ids[:, :3], use_cache=True)
    assert isinstance(cache_of(first), DynamicCache) and cache_of(first).get_seq_length() == 3
    step = model(**with_cache(cache_of(first), input_ids=ids[:, 3:], use_cache=True))
    torch.testing.assert_close(step.logits[:, -1], model(ids).logits[:, -1], rtol=1e-4, atol=1e-5)


def test_our_generation_paths_raise_no_future_warning_and_log_no_deprecation():
    from steer.generation import early_exit

    logger = logging.getLogger("transformers")
    handler = _Deprecations()
    logger.addHandler(handler)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", FutureWarning)
            model = tiny_model("llama", layers=4)
            spec = Spec.build("s", [("L3.N5", "set", 50.0)], model=model)
            with steering(model, spec):
                steered = greedy(model, n=4)
            assert not torch.equal(steered, greedy(model, n=4))  # the edit acted
            with early_exit(model, exit_model_for(model, check=(1,), bias=50.0), 0.5) as stats:
                out = greedy(model, n=4, return_dict_in_generate=True)
            assert stats.layers_saved_fraction > 0 and cache_of(out).get_seq_length() > 0
            with steering(model, Spec("skip", layers=(LayerOp("skip", (2,)),))):
                greedy(model, n=4)
            lm, tokenizer = tiny_lm()
            summary = run_eval(lm, tokenizer, ["ab cd", "ef gh ij"], samples=2, max_new_tokens=4,
                               scorer=ProfanityCheckScorer(), progress=False)
            assert summary["n_prompts"] == 2 and summary["samples"] == 2
    finally:
        logger.removeHandler(handler)
    assert handler.messages == []
