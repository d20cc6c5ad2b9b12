"""One model identity and one cached write (steer/identity.py)."""
from __future__ import annotations

import pytest
import torch

from conftest import tiny_model
from steer.identity import atomic_write, model_fingerprint, weights_digest


def test_a_dtype_change_of_the_same_weights_keeps_the_identity():
    model = tiny_model("llama")
    fp32 = model_fingerprint(model)
    assert model_fingerprint(tiny_model("llama").to(torch.bfloat16)) == fp32
    assert model_fingerprint(tiny_model("llama", seed=1)) != fp32
    tensor = torch.randn(4, 8)
    assert weights_digest("h", [tensor]) == weights_digest("h", [tensor.to(torch.bfloat16)])
    assert weights_digest("h", [tensor]) != weights_digest("other header", [tensor])


def test_an_exit_model_fitted_in_float32_accepts_the_bfloat16_load():
    from test_early_exit import exit_model_for

    exit_model = exit_model_for(tiny_model("llama", layers=4), check=(1,))
    exit_model.check_model(tiny_model("llama", layers=4).to(torch.bfloat16))
    with pytest.raises(ValueError, match="fitted for"):
        exit_model.check_model(tiny_model("llama", layers=4, seed=3))


def test_atomic_write_leaves_nothing_half_written(tmp_path):
    target = tmp_path / "a" / "file.json"
    with pytest.raises(RuntimeError):
        atomic_write(target, lambda tmp: (tmp.write_text("half"), (_ for _ in ()).throw(RuntimeError("killed"))))
    assert not target.exists() and list(target.parent.iterdir()) == []
    atomic_write(target, lambda tmp: tmp.write_text("whole"))
    assert target.read_text() == "whole" and [p.name for p in target.parent.iterdir()] == ["file.json"]
    folder = tmp_path / "folder"
    atomic_write(folder, lambda tmp: (tmp.mkdir(), (tmp / "x").write_text("1")))
    atomic_write(folder, lambda tmp: (tmp.mkdir(), (tmp / "x").write_text("2")))  # another process won: kept
    assert (folder / "x").read_text() == "1" and sorted(p.name for p in tmp_path.iterdir()) == ["a", "folder"]
