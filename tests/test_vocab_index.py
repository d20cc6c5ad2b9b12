"""Vocabulary index: exact against brute force, cached, and readable."""
from __future__ import annotations

import pytest
import torch

from conftest import tiny_model
from steer import Adapter, VocabIndex
from steer.vocab import _select, project


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("STEER_CACHE", str(tmp_path / "cache"))


@pytest.mark.parametrize("largest", [True, False])
def test_grouped_selection_is_exact(largest):
    torch.manual_seed(0)
    logits = torch.randn(37, 64 * 40)
    logits[3, 500:700] = 9.0 if largest else -9.0  # ties and a cluster inside one group
    values, ids = _select(logits, 30, largest)
    ref_values, _ = logits.topk(30, dim=1, largest=largest)
    torch.testing.assert_close(values, ref_values)
    torch.testing.assert_close(logits.gather(1, ids), ref_values)


@pytest.mark.parametrize("family", ["gpt2", "llama", "opt", "phi"])
def test_index_matches_brute_force(family):
    model = tiny_model(family, vocab_size=64 * 6)
    adapter = Adapter(model)
    index = VocabIndex.build(model, k=10, chunk=24)
    for layer in range(adapter.n_layers):
        logits = project(adapter, adapter.value_vectors(layer).detach())
        top = logits.topk(10, dim=1)
        bottom = logits.topk(10, dim=1, largest=False)
        torch.testing.assert_close(index.top_scores[layer].float(), top.values, atol=2e-3, rtol=2e-3)
        torch.testing.assert_close(index.bottom_scores[layer].float(), bottom.values, atol=2e-3, rtol=2e-3)
        assert torch.equal(index.top_ids[layer].long(), top.indices)


def test_index_is_cached_and_keyed_by_weights(tmp_path, monkeypatch):
    import steer.vocab

    model = tiny_model("llama")
    first = VocabIndex.build(model, k=5)
    files = list((tmp_path / "cache" / "index").glob("*.pt"))
    assert len(files) == 1
    with monkeypatch.context() as patch:  # the second build must load from disk: computing would fail
        patch.setattr(steer.vocab, "_select", lambda *a, **k: pytest.fail("recomputed instead of loading"))
        again = VocabIndex.build(model, k=5)
    assert torch.equal(first.top_ids, again.top_ids)
    assert len(list((tmp_path / "cache" / "index").glob("*.pt"))) == 1
    with torch.no_grad():
        Adapter(model).value_vectors(1)[4] += 1.0
    VocabIndex.build(model, k=5)
    assert len(list((tmp_path / "cache" / "index").glob("*.pt"))) == 2


def test_search_and_tokens():
    model = tiny_model("llama")
    index = VocabIndex.build(model, k=5)

    class Tok:
        def convert_ids_to_tokens(self, i):
            return f"t{i}"

    token = int(index.top_ids[1, 7, 0])
    rows = index.search([token], top=500)
    assert any(name == (1, 7) and rank == 0 for name, hits, rank in rows)
    assert all(token in index.top_ids[n.layer, n.index].tolist() for n, _, _ in rows)
    assert index.tokens(1, 7, Tok(), n=1)[0][0] == f"t{token}"
    with pytest.raises(ValueError, match="unknown layer 5"):
        index.tokens(5, 0, Tok())
    with pytest.raises(ValueError, match="index 64 out of range"):
        index.tokens(0, 64, Tok())
