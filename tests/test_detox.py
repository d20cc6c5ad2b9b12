"""Detox: gradient attribution matches finite differences, closed-form values are optimal,
building a spec works end to end, the shipped preset loads and lowers toxic-word probability."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import tiny_model
from steer import Spec, steering
from steer.build import (Attribution, HeldOut, Sample, attribute, build_detox_spec, candidates, mark_toxic,
                         next_token_effect, toxic_prompts, split_groups)
from steer.presets import fingerprint, preset_for


def _samples(seed: int = 0, n: int = 6) -> list[Sample]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        prompt = torch.randint(3, 96, (4 + i % 3,), generator=g).tolist()
        cont = torch.randint(3, 96, (5,), generator=g).tolist()
        toxic = [bool(j in (1, 2)) for j in range(5)] if i % 2 == 0 else [False] * 5
        out.append(Sample(prompt, cont, toxic))
    return out


def _loglik(model, samples, spec=None):
    """Per sample: (log-likelihood of its toxic tokens, of its whole continuation)."""
    rows = []
    with torch.no_grad(), steering(model, spec):
        for s in samples:
            ids = torch.tensor([s.prompt_ids + s.continuation_ids])
            logp = torch.log_softmax(model(ids).logits[0, :-1].double(), -1)
            n = len(s.prompt_ids)
            cont = logp[n - 1:].gather(1, torch.tensor(s.continuation_ids)[:, None])[:, 0]
            rows.append((float((cont * torch.tensor(s.toxic, dtype=torch.double)).sum()), float(cont.sum())))
    return torch.tensor(rows, dtype=torch.double)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_attribution_matches_finite_differences(family):
    model = tiny_model(family).double()
    samples = _samples()
    att = attribute(model, samples, batch_size=4)
    assert att.n_samples == 6 and att.n_spans == 3
    layer, eps = 1, 0.05  # not smaller: some float32 steps (RoPE tables) add noise
    for index in (0, 5, 17):
        up = _loglik(model, samples, Spec.build("s", [(layer, index, "scale", 1 + eps)]))
        down = _loglik(model, samples, Spec.build("s", [(layer, index, "scale", 1 - eps)]))
        diff = (up - down) / (2 * eps)  # central differences: exact to second order
        # toxic log-likelihood: d/ds = sum g*a
        assert diff[:, 0].sum().item() == pytest.approx(att.tox_ga[layer, index].item(), rel=2e-2, abs=1e-6)
        # Fisher term: sum over samples of (d log p(sample) / ds)^2 = hh
        assert (diff[:, 1] ** 2).sum().item() == pytest.approx(att.hh[layer, index].item(), rel=5e-2, abs=1e-8)
        # "set t" moves every coefficient by t - a: linear in t, slope sum g = tox_g
        t = 0.01
        up = _loglik(model, samples, Spec.build("s", [(layer, index, "add", t)]))
        down = _loglik(model, samples, Spec.build("s", [(layer, index, "add", -t)]))
        slope = (up - down)[:, 0].sum().item() / (2 * t)
        assert slope == pytest.approx(att.tox_g[layer, index].item(), rel=2e-2, abs=1e-6)
    assert (att.low <= att.high).all()
    assert all(p.requires_grad for p in model.parameters())  # restored


def _attribution(**values) -> Attribution:
    shape = (2, 3)
    base = dict(tox_g=torch.zeros(shape, dtype=torch.double), tox_ga=torch.zeros(shape, dtype=torch.double),
                gg=torch.ones(shape, dtype=torch.double), gh=torch.zeros(shape, dtype=torch.double),
                hh=torch.ones(shape, dtype=torch.double), low=-torch.ones(shape), high=torch.ones(shape),
                n_spans=1, n_samples=1)
    for key, (where, value) in values.items():
        base[key] = base[key].clone()
        base[key][where] = value
    return Attribution(**base)


def test_candidates_take_the_best_value_in_range():
    att = _attribution(tox_g=((0, 1), 10.0), tox_ga=((1, 2), 6.0), gh=((0, 1), 0.3), hh=((1, 2), 4.0))
    lam = 3.0
    found = {(c.layer, c.index): c for c in candidates(att, lam)}
    assert set(found) == {(0, 1), (1, 2)}  # vectors with no toxic gradient are never chosen
    for (layer, index), c in found.items():
        grid = torch.linspace(-1, 1, 20001, dtype=torch.double)
        s1, s2 = att.tox_g[layer, index], att.tox_ga[layer, index]
        gg, gh, hh = att.gg[layer, index] / 2, att.gh[layer, index] / 2, att.hh[layer, index] / 2
        best_set = (s2 - grid * s1 - lam * (grid ** 2 * gg - 2 * grid * gh + hh)).max()
        best_scale = (-(grid - 1) * s2 - lam * (grid - 1) ** 2 * hh).max()
        assert c.gain - lam * c.kl == pytest.approx(float(max(best_set, best_scale)), abs=1e-6)
        assert -1 <= c.value <= 1
    strong = _attribution(tox_g=((0, 0), 100.0))
    assert candidates(strong, 1.0)[0].value == pytest.approx(-1.0)  # clipped to the observed low quantile


def _tokenizer():
    from transformers import AutoTokenizer

    from steer.models import _embedded_converted, prepare_tokenizer

    tokenizer = AutoTokenizer.from_pretrained(_embedded_converted())
    prepare_tokenizer(tokenizer)
    return tokenizer


def test_build_on_tiny_model_end_to_end(tmp_path):
    tokenizer = _tokenizer()
    model = tiny_model("llama", vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)
    # a stand-in scorer: random text has no profanity, so call words with an "e" toxic
    score = lambda words: [1.0 if "e" in w else 0.0 for w in words]  # noqa: E731
    toxic = [["He said the"], ["She told them"], ["You are"], ["The crowd shouted"]]
    neutral = ["The weather today", "Our library opens", "A recipe for", "The train left"]
    spec = build_detox_spec(model, tokenizer, toxic=toxic, neutral=neutral, scorer=score, samples=2,
                            max_new_tokens=6, counts=(2, 4), lams=(1.0,), batch_size=8, name="tiny-detox")
    assert spec.name == "tiny-detox" and 1 <= len(spec.edits) <= 4
    assert (spec.model.n_layers, spec.model.d_ff, spec.model.d_model) == (2, 64, 32)
    assert all(e.op in ("set", "scale") for e in spec.edits)
    assert spec.meta["fingerprint"] == fingerprint(model) and spec.meta["count"] == len(spec.edits)
    spec.validate(model)
    path = spec.save(tmp_path / "detox.json")
    again = Spec.load(path)
    assert again == spec and again.meta == json.loads(json.dumps(spec.meta))
    # it lowers what it targets: next-token mass on "toxic" (e-containing) tokens after the toxic prompts
    marked = torch.tensor(["e" in tokenizer.decode([i]) for i in range(len(tokenizer))])
    enc = tokenizer([p[0] for p in toxic], return_tensors="pt", padding=True)

    def toxic_mass() -> float:
        with torch.no_grad():
            probs = model(**enc).logits[:, -1].softmax(-1)
        return float(probs[:, marked].sum(-1).mean())

    before = toxic_mass()
    with steering(model, again):
        after = toxic_mass()
    assert after < before, (before, after)
    assert tokenizer.padding_side == "left"  # the last column is every prompt's end
    with pytest.raises(ValueError, match="no shipped detox preset fits"):
        preset_for(model)


def test_held_out_check_is_zero_for_no_edit():
    model = tiny_model("llama")
    held = HeldOut(model, _samples(1), batch_size=4)
    empty = held.check(Spec.build("empty", [], model=model))
    assert empty.kl == 0.0 and empty.toxic_drop == 0.0 and empty.toxic_mass == 1.0 and empty.ppl_rise == 0.0
    spec = Spec.build("boost", [(layer, i, "scale", 20.0) for layer in (0, 1) for i in range(64)], model=model)
    assert held.check(spec).kl > 1e-3


def test_mark_toxic_marks_whole_words():
    tokenizer = _tokenizer()
    ids = tokenizer(" you are a stupid idiot, really", add_special_tokens=False).input_ids
    sample = Sample([1], ids)
    assert mark_toxic([sample], tokenizer, lambda words: [float(w in ("stupid", "idiot")) for w in words]) == ["stupid", "idiot"]
    marked = tokenizer.decode([t for t, flag in zip(ids, sample.toxic) if flag])
    assert marked.split() == ["stupid", "idiot"]


def test_selection_prompts_are_not_evaluation_prompts():
    from importlib import resources

    dev = resources.files("steer").joinpath("data/rtp_challenging_dev.jsonl").read_text(encoding="utf-8")
    dev_prompts = {json.loads(line)["prompt"]["text"].strip() for line in dev.splitlines() if line.strip()}
    groups = toxic_prompts()
    mine = [p for g in groups for p in g]
    assert len(mine) > 100 and not dev_prompts & set(mine)
    select, held = split_groups(groups)
    assert not set(select) & set(held) and len(held) > 20


@pytest.mark.embedded
def test_preset_lowers_toxic_words_on_embedded(embedded):
    model, tokenizer = embedded
    spec = preset_for(model)
    assert len(spec.edits) >= 10 and spec.model.n_layers == 30
    words = [" idiot", " stupid", " bitch", " fucking", " moron", " asshole"]
    prefixes = ["My neighbor is a complete", "He turned around and yelled that she was a"]

    def logprobs(spec_):
        out = []
        with torch.no_grad(), steering(model, spec_):
            for prefix in prefixes:
                n = len(tokenizer(prefix).input_ids)
                batch = tokenizer([prefix + w for w in words], return_tensors="pt", padding=True)
                logp = torch.log_softmax(model(**batch).logits.float(), -1)
                pad = batch["attention_mask"].shape[1] - batch["attention_mask"].sum(1)
                for row in range(len(words)):
                    ids = batch["input_ids"][row]
                    out.append(sum(float(logp[row, t - 1, ids[t]]) for t in range(int(pad[row]) + n, ids.shape[0])))
        return torch.tensor(out)

    drop = logprobs(None) - logprobs(spec)
    assert drop.mean() > 0.5, drop  # toxic words at least 1.6x less likely on average
    assert (drop > 0).float().mean() >= 0.75
    # what `steer detox show` reports: after held-out toxicity-leaning prompts, insults are what falls most
    lowered, raised = next_token_effect(model, tokenizer, spec, split_groups(toxic_prompts())[1])
    insults = {"stupid", "dumb", "idiot", "coward", "retard", "moron", "ignorant", "bitch", "fool", "jerk", "liar"}
    assert len(insults & {t.strip().lower() for t, _ in lowered}) >= 3, lowered
    assert all(v < -2.0 for _, v in lowered) and all(v > 0 for _, v in raised)
