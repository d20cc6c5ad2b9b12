"""``steer vectors ...`` end to end through the real CLI entry point."""
from __future__ import annotations

import pytest

from conftest import save_tiny
from steer import VocabIndex, load_model
from steer.ui.cli import main


@pytest.fixture()
def tiny_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("STEER_CACHE", str(tmp_path / "cache"))
    return str(save_tiny(tmp_path / "model"))


def test_show_prints_the_indexed_top_tokens(tiny_dir, capsys):
    assert main(["vectors", "show", "1", "7", "-n", "3", "--model", tiny_dir]) == 0
    out = capsys.readouterr().out
    model, tokenizer = load_model(tiny_dir)
    index = VocabIndex.build(model)
    for token, _ in index.tokens(1, 7, tokenizer, n=3):
        assert repr(token) in out
    assert "L1.N7 promotes when negative" in out


def test_search_lists_vectors_with_the_word(tiny_dir, capsys):
    model, tokenizer = load_model(tiny_dir)
    index = VocabIndex.build(model)
    word = tokenizer.convert_ids_to_tokens(int(index.top_ids[0, 3, 0]))
    assert main(["vectors", "search", word, "--model", tiny_dir]) == 0
    out = capsys.readouterr().out
    assert "L0.N3 " in out


def test_bad_input_is_one_clear_line(tiny_dir, capsys):
    assert main(["vectors", "show", "9", "0", "--model", tiny_dir]) == 2
    err = capsys.readouterr().err
    assert "unknown layer 9" in err and "Traceback" not in err
    assert main(["vectors", "show", "1", "5000", "--model", tiny_dir]) == 2
    assert "out of range" in capsys.readouterr().err


@pytest.mark.embedded
def test_concept_ranking_on_the_embedded_model(capsys):
    assert main(["vectors", "concept", "help,thanks,kind", "--top", "5"]) == 0
    out = capsys.readouterr().out
    assert "concept 'help,thanks,kind'" in out
    assert "'Ġhelp'" in out or "'Ġthanks'" in out  # a vector promoting the concept's own words
