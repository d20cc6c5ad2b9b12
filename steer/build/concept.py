"""Build a spec for any concept, up or down: the builder (steer.build.builder) on neutral selection prompts.

A concept is given as words (``happy,glad``), a file (one word a line), a built-in name
(``positive``, ``negative``, ``toxicity``, ``topic:NAME``) or ``scorer:NAME`` (a scorer judges
each word: ``scorer:vader-positive``, ``scorer:vader-negative``, ``scorer:profanity-check``).

* **Spans**: the concept's words wherever the model writes them in its own samples, and the
  words forced after the selection prompts and at random word starts inside its own samples
  (``mid_sample``), each weighted by how likely the model finds it there.
* **Prior**: for word concepts, the mean z-score of the concept's tokens in each value vector's
  vocabulary projection (:class:`steer.ConceptScorer`) re-weights the measured net gain.
* **Prompts**: the selection half of the shipped neutral prompts
  (:func:`steer.evaluation.prompts.neutral_prompts`); the evaluation half is never read here.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

from steer.concepts import Concept, ConceptScorer

from .builder import COUNTS, LAMS, PPL_BUDGET, Target, build_spec

SCORER_PREFIX = "scorer:"
PRIOR_WEIGHT = 0.5
WIDEN = 3.0  # set values up to 3x the observed coefficient range (see steer.build.builder.candidates)
# per scorer: (flag a word at this score, force a word the model wrote at this score)
SCORER_THRESHOLDS = {"vader-positive": (0.25, 0.4), "vader-negative": (0.25, 0.4)}


def _word_scorer(name: str) -> tuple[str, Callable[[list[str]], list[float]], float, float]:
    if name.startswith("vader-"):
        from steer.evaluation.sentiment import VaderScorer

        scorer = VaderScorer(name[len("vader-"):])
        return name, scorer.score, *SCORER_THRESHOLDS[name]
    from steer.build.detox import toxicity_score

    return name, toxicity_score(name), 0.5, 0.9


def concept_target(concept: str | Concept, tokenizer, direction: str = "up", model=None,
                   prior_weight: float = PRIOR_WEIGHT, widen: float = WIDEN) -> Target:
    """The builder's target for a concept (module docstring); ``model`` gives the vocabulary prior."""
    if isinstance(concept, str) and concept.startswith(SCORER_PREFIX):
        name, score, flag, force = _word_scorer(concept[len(SCORER_PREFIX):])
        return Target(name, score, direction, threshold=flag, forced_threshold=force, widen=widen)
    if isinstance(concept, str):
        concept = Concept.resolve(concept, tokenizer)
    words = {w.lower() for w in concept.words}
    score = lambda found: [1.0 if w.lower() in words else 0.0 for w in found]  # noqa: E731
    prior = ConceptScorer(model).scores(concept) if model is not None and prior_weight else None
    label = concept.name if len(concept.name) <= 40 else concept.name[:37] + "..."
    return Target(label, score, direction, words=list(concept.words), prior=prior, prior_weight=prior_weight,
                  widen=widen)


def build_concept_spec(model, tokenizer, concept: str | Concept, direction: str = "up", *,
                       prompts: Sequence[str] | None = None, prompt_limit: int | None = None,
                       count: int | None = None, lam: float | None = None, counts: Sequence[int] = COUNTS,
                       lams: Sequence[float] = LAMS, ppl_budget: float = PPL_BUDGET, samples: int = 4,
                       max_new_tokens: int = 20, forced_per_prompt: int = 6, mid_sample: int = 1,
                       prior_weight: float = PRIOR_WEIGHT, widen: float = WIDEN, batch_size: int = 16, seed: int = 0,
                       name: str | None = None, work_dir: str | Path | None = None,
                       progress: Callable[[str], None] | None = None):
    """A spec moving ``concept`` ``direction`` (``up``/``down``), chosen on selection prompts only.

    ``prompts``: selection prompts (default: the shipped neutral selection half, its first
    ``prompt_limit``). Other arguments: :func:`steer.build.builder.build_spec`.
    """
    if prompts is None:
        from steer.evaluation.prompts import neutral_prompts

        prompts = neutral_prompts("selection")
    prompts = list(prompts)[:prompt_limit] if prompt_limit else list(prompts)
    target = concept_target(concept, tokenizer, direction, model, prior_weight, widen)
    return build_spec(model, tokenizer, target, force=[[p] for p in prompts], count=count, lam=lam, counts=counts,
                      lams=lams, ppl_budget=ppl_budget, samples=samples, max_new_tokens=max_new_tokens,
                      forced_per_prompt=forced_per_prompt, mid_sample=mid_sample, batch_size=batch_size, seed=seed,
                      name=name, work_dir=work_dir, progress=progress,
                      concept=concept if isinstance(concept, str) else concept.name)
