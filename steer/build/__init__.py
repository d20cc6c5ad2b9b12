"""Builders: value-vector edits chosen by their measured effect on the model's own text.

One code path (:mod:`.builder`, the pipeline) for every target, one module an idea under it:
:mod:`.samples` (the model's own samples and forced words), :mod:`.attribution` (first-order
effect of every coefficient), :mod:`.edits` (choosing each vector's edit), :mod:`.heldout` (the
teacher-forced check). :mod:`.detox` (toxicity down, the shipped preset) and :mod:`.concept`
(any concept, up or down) are its instances.
"""
from .attribution import Attribution, attribute
from .builder import Target, build_spec, next_token_effect, split_groups
from .edits import Candidate, candidates, spec_from
from .heldout import Check, HeldOut
from .samples import Sample, forced_samples, mark_toxic, sample_continuations
from .concept import build_concept_spec, concept_target
from .detox import TEMPLATE_WORDS, build_detox_spec, detox_target, docstring_openings, neutral_prompts, toxic_prompts

__all__ = ["Attribution", "Candidate", "Check", "HeldOut", "Sample", "TEMPLATE_WORDS", "Target", "attribute",
           "build_concept_spec", "build_detox_spec", "build_spec", "candidates", "concept_target", "detox_target",
           "docstring_openings", "forced_samples", "mark_toxic", "neutral_prompts", "next_token_effect",
           "sample_continuations", "spec_from", "split_groups", "toxic_prompts"]
