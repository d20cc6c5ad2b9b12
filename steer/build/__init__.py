"""Builders: value-vector edits chosen by their measured effect on the model's own text.

One code path (:mod:`.builder`) for every target; :mod:`.detox` (toxicity down, the shipped
preset) and :mod:`.concept` (any concept, up or down) are its instances.
"""
from .builder import (Attribution, Candidate, Check, HeldOut, Sample, Target, attribute, build_spec, candidates,
                      forced_samples, mark_toxic, next_token_effect, sample_continuations, spec_from, split_groups)
from .concept import build_concept_spec, concept_target
from .detox import TEMPLATE_WORDS, build_detox_spec, detox_target, docstring_openings, neutral_prompts, toxic_prompts

__all__ = ["Attribution", "Candidate", "Check", "HeldOut", "Sample", "TEMPLATE_WORDS", "Target", "attribute",
           "build_concept_spec", "build_detox_spec", "build_spec", "candidates", "concept_target", "detox_target",
           "docstring_openings", "forced_samples", "mark_toxic", "neutral_prompts", "next_token_effect",
           "sample_continuations", "spec_from", "split_groups", "toxic_prompts"]
