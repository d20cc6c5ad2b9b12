"""Layer similarity: cosine matrix, linear CKA, top-1 agreement through the lens and fitted maps."""
from __future__ import annotations

import pytest
import torch

from conftest import random_blocks, tiny_model
from steer import Adapter
from steer.similarity import analyze, cosine_matrix, fit_maps, hidden_states, linear_cka, top1_agreement


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt"])
def test_hidden_states_are_the_layer_outputs(family):
    model = tiny_model(family, layers=3)
    ids = random_blocks(2, 16)
    hidden, top1 = hidden_states(model, ids, batch_size=1)
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
    assert hidden.shape == (3, 32, 32)
    for layer in range(2):  # transformers replaces the last one by the final-normed state
        torch.testing.assert_close(hidden[layer], out.hidden_states[layer + 1].flatten(0, 1))
    assert torch.equal(top1, out.logits.argmax(-1).flatten())
    with torch.no_grad():
        torch.testing.assert_close(Adapter(model).readout(hidden[-1]), out.logits.flatten(0, 1), rtol=1e-5, atol=1e-5)


def test_cosine_matrix_is_the_mean_per_token_cosine():
    hidden = torch.randn(4, 50, 8, generator=torch.Generator().manual_seed(1))
    hidden[2] = hidden[1] * 3 + 0.1 * hidden[0]
    matrix = cosine_matrix(hidden)
    for i in range(4):
        for j in range(4):
            expected = torch.nn.functional.cosine_similarity(hidden[i], hidden[j], dim=-1).mean()
            assert matrix[i, j] == pytest.approx(float(expected), abs=1e-5)
    assert torch.allclose(matrix.diagonal(), torch.ones(4))
    assert matrix[1, 2] > 0.95 > abs(float(matrix[0, 3]))


def test_linear_cka_matches_the_hsic_formula_and_its_invariances():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(30, 6, generator=g, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=torch.float64))
    y = torch.randn(30, 6, generator=g, dtype=torch.float64)
    hidden = torch.stack([x, 2.5 * x @ q + 1.0, y, x + 0.5 * y]).float()
    cka = linear_cka(hidden, sample=None)
    h = torch.eye(30, dtype=torch.float64) - 1 / 30

    def hsic(a, b):
        return torch.trace(a @ a.T @ h @ b @ b.T @ h)

    expected = hsic(x, y) / torch.sqrt(hsic(x, x) * hsic(y, y))
    assert cka[0, 2] == pytest.approx(float(expected), abs=1e-5)
    assert cka[0, 1] == pytest.approx(1.0, abs=1e-5)  # rotation, scale and shift do not change it
    assert torch.allclose(cka.diagonal(), torch.ones(4), atol=1e-6) and torch.allclose(cka, cka.T)
    assert float(cka[0, 2]) < float(cka[0, 3]) < 1
    assert linear_cka(hidden.repeat(1, 4, 1), sample=30).shape == (4, 4)


def test_agreement_lens_maps_and_split():
    from steer.maps import LayerMaps

    model = tiny_model("llama", seed=4, layers=3)
    ids = random_blocks(4, 16)
    hidden, top1 = hidden_states(model, ids)
    lens = top1_agreement(model, hidden, top1, chunk=7)
    assert lens[-1] == 1.0 and lens.shape == (3,)
    by_hand = (Adapter(model).readout(hidden[0]).argmax(-1) == top1).double().mean()
    assert lens[0] == pytest.approx(float(by_hand))
    identity = LayerMaps.identity([0, 1, 2], 32)
    assert torch.equal(top1_agreement(model, hidden, top1, identity), lens)

    ids = random_blocks(10, 32)
    hidden, top1 = hidden_states(model, ids)
    result = analyze(model, ids, cka_tokens=40, batch_size=3)
    assert result.tokens == 320 and result.heldout_tokens == 160 and result.cka_tokens == 40
    assert result.mapped[-1] == result.lens[-1] == 1.0  # the last layer is read as is
    held_hidden, held_top1 = hidden[:, 160:], top1[160:]
    assert torch.equal(result.lens, top1_agreement(model, held_hidden, held_top1))
    maps = fit_maps(hidden[:, :160])  # fitted on the first half only
    assert maps.layers == [0, 1]
    assert torch.equal(result.mapped, top1_agreement(model, held_hidden, held_top1, maps))
    assert torch.allclose(result.cosine, cosine_matrix(hidden))
    whole = analyze(model, ids, cka_tokens=None, batch_size=3)  # CKA on every token, not just the held-out half
    assert whole.cka_tokens == 320 and whole.heldout_tokens == 160
    with pytest.raises(ValueError, match="at least two blocks"):
        analyze(model, ids[:1])
