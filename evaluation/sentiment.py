"""Sentiment judge: VADER (Hutto & Gilbert 2014), rule-based, its lexicon shipped in the PyPI
package vaderSentiment (MIT), so it runs offline. Imported lazily: the GPU machine lacks it, and
generation (``--stage generate``) never needs it.

A text is judged positive when VADER's compound score is >= 0.05 and negative when <= -0.05
(the thresholds VADER's authors recommend); in between it is neutral.
"""
from __future__ import annotations

from importlib import metadata

THRESHOLD = 0.05
POLARITIES = ("positive", "negative")


class VaderScorer:
    """``score(texts)``: the polarity's strength in [0, 1]; ``judged(texts)``: positive (or negative) or not."""

    def __init__(self, polarity: str = "positive"):
        if polarity not in POLARITIES:
            raise ValueError(f"polarity must be positive or negative, got {polarity!r}")
        try:
            from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
        except ImportError:
            raise ValueError("the sentiment judge needs vaderSentiment: pip install 'vaderSentiment>=3.3.2,<4' "
                             "(or generate here with --stage generate and score elsewhere)") from None
        self.polarity, self._analyzer = polarity, SentimentIntensityAnalyzer()
        self.name = f"vaderSentiment {metadata.version('vaderSentiment')}"

    def compound(self, texts: list[str]) -> list[float]:
        return [self._analyzer.polarity_scores(t)["compound"] for t in texts]

    def score(self, texts: list[str]) -> list[float]:
        sign = 1.0 if self.polarity == "positive" else -1.0
        return [max(0.0, sign * c) for c in self.compound(texts)]

    def judged(self, texts: list[str]) -> list[bool]:
        return [s >= THRESHOLD for s in self.score(texts)]
