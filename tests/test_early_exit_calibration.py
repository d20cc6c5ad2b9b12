"""Issue 16: fitting on the model's own samples, calibrated exit distributions, distribution-level targets."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import tiny_model, tiny_tokenizer
from steer import Adapter, Spec, steering
from steer.generation import early_exit, fit_exit_model, load_exit_model
from steer.generation.calibrate import fit_inverse_temperature, token_stats
from steer.generation.selfgen import DOMAINS, prompt_mix, sample_texts
from steer.generation.simulate import classifier_exits, distribution_outcome, pick_threshold
from steer.models import prepare_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


def _tiny(layers: int = 6):
    model, tokenizer = tiny_model("llama", layers=layers), tiny_tokenizer()
    prepare_tokenizer(tokenizer, model)
    return model, tokenizer


def test_prompt_mix_covers_every_domain_and_keeps_splits_apart():
    fit, held = prompt_mix(80, "fit"), prompt_mix(80, "heldout")
    assert {p.domain for p in fit} == set(DOMAINS) == {p.domain for p in held}
    assert not {p.text for p in fit} & {p.text for p in held}


def test_calibration_lowers_held_out_nll_of_the_full_models_tokens():
    """Mapped logits three times too sharp, with noise: the fitted temperature brings the NLL of
    tokens sampled from the full model down on held-out rows, and recovers the scale."""
    g = torch.Generator().manual_seed(0)
    full = torch.randn(4000, 50, generator=g) * 2
    mapped = 3.0 * (full + 0.3 * torch.randn(full.shape, generator=g))
    logp = full.log_softmax(-1)
    beta = fit_inverse_temperature(mapped[:2000], logp[:2000])
    assert 0.25 < beta < 0.4
    nxt = torch.multinomial(logp[2000:].exp(), 1, generator=g)[:, 0]
    top1 = full[2000:].argmax(-1)
    raw = token_stats(mapped[2000:], logp[2000:], 1.0, nxt, top1)
    cal = token_stats(mapped[2000:], logp[2000:], beta, nxt, top1)
    assert cal[3].mean() < raw[3].mean() - 0.1 and cal[2].mean() < raw[2].mean()
    assert (cal[0] == raw[0]).all()  # the temperature never changes the top-1


def test_fit_on_own_samples_calibrates_and_the_runtime_applies_the_temperature(tmp_path):
    model, tokenizer = _tiny()
    exit_model = fit_exit_model(model, tokenizer, max_tokens=3000, min_tokens=500, hidden=16, layers=[1, 2, 3, 4],
                                batch=16)
    info = exit_model.info
    assert info["source"] == "own samples" and info["scored_tokens"] < info["tokens"]
    assert len(exit_model.exit_scale) == 4
    for raw, cal in info["exit_nll"].values():  # held-back fit tokens: calibration never hurts much
        assert cal <= raw + 0.02
    loaded = load_exit_model(exit_model.save(tmp_path / "exit"))
    assert loaded.exit_scale == exit_model.exit_scale
    # forced exit at layer 1: logits are beta * (readout of the mapped state)
    loaded.exit_scale = [0.5, 1.0, 1.0, 1.0]
    loaded.bias = torch.full((4,), 50.0)
    loaded.probe, loaded.weight = None, torch.zeros(4, loaded.d_model)
    ids = torch.tensor([[5, 17, 33, 8]])
    adapter = Adapter(model)
    with early_exit(model, loaded, 0.0, positions="all") as stats:
        logits = model(ids).logits
    assert stats.exit_layers[1] == 4
    hidden = model(ids, output_hidden_states=True).hidden_states[2]  # layer 1's output
    expected = 0.5 * adapter.readout(loaded.maps.apply(1, hidden))
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)


def test_kl_and_perplexity_targets_are_respected_in_simulation():
    """On a held-back set, the threshold picked for a KL budget (or a perplexity budget) keeps
    the simulated mean KL (perplexity rise) within it, and saves more as the budget grows."""
    rng = np.random.default_rng(0)
    n, layers, n_layers = 3000, [2, 4, 6], 8
    kl = rng.gamma(1.0, [0.6, 0.3, 0.1], size=(n, 3))
    nll_full = rng.gamma(2.0, 1.0, size=n)

    class Stats:
        correct = kl < 0.2
        top_prob = np.ones((n, 3))
    Stats.kl, Stats.nll = kl, nll_full[:, None] + kl
    logodds = -np.log(kl) + rng.normal(0, 0.3, size=kl.shape)
    points = [dict(threshold=t, **distribution_outcome(classifier_exits(logodds, layers, n_layers, t), Stats, nll_full,
                                                       layers, n_layers)) for t in np.linspace(0, 1, 101)]
    saved = []
    for budget in (0.02, 0.05, 0.1):
        t = pick_threshold(points, kl=budget)
        point = next(p for p in points if p["threshold"] == t)
        assert point["kl"] <= budget
        saved.append(point["saved"])
    assert saved[0] < saved[1] < saved[2]
    t = pick_threshold(points, agreement=0.9, ppl_rise=0.03)
    point = next(p for p in points if p["threshold"] == t)
    assert point["ppl_rise"] <= 0.03 and point["agreement"] >= 0.9


def test_exit_model_fitted_with_a_spec_carries_its_edits():
    """An exit model fitted on the steered model maps exited states to the *steered* last layer:
    its exits agree with the steered model more often than those of an exit model fitted unsteered."""
    model, tokenizer = _tiny(layers=4)
    spec = Spec.build("boost", [("L3.N5", "set", 40.0), ("L3.N9", "set", -40.0)], model=model)
    plain = fit_exit_model(model, tokenizer, max_tokens=2500, min_tokens=500, hidden=0, layers=[1, 2], batch=16)
    steered = fit_exit_model(model, tokenizer, max_tokens=2500, min_tokens=500, hidden=0, layers=[1, 2], batch=16,
                             spec=spec)
    assert steered.info["spec"] == "boost"
    ids = torch.randint(3, 90, (4, 24), generator=torch.Generator().manual_seed(1))
    agree = {}
    with steering(model, spec):
        full = model(ids).logits.argmax(-1)
        for name, em in (("plain", plain), ("steered", steered)):
            em.bias, em.weight = torch.full((2,), 50.0), torch.zeros(2, em.d_model)  # always exit at layer 1
            with early_exit(model, em, 0.0, positions="all"):
                agree[name] = float((model(ids).logits.argmax(-1) == full).float().mean())
    assert agree["steered"] > agree["plain"]


def test_sample_texts_strips_padding_and_marks_the_prompt():
    model, tokenizer = _tiny(layers=2)
    samples = sample_texts(model, tokenizer, [[5, 6, 7], [8]], new_tokens=5, batch=2)
    assert [s.prompt_len for s in samples] == [3, 1]
    assert samples[0].ids[0, :3].tolist() == [5, 6, 7] and samples[1].ids[0, 0].item() == 8
    assert all(s.ids.shape[1] <= s.prompt_len + 5 for s in samples)


def test_budget_oracle_saves_the_most_within_its_kl_budget_and_nothing_at_zero():
    from steer.generation.simulate import budget_oracle, first_exit

    rng = np.random.default_rng(0)
    layers, n_layers = [4, 8, 12], 16
    kl = rng.exponential([1.0, 0.5, 0.1], size=(2000, 3))
    skipped = lambda exits: float((n_layers - 1 - exits).mean())
    chosen = lambda exits: float(sum(np.where(exits == layer, kl[:, j], 0.0) for j, layer in enumerate(layers)).mean())
    assert (budget_oracle(kl, layers, n_layers, 0.0) == n_layers - 1).all()
    assert (budget_oracle(kl, layers, n_layers, 1e9) == layers[0]).all()
    for budget in (0.02, 0.1, 0.3):
        exits = budget_oracle(kl, layers, n_layers, budget)
        assert chosen(exits) <= budget + 1e-9
        # no single-layer threshold rule within the same budget skips more
        for j in range(len(layers)):
            for t in np.quantile(kl[:, j], np.linspace(0, 1, 21)):
                fires = np.zeros_like(kl, dtype=bool)
                fires[:, j] = kl[:, j] <= t
                rule = first_exit(fires, layers, n_layers)
                if chosen(rule) <= budget:
                    assert skipped(rule) <= skipped(exits) + 1e-9
