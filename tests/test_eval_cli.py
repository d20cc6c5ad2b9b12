"""``steer eval`` / ``steer sweep``: a tiny end-to-end run, and every bad input as one clear line."""
from __future__ import annotations

import json
import re

import pytest
import yaml

from steer.ui.cli import main
from test_eval_helpers import save_tiny_lm

TINY = ["--judge", "self", "--samples", "2", "--max-new-tokens", "5", "--batch-size", "4", "--quiet"]


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_eval_compares_interventions_in_one_table_and_resumes(tmp_path, capsys, monkeypatch):
    from steer import Spec, load_model

    monkeypatch.chdir(tmp_path)
    model_dir = save_tiny_lm(tmp_path / "tiny")
    Spec.build("mute", [(1, i, "scale", 0.0) for i in range(64)], model=load_model(model_dir)[0]).save(tmp_path / "mute.yaml")
    argv = ["eval", "--model", str(model_dir), "--compare", "none,mute.yaml", "--prompts", "4", "--scorer", "profanity-check", *TINY]
    code, out, err = run(capsys, *argv)
    assert code == 0, err
    assert "| none |" in out and "| mute |" in out and "toxicity scored by alt-profanity-check" in out
    folder = next(tmp_path.glob("runs/eval-*"))
    assert {p.name for p in folder.iterdir()} >= {"none", "mute", "summary.md", "summary.csv", "pareto.png", "sweep.yaml"}
    first = json.loads((folder / "mute" / "summary.json").read_text())
    assert first["n_prompts"] == 4 and first["n_edits"] == 64
    # the same command again finds every batch done and reprints the same numbers
    code, again, _ = run(capsys, *argv)
    assert code == 0 and again.split("| none |")[1].split("|")[:5] == out.split("| none |")[1].split("|")[:5]
    assert (folder / "none" / "records-rank0.jsonl").read_text().count('"done": true') == 2


@pytest.mark.parametrize("content, message", [
    ('{"prompt": {"text": "fine"}}\n{"prompt": {"text": "broken"\n', r"bad.jsonl:2: not valid JSON"),
    ('{"prompt": {"txt": "no text"}}\n', r"bad.jsonl:1: missing prompt.text"),
    ('\n\n', r"no prompts in .*bad.jsonl"),
])
def test_bad_prompt_files(tmp_path, capsys, content, message):
    (tmp_path / "bad.jsonl").write_text(content)
    code, _, err = run(capsys, "eval", "--prompt-file", str(tmp_path / "bad.jsonl"), "--out", str(tmp_path / "o"), *TINY)
    assert code == 2 and err.count("\n") == 1
    assert re.search(message, err), err


def test_bad_options_are_clear_errors(tmp_path, capsys):
    code, _, err = run(capsys, "eval", "--scorer", "perspective", "--out", str(tmp_path / "o"), *TINY)
    assert code == 2 and "unknown scorer 'perspective'" in err
    (tmp_path / "file").write_text("x")
    code, _, err = run(capsys, "eval", "--out", str(tmp_path / "file" / "sub"), *TINY)
    assert code == 2 and "cannot write to output folder" in err
    code, _, err = run(capsys, "eval", "--prompts", "0", "--out", str(tmp_path / "o"), *TINY)
    assert code == 2 and "'limit' must be >= 1" in err
    code, _, err = run(capsys, "eval", "--prompt-file", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "o"), *TINY)
    assert code == 2 and "prompt file" in err and "not found" in err


@pytest.mark.parametrize("config, message", [
    ({"sample": 5}, "unknown key(s) sample; allowed: model"),
    ({"grid": {"strenght": [1.0]}}, "grid: unknown key(s) strenght"),
    ({"\n": None}, "unknown key(s) '\\n'; allowed"),  # found by Hypothesis: the message stays one line
    ({"grid": {"early_exit": [True]}}, "grid.early_exit has true but no 'early_exit"),
    ({"samples": 0}, "'samples' must be a whole number >= 1"),
    ({"grid": {"n_vectors": ["ten"]}}, "grid.n_vectors entries must be"),
])
def test_bad_sweep_configs(tmp_path, capsys, config, message):
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(config))
    code, _, err = run(capsys, "sweep", str(path), "--out", str(tmp_path / "o"))
    assert code == 2 and message in err and str(path) in err


def test_rerun_with_other_settings_refuses_and_keeps_results(tmp_path, capsys):
    model_dir = save_tiny_lm(tmp_path / "tiny")
    base = ["eval", "--model", str(model_dir), "--prompts", "2", "--scorer", "profanity-check", "--out", str(tmp_path / "o")]
    assert run(capsys, *base, *TINY)[0] == 0
    before = (tmp_path / "o" / "none" / "records-rank0.jsonl").read_text()
    code, _, err = run(capsys, *base, *TINY[:-1], "--seed", "7")
    assert code == 2 and "holds results of another configuration (differs in seed)" in err
    assert (tmp_path / "o" / "none" / "records-rank0.jsonl").read_text() == before


def test_prompt_sources(tmp_path, monkeypatch):
    import datasets

    from steer.evaluation.prompts import load_prompt_set, load_prompts

    shipped = load_prompt_set()
    assert len(shipped) == 400 and set(shipped["category"]) == {"insult", "profanity", "severe_toxicity", "threat"}
    (tmp_path / "p.txt").write_text("first prompt\n\n  second one\n")
    assert load_prompts(tmp_path / "p.txt") == ["first prompt", "  second one"]
    (tmp_path / "p.jsonl").write_text('{"prompt": {"text": "a", "toxicity": 0.9}, "challenging": true}\n'
                                      '{"prompt": {"text": "b", "toxicity": 0.1}, "challenging": false}\n')
    rows = load_prompt_set(tmp_path / "p.jsonl", challenging=True).to_list()
    assert rows == [{"text": "a", "challenging": True, "prompt_toxicity": 0.9, "_source": f"{tmp_path / 'p.jsonl'}:1"}]

    def offline(*args, **kwargs):
        raise ConnectionError("no internet")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(ValueError, match="cannot load allenai/real-toxicity-prompts from the hub .*offline, pass a local"):
        load_prompt_set("hub:allenai/real-toxicity-prompts", challenging=True)
