"""Concepts: word matching, closed-form ranking equals brute force, clear errors."""
from __future__ import annotations

import pytest
import torch

from conftest import tiny_model
from steer import Adapter, Concept, concept_scores, toxicity_words
from steer.vocab import project


def test_closed_form_scores_equal_full_projection():
    model = tiny_model("gpt2")
    concept = Concept("c", [3, 17, 40, 41], background=[5, 6, 7, 50, 60])
    scores = concept_scores(model, concept)
    adapter = Adapter(model)
    for layer in range(adapter.n_layers):
        logits = project(adapter, adapter.value_vectors(layer).detach()).double()
        z = (logits - logits.mean(1, keepdim=True)) / logits.std(1, unbiased=False, keepdim=True)
        expected = z[:, concept.token_ids].mean(1) - z[:, concept.background].mean(1)
        torch.testing.assert_close(scores[layer].double(), expected, atol=1e-4, rtol=1e-4)
    negative = concept_scores(model, concept, negative=True)
    torch.testing.assert_close(negative, -scores)


def test_lexicon_is_shipped():
    words = toxicity_words()
    assert len(words) > 1000 and "bastard" in words
    assert len(toxicity_words(min_severity=2.5)) < len(words)


@pytest.mark.embedded
def test_word_matching_on_the_embedded_tokenizer(embedded):
    _, tokenizer = embedded
    concept = Concept.from_words("t", ["stupid", "bastard", "fuck", "zzqxv"], tokenizer)
    tokens = tokenizer.convert_ids_to_tokens(concept.token_ids)
    assert "Ġstupid" in tokens  # a single-token word
    assert "Ġf" not in tokens  # too short a first piece
    assert "fuck" in concept.unmatched and "zzqxv" in concept.unmatched
    whole = Concept.from_words("t", ["stupid", "bastard"], tokenizer, match="whole")
    assert set(whole.token_ids) <= set(concept.token_ids)
    with pytest.raises(ValueError, match="none of the words"):
        Concept.from_words("t", ["fuck", "shit"], tokenizer, match="whole")
    with pytest.raises(ValueError, match="empty"):
        Concept.from_words("t", ["", "  "], tokenizer)


@pytest.mark.embedded
def test_concept_from_file_and_ids(embedded, tmp_path):
    _, tokenizer = embedded
    path = tmp_path / "weather.txt"
    path.write_text("# weather words\nrain\nsnow  # cold\n\nsun\n")
    concept = Concept.resolve(str(path), tokenizer)
    assert concept.name == "weather" and concept.words == ["rain", "snow", "sun"]
    assert Concept.resolve("rain,snow", tokenizer).words == ["rain", "snow"]
    with pytest.raises(ValueError, match="not in the vocabulary"):
        Concept.from_token_ids("x", [5, 10 ** 6], tokenizer)
