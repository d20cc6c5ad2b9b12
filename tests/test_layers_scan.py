"""The cheap layer scan gives the naive way's numbers; greedy plans and the budget pick."""
from __future__ import annotations

import math

import pytest
import torch

from conftest import random_blocks, tiny_model
from steer import Spec, steering
from steer.layer_scan import PlanScore, greedy_plans, scan_skips, tokens_per_second, within_budget
from steer.layers import LayerOp


pytestmark = pytest.mark.usefixtures("one_thread")


def perplexity_of(model, ids, skipped=()):
    """Perplexity the plain way: a full forward under a spec with these skips."""
    spec = Spec.build("p", [], model=model, layers=[LayerOp.skip(*skipped)] if skipped else [])
    with torch.no_grad(), steering(model, spec):
        logits = model(ids, use_cache=False).logits
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    return math.exp(float(nll)), logits.argmax(-1)


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt", "gemma2"])
def test_scan_equals_naive_and_plain_forward(family):
    model = tiny_model(family, layers=5)
    ids = random_blocks(5, 12)
    cheap = scan_skips(model, ids, batch_size=2)
    naive = scan_skips(model, ids, batch_size=2, reuse=False)
    base_ppl, top1 = perplexity_of(model, ids)
    assert cheap.base.perplexity == pytest.approx(base_ppl, rel=1e-6)
    assert sorted(cheap.candidates) == list(range(5))
    for k, score in cheap.candidates.items():
        other = naive.candidates[k]
        assert score.perplexity == pytest.approx(other.perplexity, rel=1e-9)
        assert score.agreement == other.agreement
        ppl, tokens = perplexity_of(model, ids, (k,))
        assert score.perplexity == pytest.approx(ppl, rel=1e-5)
        assert score.rise == pytest.approx(ppl / base_ppl - 1, abs=1e-5)
        assert score.agreement == pytest.approx(float((tokens == top1).float().mean()))
        assert score.compute == pytest.approx(4 / 5)


def test_greedy_steps_equal_naive_pairs():
    model = tiny_model("llama", seed=3, layers=5)
    ids = random_blocks(5, 12, seed=1)
    plans = greedy_plans(model, ids, max_skips=3, batch_size=3)
    assert [len(p.skipped) for p in plans] == [1, 2, 3]
    assert set(plans[0].skipped) < set(plans[1].skipped) < set(plans[2].skipped)
    base_ppl, top1 = perplexity_of(model, ids)
    # step two picked the best pair containing step one's layer, by the plain perplexity
    first = plans[0].skipped[0]
    pairs = {k: perplexity_of(model, ids, tuple(sorted((first, k))))[0] for k in range(5) if k != first}
    assert plans[1].perplexity == pytest.approx(min(pairs.values()), rel=1e-5)
    ppl, tokens = perplexity_of(model, ids, plans[2].skipped)
    assert plans[2].perplexity == pytest.approx(ppl, rel=1e-5)
    assert plans[2].agreement == pytest.approx(float((tokens == top1).float().mean()))
    assert plans[2].compute == pytest.approx(2 / 5)
    # given the single-layer scan, greedy reuses its reference: agreement is still with the unmodified model
    again = greedy_plans(model, ids, max_skips=2, batch_size=3, first=scan_skips(model, ids, batch_size=3))
    assert again[1].skipped == plans[1].skipped and again[1].agreement == plans[1].agreement
    with pytest.raises(ValueError, match="unmodified model's top-1 tokens"):
        scan_skips(model, ids, base=(1,), batch_size=3)


def test_budget_picks_the_most_skips_within_it():
    def plan(skipped, rise):
        return PlanScore(tuple(skipped), 10 * (1 + rise), rise, 0.9, 1.0)

    plans = [plan([3], 0.01), plan([3, 5], 0.04), plan([3, 5, 1], 0.2)]
    assert within_budget(plans, 0.05).skipped == (3, 5)
    assert within_budget(plans, 0.005) is None


def test_speed_is_measured_with_the_ops_applied():
    model = tiny_model("llama", layers=4)
    prompt = random_blocks(1, 6)
    calls = []
    handle = model.model.layers[2].register_forward_pre_hook(lambda *a: calls.append(1))
    assert tokens_per_second(model, prompt, [LayerOp.skip(1)], new_tokens=4) > 0
    assert len(calls) == 4  # prefill + 3 decode steps ran position 2
    handle.remove()
