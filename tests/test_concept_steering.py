"""Concept steering: spec strength / first / composition, the baselines inside generate, prompts
and judges, the builder for any concept (never on evaluation prompts), and the CLI."""
from __future__ import annotations


import pytest
import torch

from conftest import random_blocks, save_tiny, tiny_model, tiny_tokenizer
from steer import Spec, SteeringProcessor, steering
from steer.baselines import ActAddProcessor, LogitBiasProcessor, activation_addition, instructed, mean_difference

pytestmark = pytest.mark.usefixtures("one_thread")


def _logits(model, ids, spec=None):
    with torch.no_grad(), steering(model, spec):
        return model(ids).logits


def _greedy(model, ids, processors=(), n=6):
    return model.generate(ids, max_new_tokens=n, do_sample=False, logits_processor=list(processors),
                          pad_token_id=0)[:, ids.shape[1]:]


# -- specs ----------------------------------------------------------------------------------------
def test_scaled_interpolates_every_coefficient_map():
    model = tiny_model("llama")
    ids = random_blocks(2, 7)
    spec = Spec.build("s", [(1, 3, "set", 4.0), (0, 5, "scale", -1.0), (1, 9, "add", 2.0), (1, 3, "scale", 2.0)], model=model)
    assert spec.scaled(1.0) is spec
    assert torch.equal(_logits(model, ids, spec.scaled(0.0)), _logits(model, ids))  # 0 = unchanged, bit for bit
    half = dict(spec.scaled(0.5).affine())
    assert half[(1, 3)] == pytest.approx((0.5, 4.0)) and half[(0, 5)] == pytest.approx((0.0, 0.0))
    assert half[(1, 9)] == pytest.approx((1.0, 1.0))
    assert [e.name for e in spec.first(2).edits] == ["L1.N3", "L0.N5", "L1.N3"]
    with pytest.raises(ValueError, match="has 3 vectors"):
        spec.first(4)


def test_two_specs_compose_in_one_generate():
    model = tiny_model("llama")
    ids = random_blocks(2, 5, seed=1)
    down = Spec.build("down", [(1, 3, "scale", 0.0), (0, 7, "set", -3.0)], model=model)
    up = Spec.build("up", [(1, 3, "add", 2.0), (1, 11, "set", 3.0)], model=model)

    def scores(*specs):
        out = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0, output_logits=True,
                             return_dict_in_generate=True, logits_processor=[SteeringProcessor(model, s) for s in specs])
        return torch.stack(out.logits)

    together = scores(down, up)
    assert torch.allclose(together, scores(down.combined(up)), atol=1e-5)
    assert not torch.allclose(together, scores(down), atol=1e-3)
    assert not torch.allclose(together, scores(up), atol=1e-3)


# -- baselines ------------------------------------------------------------------------------------
def test_logit_bias_inside_generate():
    model = tiny_model("llama")
    ids = random_blocks(2, 5)
    out = _greedy(model, ids, [LogitBiasProcessor([42], 1e4)])
    assert (out == 42).all()
    plain = _greedy(model, ids)
    assert torch.equal(_greedy(model, ids, [LogitBiasProcessor([42], 0.0)]), plain)


def test_activation_addition_inside_generate_steers_the_prompt_too():
    model = tiny_model("llama")
    ids = random_blocks(2, 5, seed=3)
    vector = torch.randn(32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), activation_addition(model, 1, vector, 3.0):
        expected = _greedy(model, ids)
    assert torch.equal(_greedy(model, ids, [ActAddProcessor(model, 1, vector, 3.0)]), expected)
    assert torch.equal(_greedy(model, ids, [ActAddProcessor(model, 1, vector, 0.0)]), _greedy(model, ids))
    assert not torch.equal(expected, _greedy(model, ids))
    assert not any(layer._forward_hooks for layer in model.model.layers)  # removed after generate
    with pytest.raises(RuntimeError, match="not attached"):
        ActAddProcessor(model, 1, vector, 1.0)(ids, torch.zeros(2, 96))


def test_mean_difference_is_the_difference_of_last_token_means():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    vectors = mean_difference(model, tok, ["w5 w6 w7", "w8 w9"], ["w10 w11"], [0, 1])
    assert set(vectors) == {0, 1} and vectors[1].shape == (32,)
    same = mean_difference(model, tok, ["w10 w11"], ["w10 w11"], [1])
    assert same[1].abs().max() == 0


# -- prompts and judges ---------------------------------------------------------------------------
def test_neutral_prompts_split_cleanly():
    from steer.evaluation.prompts import neutral_prompts

    every, sel, ev = neutral_prompts(), neutral_prompts("selection"), neutral_prompts("evaluation")
    assert len(every) >= 300 and len(set(every)) == len(every)
    assert set(sel) | set(ev) == set(every) and not set(sel) & set(ev) and len(sel) == len(ev)
    subject = lambda p: p.split(" walked")[0].split(" opened")[0]  # noqa: E731
    assert not {subject(p) for p in sel if " walked" in p} & {subject(p) for p in ev if " walked" in p}


def test_topic_judge_lists_share_no_word_or_token_with_steering_lists():
    from steer import Concept
    from steer.concepts import topics
    from steer.evaluation.topic import TopicJudge
    from test_detox import _tokenizer

    tokenizer = _tokenizer()
    table = topics()
    assert len(table) >= 5
    for name, lists in table.items():
        steer_words = {w.lower() for w in lists["steer"]}
        forms = steer_words | {w + "s" for w in steer_words} | {w[:-1] for w in steer_words if w.endswith("s")}
        assert not forms & {w.lower() for w in lists["judge"]}, name
        steered = set(Concept.from_words(name, lists["steer"], tokenizer).token_ids)
        judged = set(Concept.from_words(name, lists["judge"], tokenizer).token_ids)
        assert not steered & judged, (name, [tokenizer.decode([t]) for t in steered & judged])
    judge = TopicJudge("sports")
    assert judge.judged(["They went to the stadium.", "The football team played a game."]) == [True, False]


def test_vader_judges_polarity():
    from steer.evaluation.sentiment import VaderScorer

    pos, neg = VaderScorer("positive"), VaderScorer("negative")
    texts = ["What a wonderful, happy day.", "This is a terrible, sad loss.", "He opened the door."]
    assert pos.judged(texts) == [True, False, False] and neg.judged(texts) == [False, True, False]
    assert pos.name.startswith("vaderSentiment ")


def test_concept_protocol_same_samples_for_every_method():
    from steer.evaluation.steer_eval import Method, best_within, generate_records, summarize_records
    from steer.evaluation.topic import TopicJudge

    model, tok = tiny_model("llama"), tiny_tokenizer()
    prompts = ["w5 w6 w7", "w8 w9", "w10 w11 w12"]
    none = generate_records(model, tok, prompts, Method("none"), samples=2, max_new_tokens=4, batch_size=4)
    again = generate_records(model, tok, prompts, Method("none"), samples=2, max_new_tokens=4, batch_size=4)
    assert none == again and len(none) == 3 and len(none[0]["continuations"]) == 2
    biased = generate_records(model, tok, prompts, Method("logit-bias", 1e4, processors=(LogitBiasProcessor([40], 1e4),)),
                              samples=2, max_new_tokens=4, batch_size=4)
    assert all(c.split() == ["w40"] * 4 for r in biased for c in r["continuations"])
    summary = summarize_records(biased, TopicJudge("food"))
    assert summary["success"] == 0.0 and summary["distinct_1"] == pytest.approx(0.125)
    runs = [dict(success=0.2, perplexity=10.0), dict(success=0.9, perplexity=10.9), dict(success=1.0, perplexity=12.0)]
    assert best_within(runs, 10.0)["success"] == 0.9


# -- the builder ----------------------------------------------------------------------------------
def test_builder_up_never_sees_evaluation_prompts(monkeypatch):
    import steer.build.builder as builder
    from steer.build import build_concept_spec
    from steer.evaluation.prompts import neutral_prompts
    from test_detox import _tokenizer

    tokenizer = _tokenizer()
    model = tiny_model("llama", vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)
    seen: list[str] = []
    sample, force = builder.sample_continuations, builder.forced_samples
    monkeypatch.setattr(builder, "sample_continuations", lambda m, t, prompts, *a, **k: (seen.extend(prompts), sample(m, t, prompts, *a, **k))[1])
    monkeypatch.setattr(builder, "forced_samples", lambda m, t, prompts, *a, **k: (seen.extend(prompts), force(m, t, prompts, *a, **k))[1])
    spec = build_concept_spec(model, tokenizer, "happy,glad,wonderful", "up", prompt_limit=8, samples=2, max_new_tokens=5,
                              counts=(2, 4), lams=(1.0,), forced_per_prompt=2, batch_size=8)
    evaluation = neutral_prompts("evaluation")
    assert seen and not any(p.startswith(e) for p in seen for e in evaluation)
    assert set(neutral_prompts("selection")[:8]) <= set(seen)
    assert spec.meta["direction"] == "up" and spec.meta["count"] == len({(e.layer, e.index) for e in spec.edits})
    # the chosen edit raises the concept's words where they were forced (teacher-forced, held-out selection samples)
    assert spec.meta["held_out_change"] > 0


def test_up_and_down_choose_opposite_edits():
    from steer.build.builder import _flip, candidates
    from test_detox import _attribution

    att = _attribution(tox_g=((0, 1), 10.0), gh=((0, 1), 0.0))
    down, up = candidates(att, 1.0), candidates(_flip(att), 1.0)
    assert down[0].value < 0 < up[0].value  # down writes less of the span's direction, up more
    prior = torch.zeros(2, 3)
    prior[0, 1] = -2.0
    # the vocabulary prior breaks ties toward the vector whose edit writes the concept's tokens
    tie = _attribution(tox_g=((0, 1), 10.0))
    tie.tox_g[1, 2] = 10.0
    assert [(c.layer, c.index) for c in candidates(_flip(tie), 1.0, prior, 1.0, "up")][0] == (0, 1)


# -- CLI ------------------------------------------------------------------------------------------
def test_cli_build_and_eval_task(tmp_path, capsys):
    from steer.ui.cli import main

    folder = save_tiny(tmp_path / "tiny")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(f"w{i} w{i + 1} w{i + 2}" for i in range(3, 40, 3)))
    out = tmp_path / "spec.json"
    assert main(["build", "--model", str(folder), "--concept", "w40,w41,w42", "--direction", "up", "--out", str(out),
                 "--prompt-file", str(prompts), "--samples", "2", "--max-new-tokens", "4", "--count", "3",
                 "--lam", "1", "--prior-weight", "0"]) == 0
    spec = Spec.load(out)
    assert spec.meta["direction"] == "up" and len({(e.layer, e.index) for e in spec.edits}) == 3
    assert main(["eval", "--task", "sentiment", "--model", str(folder), "--intervention", f"none,{out}",
                 "--prompt-file", str(prompts), "--prompts", "3", "--samples", "2", "--max-new-tokens", "3",
                 "--judge", "self", "--out", str(tmp_path / "eval"), "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "judged by vaderSentiment" in text and "| none |" in text and "| spec@1 |" in text


# -- the embedded model -----------------------------------------------------------------------------
@pytest.mark.embedded
def test_shipped_sentiment_specs_raise_their_words_on_evaluation_prompts(embedded):
    from steer import Concept
    from steer.evaluation.prompts import neutral_prompts
    from steer.presets import concept_preset_for

    model, tokenizer = embedded
    prompts = neutral_prompts("evaluation")[::10]
    enc = tokenizer(prompts, return_tensors="pt", padding=True)
    for polarity in ("positive", "negative"):
        spec = concept_preset_for(model, polarity, "up")
        assert spec is not None and spec.meta["direction"] == "up"
        ids = torch.tensor(Concept.resolve(polarity, tokenizer).token_ids)
        with torch.no_grad():
            base = torch.softmax(model(**enc).logits[:, -1].float(), -1)[:, ids].sum(1)
            with steering(model, spec):
                steered = torch.softmax(model(**enc).logits[:, -1].float(), -1)[:, ids].sum(1)
        assert (steered.mean() / base.mean()) > 1.5, (polarity, base.mean(), steered.mean())


@pytest.mark.embedded
def test_prompting_uses_the_chat_template(embedded):
    _, tokenizer = embedded
    text = instructed(tokenizer, ["The old man said"], "Continue in a positive tone.")[0]
    assert "Continue in a positive tone." in text and text.endswith("The old man said")
    assert text.count("<|im_start|>assistant") == 1 and not text.rstrip().endswith("<|im_end|>")
