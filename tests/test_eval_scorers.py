"""Scorers: perplexity against a plain forward, distinct-n by hand, toxicity scorers offline."""
from __future__ import annotations

import math

import pytest
import torch

from steer.evaluation.diversity import distinct_n
from steer.evaluation.perplexity import continuation_perplexity
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


# -- toxicity scorers -------------------------------------------------------------------------

from steer.evaluation.toxicity import DetoxifyScorer, ScorerUnavailable, get_toxicity_scorer  # noqa: E402

CLASSES = ["obscene", "toxic", "severe_toxic", "threat", "insult", "identity_hate"]  # "toxic" is column 1


def tiny_detoxify_checkpoint(folder):
    """A Detoxify-format checkpoint (config + state dict) and a local HF config + tokenizer folder."""
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    config_dir = folder / "bert-config"
    config_dir.mkdir(parents=True)
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "you", "are", "an", "idiot", "have", "a", "nice", "day"]
    (config_dir / "vocab.txt").write_text("\n".join(words) + "\n")
    BertTokenizerFast(vocab_file=str(config_dir / "vocab.txt")).save_pretrained(config_dir)
    config = BertConfig(vocab_size=len(words), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=64, num_labels=len(CLASSES),
                        initializer_range=1.0)
    config.save_pretrained(config_dir)
    torch.manual_seed(0)
    model = BertForSequenceClassification(config).eval()
    with torch.no_grad():
        model.classifier.bias.copy_(torch.arange(len(CLASSES)) - 2.0)  # columns differ: picking the right one matters
    checkpoint = folder / "tiny-detoxify.ckpt"
    torch.save({"config": {"arch": {"args": {"model_type": "bert-base-uncased", "model_name": "BertForSequenceClassification",
                                             "tokenizer_name": "BertTokenizer", "num_classes": len(CLASSES)}},
                           "dataset": {"args": {"classes": CLASSES}}},
                "state_dict": model.state_dict()}, checkpoint)
    return checkpoint, config_dir, model


def test_detoxify_loads_a_local_checkpoint_offline(tmp_path, monkeypatch):
    import huggingface_hub.constants
    from transformers import BertTokenizerFast

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    checkpoint, config_dir, model = tiny_detoxify_checkpoint(tmp_path)
    scorer = get_toxicity_scorer(f"detoxify:{checkpoint}", config_dir=config_dir, batch_size=2)
    texts = ["you are an idiot", "have a nice day", "nice"]
    tokenizer = BertTokenizerFast.from_pretrained(config_dir)
    with torch.no_grad():
        logits = model(**tokenizer(texts, return_tensors="pt", padding=True)).logits
    want, other = torch.sigmoid(logits[:, 1]).tolist(), torch.sigmoid(logits[:, 0]).tolist()
    assert scorer.name == "detoxify:tiny-detoxify.ckpt"
    assert scorer.score(texts) == pytest.approx(want, abs=1e-5)
    assert len(set(round(s, 4) for s in want)) >= 2 and scorer.score(texts) != pytest.approx(other, abs=1e-3)
    # without the local config folder Detoxify asks the hub for bert-base-uncased: a clear error offline
    with pytest.raises(ScorerUnavailable, match="--detoxify-config"):
        DetoxifyScorer(str(checkpoint))


def test_detoxify_without_weights_says_how_to_use_a_local_checkpoint(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(ScorerUnavailable, match=r"cannot be fetched.*--scorer detoxify:/path/to/file.ckpt --detoxify-config DIR"):
        get_toxicity_scorer("detoxify:unbiased")
    with pytest.raises(ScorerUnavailable, match="neither a file nor a variant"):
        get_toxicity_scorer("detoxify:nonsense")


def test_auto_uses_profanity_check_offline_and_it_ranks_toxic_text_higher(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))  # no cached Detoxify weights
    monkeypatch.delenv("STEER_DETOXIFY_CHECKPOINT", raising=False)
    scorer = get_toxicity_scorer("auto")
    assert scorer.name.startswith("alt-profanity-check ")
    toxic, polite = scorer.score(["you are a fucking idiot", "thank you for the lovely dinner"])
    assert 0 <= polite < 0.5 <= toxic <= 1


def test_auto_picks_detoxify_from_the_environment(tmp_path, monkeypatch):
    checkpoint, config_dir, _ = tiny_detoxify_checkpoint(tmp_path)
    monkeypatch.setenv("STEER_DETOXIFY_CHECKPOINT", str(checkpoint))
    monkeypatch.setenv("STEER_DETOXIFY_CONFIG", str(config_dir))
    assert get_toxicity_scorer("auto").name == "detoxify:tiny-detoxify.ckpt"


def test_unknown_and_unavailable_scorers_are_clear_errors(monkeypatch):
    import evaluate

    with pytest.raises(ValueError, match="unknown scorer 'perspective': use one of auto, profanity-check"):
        get_toxicity_scorer("perspective")

    def no_hub(*args, **kwargs):
        raise ConnectionError("offline")

    monkeypatch.setattr(evaluate, "load", no_hub)
    with pytest.raises(ScorerUnavailable, match="evaluate's toxicity measurement needs its script and model"):
        get_toxicity_scorer("evaluate")
