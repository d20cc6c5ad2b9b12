"""Diversity of a prompt's samples: distinct-n (Li et al. 2016), as in DExperts/RTP follow-ups.

Unique n-grams over all n-grams of the samples of one prompt, on whitespace words; the
protocol averages it over prompts. Steering that collapses samples onto a few safe phrases
shows up here even when perplexity looks fine.
"""
from __future__ import annotations

import math
from collections.abc import Iterable


def distinct_n(texts: Iterable[str], n: int) -> float:
    """Share of distinct word n-grams among all word n-grams of ``texts`` (nan when there are none)."""
    if n < 1:
        raise ValueError(f"distinct-n needs n >= 1, got {n}")
    total, seen = 0, set()
    for text in texts:
        words = text.split()
        for i in range(len(words) - n + 1):
            seen.add(tuple(words[i:i + n]))
            total += 1
    return len(seen) / total if total else math.nan
