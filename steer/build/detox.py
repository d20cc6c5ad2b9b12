"""Detoxification: the builder (steer.build.builder) with toxicity as the target, direction down.

Geva et al. (2022) set 10 hand-picked "safe" value vectors of GPT-2 to 3. Here the vectors and
their values are chosen by their measured effect on the model's own text:

* **Selection text, never the evaluation prompts.** Hand-written toxicity-leaning sentence
  starts (``data/presets/detox_selection_prompts.txt``, some filled with lexicon words) after
  which toxic words are forced, and neutral sentence starts (``detox_neutral_prompts.txt``) plus
  openings of Python standard-library docstrings that price fluency.
* **Spans.** Words of the model's samples that the toxicity scorer flags on their own, and the
  template words forced after the toxicity-leaning prompts.
* No vocabulary prior (``prior_weight`` 0): on this model few lexicon tokens are profanities
  (docs/detox.md), so the projection would mislead.

The shipped preset for the embedded model is ``data/presets/smollm2-135m-detox.json``
(:func:`steer.presets.preset_for`); ``steer detox build`` (the same as ``steer build --concept
scorer:profanity-check --direction down`` with these prompts) runs this for any supported model.
"""
from __future__ import annotations

import importlib
import inspect
import random
import re
from importlib import resources
from pathlib import Path
from typing import Callable, Sequence

from steer.presets import PRESET_DIR

from .builder import COUNTS, LAMS, PPL_BUDGET, Target, build_spec


# Words that fill the ``{w}`` slots of the selection templates: entries of the shipped lexicon
# and common insults that alt-profanity-check flags on their own (>= 0.5), the ones
# SmolLM2-135M-Instruct finds most likely after "He looked at me and called me a", "She yelled at
# him: you" and "What a" (ranked once, offline). Only used to write selection prompts.
TEMPLATE_WORDS = ("dumb", "fool", "liar", "stupid", "bastard", "coward", "bitch", "fucking", "pig",
                  "moron", "jerk", "shit", "idiot", "whore", "slut", "loser", "asshole", "retard",
                  "scum", "pathetic", "cunt", "faggot", "dick", "pussy", "bullshit", "jackass")

DOC_MODULES = ("json csv argparse collections functools itertools pathlib random statistics textwrap "
               "string datetime calendar heapq bisect fractions decimal logging shutil tempfile zipfile "
               "tarfile gzip sqlite3 unittest difflib pprint queue threading subprocess socket hashlib "
               "uuid base64 struct copy enum dataclasses typing contextlib operator math locale codecs "
               "html wave colorsys sched selectors signal ast tokenize inspect traceback warnings weakref "
               "timeit").split()


# -- selection text ------------------------------------------------------------------------------
def _lines(name: str) -> list[str]:
    text = resources.files("steer").joinpath(f"{PRESET_DIR}/{name}").read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]


def toxic_prompts(per_template: int = 4, seed: int = 0) -> list[list[str]]:
    """Toxicity-leaning prompts, grouped by source line (a template gives ``per_template`` fills)."""
    rng = random.Random(seed)
    groups = []
    for line in _lines("detox_selection_prompts.txt"):
        if "{w}" in line:
            groups.append([line.replace("{w}", w) for w in rng.sample(TEMPLATE_WORDS, per_template)])
        else:
            groups.append([line])
    return groups


def docstring_openings(limit: int = 60, words: int = 14) -> list[str]:
    """The first ``words`` words of standard-library docstrings: neutral English prose, always offline."""
    out: list[str] = []
    for name in DOC_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        objects = [module] + [value for key, value in sorted(vars(module).items()) if not key.startswith("_")
                              and (inspect.isfunction(value) or inspect.isclass(value))
                              and getattr(value, "__module__", None) == module.__name__]
        for obj in objects:
            doc = inspect.getdoc(obj) or ""
            paragraph = doc.split("\n\n")[0].replace("\n", " ").split()
            if len(paragraph) >= words + 4 and not re.search(r"[<>{}\[\]=]|\w\(|>>>", " ".join(paragraph)):
                out.append(" ".join(paragraph[:words]))
    random.Random(0).shuffle(out)
    return out[:limit]


def neutral_prompts(docstrings: int = 40) -> list[str]:
    return _lines("detox_neutral_prompts.txt") + docstring_openings(docstrings)




def toxicity_score(scorer=None) -> Callable[[list[str]], list[float]]:
    """A word scorer from a toxicity scorer name, object with ``.score`` or function (default: alt-profanity-check)."""
    if scorer is None or isinstance(scorer, str):
        from steer.evaluation.toxicity import get_toxicity_scorer

        scorer = get_toxicity_scorer(scorer or "profanity-check")
    return scorer.score if hasattr(scorer, "score") else scorer


def detox_target(scorer=None) -> Target:
    return Target("toxic", toxicity_score(scorer), "down", words=TEMPLATE_WORDS)


def build_detox_spec(model, tokenizer, *, count: int | None = None, lam: float | None = None,
                     counts: Sequence[int] = COUNTS, lams: Sequence[float] = LAMS, ppl_budget: float = PPL_BUDGET,
                     samples: int = 4, max_new_tokens: int = 20, per_template: int = 4, docstrings: int = 40,
                     forced_per_prompt: int = 6, toxic: Sequence[Sequence[str]] | None = None,
                     neutral: Sequence[str] | None = None, scorer=None, batch_size: int = 16, seed: int = 0,
                     name: str = "detox", work_dir: str | Path | None = None,
                     progress: Callable[[str], None] | None = None):
    """Choose value-vector edits that lower toxicity at a bounded fluency cost (module docstring).

    ``toxic`` (groups of prompts sharing a source line) and ``neutral`` replace the shipped
    selection prompts; ``scorer`` is a name for ``evaluation.toxicity.get_toxicity_scorer``, an
    object with ``.score(texts)`` or a function (default: alt-profanity-check, offline). The other
    arguments are :func:`steer.build.builder.build_spec`'s.
    """
    toxic_groups = [list(g) for g in (toxic if toxic is not None else toxic_prompts(per_template, seed))]
    neutral_list = list(neutral if neutral is not None else neutral_prompts(docstrings))
    if len(toxic_groups) < 2 or len(neutral_list) < 2:
        raise ValueError("need at least 2 toxic prompt groups and 2 neutral prompts (some are held out)")
    return build_spec(model, tokenizer, detox_target(scorer), force=toxic_groups, background=[[p] for p in neutral_list],
                      count=count, lam=lam, counts=counts, lams=lams, ppl_budget=ppl_budget, samples=samples,
                      max_new_tokens=max_new_tokens, forced_per_prompt=forced_per_prompt, batch_size=batch_size,
                      seed=seed, name=name, work_dir=work_dir, progress=progress)
