"""Concepts (sets of tokens) and ranking value vectors by how strongly they promote one.

Words are matched to tokens as a model would have to *start* writing them inside running text:
each word is tried as `` word`` and `` Word`` (with the leading space, since unspaced tokens
are mostly pieces of other words: ``ass`` ends ``class``):

* a spelling that is a single token contributes that token;
* with ``match="first"`` (the default), a one-word spelling split into several tokens
  contributes its first piece when that piece has at least 4 letters and half the word (`` bast`` for
  `` bastard``), since emitting it is the model's commitment to the word; shorter pieces
  (`` f``, `` sh``) and the first words of phrases (`` what`` of "what the fuck") start too
  many innocent texts to count;
* ``match="whole"`` keeps only single-token spellings.

A word none of whose spellings yields a token is reported in ``Concept.unmatched``; a concept
with no token at all is an error.

Ranking (Geva et al. 2022) scores value vector ``v`` by the mean z-score of the concept's
tokens in its vocabulary projection ``E v``, minus the mean z-score of *background* tokens of
the same kind (every space-prefixed alphabetic token): without that contrast the ranking is
topped by vectors that promote word starts in general, not the concept. The mean and spread of ``E v`` over the whole
vocabulary come in closed form from the mean and covariance of the unembedding rows, so
ranking all vectors needs only the ``|concept| x d_model`` slice of ``E``, not a full projection.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import torch

from .errors import SteerError
from .families import Adapter
from .inputs import lines, read_text, whole
from .names import VectorName

MIN_PIECE = 4


def toxicity_words(min_severity: float = 1.0) -> list[str]:
    """The shipped surge-ai profanity lexicon (MIT): each entry and its canonical forms."""
    words: set[str] = set()
    with resources.files("steer").joinpath("data/profanity_en.csv").open(encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            if float(row["severity_rating"]) >= min_severity:
                words.update(w.strip() for key in ("text", "canonical_form_1", "canonical_form_2",
                                                   "canonical_form_3") if (w := row[key]) and w.strip())
    return sorted(words)


def _word_file(name: str) -> list[str]:
    text = resources.files("steer").joinpath(f"data/concepts/{name}.txt").read_text(encoding="utf-8")
    return [w for line in text.splitlines() if (w := line.split("#", 1)[0].strip())]


def topics() -> dict[str, dict[str, list[str]]]:
    """The shipped topics: ``{topic: {"steer": words a method may boost, "judge": other words, for success}}``."""
    import json

    text = resources.files("steer").joinpath("data/concepts/topics.json").read_text(encoding="utf-8")
    return json.loads(text)["topics"]


def builtin_words(name: str) -> list[str]:
    """Words of a built-in concept: ``toxicity``, ``positive``, ``negative`` or ``topic:NAME`` (its steering list)."""
    if name == "toxicity":
        return toxicity_words()
    if name in ("positive", "negative"):
        return _word_file(name)
    if name.startswith("topic:") and name[6:] in topics():
        return topics()[name[6:]]["steer"]
    raise KeyError(f"unknown built-in concept {name!r}: use toxicity, positive, negative or topic:NAME "
                   f"({', '.join(topics())})")


def is_builtin(name: str) -> bool:
    return name in ("toxicity", "positive", "negative") or (name.startswith("topic:") and name[6:] in topics())


BUILTIN = {"toxicity": toxicity_words, "positive": lambda: _word_file("positive"),
           "negative": lambda: _word_file("negative")}


def _letters(piece: str) -> int:
    return sum(ch.isalpha() for ch in piece)


def word_tokens(word: str, tokenizer, match: str = "first") -> list[int]:
    """Token ids that start ``word`` (see module docstring)."""
    ids: list[int] = []
    for spelling in {" " + word, " " + word[:1].upper() + word[1:]}:
        pieces = tokenizer.encode(spelling, add_special_tokens=False)
        if len(pieces) == 1:
            ids.append(pieces[0])
        elif (pieces and match == "first" and " " not in word
              and _letters(tokenizer.decode(pieces[:1])) >= max(MIN_PIECE, _letters(word) / 2)):
            ids.append(pieces[0])
    return sorted(set(ids))


def word_start_tokens(tokenizer, exclude=()) -> list[int]:
    """Every token that is a space followed by letters (the kind of token concepts are made of)."""
    excluded = set(exclude)
    ids = []
    for i in range(len(tokenizer)):
        text = tokenizer.decode([i])
        if text[:1] == " " and text[1:].isalpha() and i not in excluded:
            ids.append(i)
    return ids


@dataclass
class Concept:
    name: str
    token_ids: list[int]
    words: list[str] = field(default_factory=list)
    unmatched: list[str] = field(default_factory=list)
    background: list[int] = field(default_factory=list)  # tokens of the same kind, for contrast

    @classmethod
    def from_words(cls, name: str, words, tokenizer, match: str = "first") -> "Concept":
        if match not in ("first", "whole"):
            raise SteerError(f"unknown match {match!r}: use 'first' or 'whole'")
        if not isinstance(words, (list, tuple)) or not all(isinstance(w, str) for w in words):
            raise SteerError(f"concept {name!r}: words must be a list of strings, got {words!r}")
        words = [w.strip() for w in words if w.strip()]
        if not words:
            raise SteerError(f"concept {name!r} is empty: give at least one word")
        ids: set[int] = set()
        unmatched = []
        for word in words:
            found = word_tokens(word, tokenizer, match)
            ids.update(found)
            if not found:
                unmatched.append(word)
        if not ids:
            shown = ", ".join(f"{w!r} -> {tokenizer.tokenize(' ' + w)}" for w in unmatched[:5])
            raise SteerError(
                f"none of the words of concept {name!r} is in the vocabulary as a token ({shown}); "
                "try match='first' or words that are single tokens"
            )
        return cls(name, sorted(ids), words, unmatched, word_start_tokens(tokenizer, exclude=ids))

    @classmethod
    def from_token_ids(cls, name: str, token_ids, tokenizer) -> "Concept":
        ids = sorted({whole(i, f"concept {name!r}: token id") for i in token_ids})
        if not ids:
            raise SteerError(f"concept {name!r} is empty: give at least one token id")
        bad = [i for i in ids if not 0 <= i < len(tokenizer)]
        if bad:
            raise SteerError(f"token ids {bad[:5]} are not in the vocabulary (size {len(tokenizer)})")
        return cls(name, ids, [tokenizer.decode([i]) for i in ids])

    @classmethod
    def from_file(cls, path: str | Path, tokenizer, match: str = "first") -> "Concept":
        """One word a line (``#`` starts a comment)."""
        path = Path(path)
        words = [line.split("#", 1)[0].strip() for line in lines(read_text(path, "concept file"))]
        words = [w for w in words if w]
        if not words:
            raise SteerError(f"concept file {path} has no words: write one word a line")
        return cls.from_words(path.stem, words, tokenizer, match)

    @classmethod
    def resolve(cls, text: str, tokenizer, match: str = "first") -> "Concept":
        """A built-in name (``toxicity``, ``positive``, ``negative``, ``topic:NAME``), a file path, or comma-separated words."""
        if is_builtin(text):
            return cls.from_words(text, builtin_words(text), tokenizer, match)
        if Path(text).is_file():
            return cls.from_file(text, tokenizer, match)
        return cls.from_words(text, text.split(","), tokenizer, match)


@dataclass(frozen=True)
class RankedVector:
    name: VectorName
    score: float  # mean z-score of the concept's tokens in the vector's vocabulary projection
    top_tokens: list[str]


class ConceptScorer:
    """Scores concepts against every value vector; the concept-independent part (the vocabulary's
    covariance as each vector sees it, ~30 GFLOP on the embedded model) is computed once, so each
    further concept costs one matrix-vector product a layer. Keep one to score many concepts."""

    @torch.no_grad()
    def __init__(self, model, through_norm: bool = False):
        self.adapter = adapter = Adapter(model)
        unembed = adapter.unembed.weight.float()
        if adapter.pre_unembed is not None:
            unembed = unembed @ adapter.pre_unembed.weight.float()
        if through_norm and getattr(adapter.final_norm, "weight", None) is not None:
            unembed = unembed * adapter.final_norm.weight.float()
        self.unembed, self.mean = unembed, unembed.mean(0)
        centered = unembed - self.mean
        covariance = centered.T @ centered / unembed.shape[0]
        self.spread = []
        for layer in range(adapter.n_layers):
            vectors = adapter.value_vectors(layer).float()
            self.spread.append(((vectors @ covariance) * vectors).sum(1).clamp_min(1e-12).sqrt())

    @torch.no_grad()
    def scores(self, concept: Concept, negative: bool = False) -> torch.Tensor:
        """``(n_layers, d_ff)`` mean z-score of the concept tokens in every value vector's projection.

        ``negative`` scores the projection of ``-v`` (what a neuron promotes when its coefficient is
        negative, which SwiGLU and GeLU allow).
        """
        unembed, mean = self.unembed, self.mean
        target = (unembed[torch.tensor(concept.token_ids, device=unembed.device)] - mean).mean(0)
        if concept.background:
            target = target - (unembed[torch.tensor(concept.background, device=unembed.device)] - mean).mean(0)
        result = torch.stack([(self.adapter.value_vectors(layer).float() @ target) / spread
                              for layer, spread in enumerate(self.spread)]).cpu()
        return -result if negative else result


def concept_scores(model, concept: Concept, through_norm: bool = False, negative: bool = False) -> torch.Tensor:
    """``(n_layers, d_ff)`` mean z-score of the concept tokens in every value vector's projection
    (:meth:`ConceptScorer.scores`; keep a :class:`ConceptScorer` to score several concepts)."""
    return ConceptScorer(model, through_norm).scores(concept, negative)


@torch.no_grad()
def rank_vectors(model, tokenizer, concept: Concept, top: int = 20, through_norm: bool = False,
                 negative: bool = False, n_tokens: int = 8) -> list[RankedVector]:
    """The ``top`` value vectors promoting ``concept`` most, with their top tokens."""
    adapter = Adapter(model)
    scores = concept_scores(model, concept, through_norm, negative)
    best = scores.flatten().topk(min(top, scores.numel()))
    rows = []
    for value, flat in zip(best.values.tolist(), best.indices.tolist()):
        layer, index = divmod(flat, scores.shape[1])
        vector = adapter.value_vectors(layer)[index].float()
        from .vocab import project

        logits = project(adapter, vector[None].to(adapter.unembed.weight.dtype), through_norm)[0].float()
        ids = (-logits if negative else logits).topk(n_tokens).indices.tolist()
        rows.append(RankedVector(VectorName(layer, index), value, tokenizer.convert_ids_to_tokens(ids)))
    return rows
