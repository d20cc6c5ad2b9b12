"""Scorers: perplexity against a plain forward, distinct-n by hand, toxicity scorers offline."""
from __future__ import annotations

import math

import pytest
import torch

from evaluation.diversity import distinct_n
from evaluation.perplexity import continuation_perplexity
from test_eval_helpers import char_tokenizer

PROMPTS = ["The cat", "The cat", "A much longer prompt here", "The cat", "Hi"]
CONTINUATIONS = [" sat on it.", " ran", " and more text", "", " x"]


def reference_perplexity(model, tokenizer, prompt: str, continuation: str) -> float:
    """One unpadded forward over prompt + continuation, no batching, no cache tricks."""
    p = tokenizer(prompt).input_ids
    c = tokenizer(continuation, add_special_tokens=False).input_ids
    if not c:
        return math.nan
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([p + c])).logits[0].float()
    logp = torch.log_softmax(logits[len(p) - 1:-1], -1)
    return math.exp(-logp[torch.arange(len(c)), torch.tensor(c)].mean().item())


def test_perplexity_matches_plain_forward_on_every_family(any_tiny):
    tokenizer = char_tokenizer()
    got = continuation_perplexity(any_tiny, tokenizer, PROMPTS, CONTINUATIONS, batch_size=3)
    want = [reference_perplexity(any_tiny, tokenizer, p, c) for p, c in zip(PROMPTS, CONTINUATIONS)]
    assert math.isnan(got[3]) and math.isnan(want[3])
    for g, w in zip(got, want):
        if not math.isnan(w):
            assert g == pytest.approx(w, rel=1e-4)
    assert len({round(g, 3) for g in got if not math.isnan(g)}) == 4  # the rows really differ


def test_perplexity_rejects_mismatched_lengths():
    with pytest.raises(ValueError, match="2 prompts but 1 continuations"):
        continuation_perplexity(None, char_tokenizer(), ["a", "b"], ["c"])


def test_distinct_n_counts_word_ngrams():
    texts = ["a b a b", "a b c"]
    assert distinct_n(texts, 1) == pytest.approx(3 / 7)   # a b c among 7 words
    assert distinct_n(texts, 2) == pytest.approx(3 / 5)   # (a b) (b a) (b c) among 5 bigrams
    assert distinct_n(texts, 3) == pytest.approx(3 / 3)
    assert math.isnan(distinct_n(["one"], 2))
