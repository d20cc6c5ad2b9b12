"""Spec files: JSON/YAML round trips and validation on load."""
from __future__ import annotations

import json

import pytest

from conftest import tiny_model
from steer import Spec, SpecError, VectorName


def test_vector_names_round_trip():
    assert VectorName.parse("L25.N829") == (25, 829)
    assert str(VectorName(3, 7)) == "L3.N7"
    for bad in ("25.829", "L25N829", "L-1.N2", "l3.n4"):
        with pytest.raises(ValueError, match="bad value-vector name"):
            VectorName.parse(bad)


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_round_trip(tmp_path, suffix):
    model = tiny_model("llama")
    spec = Spec.build("detox", [(0, 3, "set", 3.0), ("L1.N9", "scale", -0.5), (1, 2, "add", 1)], model=model,
                      source="test")
    path = spec.save(tmp_path / f"spec{suffix}")
    loaded = Spec.load(path)
    assert loaded == spec and loaded.meta == {"source": "test"}
    assert [e.name for e in loaded.edits] == ["L0.N3", "L1.N9", "L1.N2"]
    loaded.validate(model)


@pytest.mark.parametrize(
    "content, message",
    [
        ("{not json", "not valid JSON"),
        ('{"edits": []}', "'name' must be a non-empty string"),
        ('{"name": "x", "edits": [{"vector": "L0.N1", "op": "set"}]}', r"edits\[0\] must have exactly"),
        ('{"name": "x", "edits": [{"vector": "L0.N1", "op": "zap", "value": 1}]}', r"edits\[0\]: unknown op"),
        ('{"name": "x", "edits": [{"vector": "L0.N1", "op": "set", "value": "3"}]}', "must be a number"),
        ('{"name": "x", "colour": 1}', "unknown key"),
        ('{"name": "x", "model": {"name": "m"}}', "'model' needs"),
    ],
)
def test_malformed_files_are_named(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(SpecError, match=message) as info:
        Spec.load(path)
    assert "bad.json" in str(info.value)


def test_missing_file():
    with pytest.raises(SpecError, match="cannot read spec"):
        Spec.load("/nonexistent/spec.json")


def test_nan_in_file_is_refused(tmp_path):
    path = tmp_path / "nan.json"
    path.write_text(json.dumps({"name": "x", "edits": [{"vector": "L0.N1", "op": "set", "value": float("nan")}]}))
    with pytest.raises(SpecError, match="finite"):
        Spec.load(path)
