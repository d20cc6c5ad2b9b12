"""Layer ops in spec files: JSON/YAML round trips and clear errors for bad input."""
from __future__ import annotations

import json

import pytest

from conftest import tiny_model
from steer import Spec, SpecError
from steer.layers import LayerOp

OPS = [
    {"op": "skip", "layers": [0, 5]},
    {"op": "reorder", "range": [1, 3], "order": [3, 1, 2]},
    {"op": "parallel", "range": [6, 7]},
    {"op": "repeat", "layer": 4, "times": 3},
]


def eight_layers():
    return tiny_model("llama", num_hidden_layers=8)


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_round_trip_with_value_edits(tmp_path, suffix):
    model = eight_layers()
    spec = Spec.build("mixed", [(2, 3, "set", 1.5)], model=model, layers=OPS, note="x")
    path = spec.save(tmp_path / f"spec{suffix}")
    loaded = Spec.load(path)
    assert loaded == spec and loaded.layers == spec.layers
    assert [op.to_dict() for op in loaded.layers] == OPS
    assert [str(op) for op in loaded.layers] == ["skip 0,5", "reorder 1..3 as 3,1,2", "parallel 6..7", "repeat 4 x3"]
    loaded.validate(model)
    assert "layers" not in Spec.build("plain", [(0, 1, "add", 1.0)]).to_dict()  # old files stay as they were


def test_constructors_match_the_file_form():
    assert LayerOp.from_dict({"op": "skip", "layers": 3}) == LayerOp.skip(3)
    assert LayerOp.from_dict(OPS[1]) == LayerOp.reorder(1, 3, [3, 1, 2])
    assert LayerOp.from_dict(OPS[2]) == LayerOp.parallel(6, 7)
    assert LayerOp.from_dict(OPS[3]) == LayerOp.repeat(4, 3)


@pytest.mark.parametrize("ops, message", [
    ([{"op": "skip", "layers": [8]}], r"unknown layer 8; this model has layers 0\.\.7"),
    ([{"op": "parallel", "range": [6, 9]}], "unknown layer 8"),
    ([{"op": "reorder", "range": [5, 7], "order": [7, 6, 5]}, {"op": "skip", "layers": [2, 6]}],
     r"overlapping ops: \[0\] \(reorder 5\.\.7 as 7,6,5\) and \[1\] \(skip 2,6\) both touch layer 6"),
    ([{"op": "repeat", "layer": 3, "times": 2}, {"op": "parallel", "range": [2, 4]}], "both touch layer 3"),
    ([{"op": "parallel", "range": [5, 4]}], r"empty range \[5, 4\]"),
    ([{"op": "skip", "layers": []}], "no layers given"),
    ([{"op": "reorder", "range": [1, 3], "order": [1, 2, 2]}], "exactly once"),
    ([{"op": "reorder", "range": [1, 3]}], r"needs exactly the keys op, order, range, e\.g\."),
    ([{"op": "repeat", "layer": 3, "times": 0}], "times must be >= 1"),
    ([{"op": "skip", "layers": [-1]}], "must be >= 0"),
    ([{"op": "skip", "layers": ["L3"]}], "must be an integer"),
    ([{"op": "parallel", "range": [2]}], r"'range' must be \[first, last\]"),
    ([{"op": "drop", "layers": [1]}], "unknown layer op 'drop'"),
    ({"op": "skip", "layers": [1]}, "must be a list of layer ops"),
])
def test_bad_layer_ops_get_clear_errors(tmp_path, ops, message):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"name": "x", "edits": [], "layers": ops}))
    with pytest.raises(SpecError, match=message) as info:
        Spec.load(path).validate(eight_layers())
    if "unknown layer " not in message:  # file-level problems name the file; model fit is checked later
        assert "bad.json" in str(info.value)


def test_validate_names_the_spec_and_the_model_size():
    spec = Spec.build("deep", [], layers=[LayerOp.skip(12)])
    with pytest.raises(SpecError, match=r"spec 'deep': layers\[0\] \(skip 12\): unknown layer 12"):
        spec.validate(eight_layers())
