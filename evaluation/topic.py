"""Topic judge: a continuation is on topic when it contains a word of the topic's *judge* list.

The judge list (steer/data/concepts/topics.json) is a different list from the one methods steer
with, sharing no word, plural or token with it, so boosting the very tokens that are counted
cannot count as success; a steered model must write *about* the topic.
"""
from __future__ import annotations

import re

from steer.concepts import topics

WORD = re.compile(r"[a-z]+")


class TopicJudge:
    def __init__(self, topic: str):
        table = topics()
        if topic not in table:
            raise ValueError(f"unknown topic {topic!r}: use one of {', '.join(table)}")
        self.topic, self.words = topic, {w.lower() for w in table[topic]["judge"]}
        self.name = f"judge word list '{topic}' ({len(self.words)} words, disjoint from the steering list)"

    def hits(self, text: str) -> list[str]:
        found = []
        for w in WORD.findall(text.lower()):
            if w in self.words or (w.endswith("s") and w[:-1] in self.words):
                found.append(w)
        return found

    def judged(self, texts: list[str]) -> list[bool]:
        return [bool(self.hits(t)) for t in texts]

    def score(self, texts: list[str]) -> list[float]:
        return [float(j) for j in self.judged(texts)]
