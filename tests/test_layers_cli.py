"""``steer layers scan`` and ``steer analyze similarity`` end to end on a tiny saved model."""
from __future__ import annotations

import csv

import pytest
import torch

from conftest import save_tiny
from steer import Spec, load_model
from steer.ui.cli import main
from steer.layer_scan import scan_skips, text_blocks
from steer.similarity import cosine_matrix, hidden_states


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("layers_cli")
    save_tiny(root / "model", "llama", seed=5, layers=4)
    words = torch.randint(3, 95, (200,), generator=torch.Generator().manual_seed(0))
    (root / "text.txt").write_text(" ".join(f"w{int(i)}" for i in words))
    return root


def rows(path):
    with open(path) as handle:
        return list(csv.DictReader(handle))


def test_scan_table_png_and_budget_spec(setup, capsys):
    model_dir, text = str(setup / "model"), str(setup / "text.txt")
    out = setup / "plan.yaml"
    args = ["layers", "scan", "--text", text, "--model", model_dir, "--block", "32", "--max-tokens", "128",
            "--max-skips", "2", "--speed-tokens", "2", "--speed-rounds", "1", "--png", str(setup / "scan.png"), "--csv", str(setup / "scan.csv")]
    assert main(args + ["--max-ppl-rise", "1000", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "Cheapest single skip: layer" in printed
    assert (setup / "scan.png").stat().st_size > 10_000
    table = rows(setup / "scan.csv")
    assert [r["kind"] for r in table] == ["base"] + ["single"] * 4 + ["greedy"] * 2
    assert all(float(r["tokens_per_s"]) > 0 for r in table)
    assert len({r["tokens_per_s"] for r in table if r["kind"] == "single"}) == 1  # same compute: measured once
    assert "* = measured once for all single skips" in printed
    model, tokenizer = load_model(model_dir)
    expected = scan_skips(model, text_blocks(tokenizer, (setup / "text.txt").read_text(), 32, 128))
    for r in table[1:5]:
        score = expected.candidates[int(r["skipped"])]
        assert float(r["perplexity"]) == pytest.approx(score.perplexity, rel=1e-3)
        assert float(r["top1_agreement"]) == pytest.approx(score.agreement, abs=1e-3)
    spec = Spec.load(out)  # the widest budget takes the deepest plan
    assert [op.to_dict() for op in spec.layers] == [{"op": "skip", "layers": sorted(map(int, table[-1]["skipped"].split()))}]
    spec.validate(model)
    assert spec.meta["source"] == "steer layers scan"


def test_scan_refuses_bad_arguments(setup, capsys):
    base = ["layers", "scan", "--model", str(setup / "model"), "--png", ""]
    assert main(base + ["--text", str(setup / "text.txt"), "--out", "x.yaml"]) == 2
    assert "give both" in capsys.readouterr().err
    assert main(base + ["--text", str(setup / "missing.txt")]) == 2
    err = capsys.readouterr().err
    assert "cannot read --text" in err and "Traceback" not in err
    assert main(base + ["--text", str(setup / "text.txt"), "--block", "4096"]) == 2
    assert "text is too short" in capsys.readouterr().err


def test_similarity_writes_figures_and_csvs(setup, capsys):
    out = setup / "sim"
    assert main(["analyze", "similarity", "--text", str(setup / "text.txt"), "--model", str(setup / "model"),
                 "--block", "32", "--max-tokens", "128", "--cka-tokens", "64", "--out-dir", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    for name in ("layers_similarity.png", "layers_agreement.png"):
        assert (out / name).stat().st_size > 10_000
    matrix = rows(out / "layers_similarity.csv")
    assert len(matrix) == 16
    model, tokenizer = load_model(str(setup / "model"))
    hidden, _ = hidden_states(model, text_blocks(tokenizer, (setup / "text.txt").read_text(), 32, 128))
    cosine = cosine_matrix(hidden)
    for r in matrix:
        assert float(r["cosine"]) == pytest.approx(float(cosine[int(r["layer_i"]), int(r["layer_j"])]), abs=1e-4)
    agreement = rows(out / "layers_agreement.csv")
    assert [float(r["lens_top1_agreement"]) for r in agreement][-1] == 1.0
    assert all(0 <= float(r["map_top1_agreement"]) <= 1 for r in agreement)
