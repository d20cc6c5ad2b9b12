"""Property-based tests (Hypothesis) of every parser and transform that takes user data.

Arbitrary input gives either a valid object or the library's own error (SteerError or a subclass,
with a message), never another exception; saving and loading is the identity. Each test runs a
bounded number of examples (a few seconds), with no example database written to the repository.
"""
from __future__ import annotations

import os

import atexit
import json
import math
import shutil
import tempfile
from datetime import timedelta
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from conftest import tiny_tokenizer
from steer import Concept, Edit, Spec, SpecError, VectorName
from steer.errors import SteerError
from steer.evaluation.prompts import SOURCE, load_prompt_set
from steer.evaluation.sweep import SweepConfig, first_vectors, grid_points, with_strength
from steer.layers import LayerOp

# derandomize: CI runs the same examples every time (a new failing example is found by running
# with HYPOTHESIS_RANDOM=1, not by chance in someone else's CI run)
FUZZ = settings(max_examples=150, deadline=timedelta(seconds=2), database=None,
                derandomize=not os.environ.get("HYPOTHESIS_RANDOM"), suppress_health_check=[HealthCheck.too_slow])
FILES = settings(FUZZ, max_examples=60)  # each example writes and parses a file

# -- strategies -----------------------------------------------------------------------------------
TEXT = st.text(st.characters(exclude_categories=("Cs",)), max_size=20)  # no lone surrogates: not writable
SCALARS = st.none() | st.booleans() | st.integers() | st.floats() | TEXT
JSONISH = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
                       max_leaves=12)
NAMES = st.one_of(st.builds(lambda l, i: f"L{l}.N{i}", st.integers(0, 40), st.integers(0, 2000)), TEXT)
FINITE = st.floats(allow_nan=False, allow_infinity=False, width=64)
VALUES = st.one_of(FINITE, st.integers(-10**30, 10**30), st.floats(), SCALARS, st.sampled_from([10**400, -2**1030]))
OPS = st.sampled_from(["scale", "set", "add"])
# values of the wrong type or range, the mistakes people make in hand-written files
WRONG = st.sampled_from(["abc", "", 5, -1, 0, 2.5, math.nan, math.inf, True, 10**400, [1, 2], [["a", 1]], {"x": 1},
                         [{}], None]) | JSONISH


LAYER_OPS = st.one_of(
    st.fixed_dictionaries({"op": st.just("skip"), "layers": st.lists(st.integers(-2, 12), max_size=4) | JSONISH}),
    st.fixed_dictionaries({"op": st.just("reorder"), "range": st.lists(st.integers(-1, 12), max_size=3),
                           "order": st.lists(st.integers(0, 12), max_size=5)}),
    st.fixed_dictionaries({"op": st.just("parallel"), "range": st.lists(st.integers(-1, 12), max_size=3) | JSONISH}),
    st.fixed_dictionaries({"op": st.just("repeat"), "layer": st.integers(-1, 12) | JSONISH,
                           "times": st.integers(-1, 5) | JSONISH}),
    JSONISH,
)


@st.composite
def specs(draw, max_edits: int = 8) -> Spec:
    """Valid specs: any name, edits of a few vectors (some edited twice), finite values, simple meta."""
    vectors = draw(st.lists(st.tuples(st.integers(0, 30), st.integers(0, 2000)), min_size=1, max_size=5, unique=True))
    edits = draw(st.lists(st.tuples(st.sampled_from(vectors), OPS, st.floats(-1e6, 1e6)), max_size=max_edits))
    name = draw(TEXT.filter(lambda t: t.strip() != ""))
    meta = draw(st.dictionaries(TEXT, st.none() | st.booleans() | st.integers(-10**6, 10**6) | FINITE | TEXT, max_size=3))
    model = draw(st.none() | st.builds(dict, name=TEXT, n_layers=st.integers(1, 40), d_ff=st.integers(1, 4096),
                                       d_model=st.integers(1, 1024)))
    layers = draw(st.sampled_from([[], [{"op": "skip", "layers": [1, 3]}], [{"op": "repeat", "layer": 2, "times": 3}]]))
    return Spec.from_dict({"name": name, "edits": [{"vector": str(VectorName(*v)), "op": op, "value": value}
                                                  for v, op, value in edits],
                           "meta": meta, "layers": layers, **({"model": model} if model else {})})


@st.composite
def mutated(draw, valid: st.SearchStrategy, fields: dict[str, st.SearchStrategy]):
    """A valid document with one part broken at random: a key replaced, dropped or added, one list
    entry or one of its fields replaced, or the whole document replaced."""
    data = draw(valid)
    kind = draw(st.sampled_from(["replace", "replace", "replace", "entry", "entry", "drop", "add", "whole", "keep"]))
    key = draw(st.sampled_from(sorted(fields)))
    if kind == "replace":
        data[key] = draw(fields[key] | WRONG)
    elif kind == "drop":
        data.pop(key, None)
    elif kind == "add":
        data[draw(TEXT)] = draw(JSONISH)
    elif kind == "entry" and isinstance(data.get(key), list) and data[key]:
        i = draw(st.integers(0, len(data[key]) - 1))
        entry = data[key][i]
        if isinstance(entry, dict) and entry and draw(st.booleans()):
            entry[draw(st.sampled_from(sorted(entry)))] = draw(VALUES | NAMES | WRONG)
        else:
            data[key][i] = draw(WRONG | LAYER_OPS)
    elif kind == "whole":
        return draw(JSONISH)
    return data


SPEC_DATA = mutated(specs().map(Spec.to_dict), {
    "name": TEXT, "edits": st.lists(WRONG, max_size=3), "meta": WRONG, "layers": st.lists(LAYER_OPS, max_size=3),
    "model": st.fixed_dictionaries({"name": TEXT | JSONISH, "n_layers": st.integers(-1, 40) | JSONISH,
                                    "d_ff": st.integers(1, 64), "d_model": st.integers(1, 64)}),
})


SCRATCH = Path(tempfile.mkdtemp(prefix="steer-fuzz-"))  # files the examples write (Hypothesis reruns a test
atexit.register(shutil.rmtree, SCRATCH, ignore_errors=True)  # many times: no function-scoped tmp_path)


def assert_library_error(call):
    """Run ``call``; an exception must be the library's own, with a one-line message."""
    try:
        return call()
    except SteerError as err:
        message = str(err)
        assert message and "\n" not in message, repr(message)
        return None


# -- vector names ---------------------------------------------------------------------------------
@FUZZ
@given(st.text(max_size=16) | NAMES | JSONISH)
def test_vector_names_parse_or_spec_error(text):
    name = assert_library_error(lambda: VectorName.parse(text))
    if name is not None:
        assert str(name) == text.strip()  # one spelling per vector


@FUZZ
@given(st.integers(0, 10**9), st.integers(0, 10**9))
def test_vector_names_round_trip(layer, index):
    assert VectorName.parse(str(VectorName(layer, index))) == (layer, index)


# -- specs ----------------------------------------------------------------------------------------
@settings(FUZZ, max_examples=400)
@given(SPEC_DATA)
def test_spec_from_any_data_is_a_spec_or_spec_error(data):
    try:
        spec = Spec.from_dict(data, "fuzz.json")
    except SpecError as err:
        assert "fuzz.json" in str(err) and "\n" not in str(err)
        return
    assert isinstance(spec, Spec) and all(isinstance(e, Edit) and math.isfinite(e.value) for e in spec.edits)


@FUZZ
@given(st.tuples(JSONISH | st.integers(-3, 3), JSONISH | st.integers(-3, 3), OPS | JSONISH, VALUES))
def test_edit_from_any_fields_is_an_edit_or_spec_error(fields):
    edit = assert_library_error(lambda: Edit(*fields))
    if edit is not None:
        assert isinstance(edit.value, float) and math.isfinite(edit.value) and edit.layer >= 0 <= edit.index


@FUZZ
@given(LAYER_OPS)
def test_layer_ops_from_any_data(data):
    op = assert_library_error(lambda: LayerOp.from_dict(data))
    if op is not None:
        assert LayerOp.from_dict(op.to_dict()) == op


@FILES
@given(st.binary(max_size=200) | SPEC_DATA.map(lambda d: json.dumps(d).encode()), st.sampled_from([".json", ".yaml"]))
def test_spec_files_of_any_bytes(content, suffix):
    path = SCRATCH / f"any{suffix}"
    path.write_bytes(content)
    try:
        Spec.load(path)
    except SpecError as err:
        assert str(path) in str(err) and "\n" not in str(err)


@FILES
@given(specs(), st.sampled_from([".json", ".yaml"]))
def test_spec_save_load_is_the_identity(spec, suffix):
    loaded = Spec.load(spec.save(SCRATCH / f"round{suffix}"))
    assert loaded == spec and loaded.meta == spec.meta and loaded.to_dict() == spec.to_dict()


# -- spec transforms (strength, first n, composition) ----------------------------------------------
def _apply(affine: dict, coefficient: float) -> dict:
    return {k: coefficient * m + c for k, (m, c) in affine.items()}


@FUZZ
@given(specs(), st.floats(-4, 4) | st.floats() | SCALARS)
def test_with_strength_interpolates_each_coefficient(spec, strength):
    scaled = assert_library_error(lambda: with_strength(spec, strength))
    if scaled is None:
        return
    assert isinstance(strength, (int, float)) and math.isfinite(strength)
    before, after = spec.affine(), scaled.affine()
    assert list(after) == list(before)  # the same vectors, in the same order
    for key, (m, c) in before.items():  # a -> (1-s)a + s(am + c)
        expected = (1 + strength * (m - 1), strength * c)
        assert after[key] == pytest.approx(expected, rel=1e-9, abs=1e-6 * (1 + abs(m) + abs(c)))
    if strength == 1:
        assert scaled is spec
    if strength == 0:
        assert set(after.values()) <= {(1.0, 0.0)}


@FUZZ
@given(specs(), st.integers(-2, 8) | SCALARS)
def test_first_vectors_keeps_the_first_n_in_order(spec, n):
    kept = assert_library_error(lambda: first_vectors(spec, n))
    order = list(spec.affine())
    if kept is None:
        assert not (isinstance(n, int) and not isinstance(n, bool) and 1 <= n <= len(order))
        return
    assert list(kept.affine()) == order[:n]
    assert [e for e in spec.edits if (e.layer, e.index) in set(order[:n])] == list(kept.edits)


@FUZZ
@given(specs(), st.integers(1, 5), st.floats(-3, 3))
def test_first_vectors_and_strength_commute(spec, n, strength):
    assume(n <= len(spec.affine()))
    one = with_strength(first_vectors(spec, n), strength).affine()
    other = first_vectors(with_strength(spec, strength), n).affine()
    assert one == other


@FUZZ
@given(specs(max_edits=4), specs(max_edits=4), st.floats(-10, 10))
def test_edits_compose_in_order(first, second, coefficient):
    """Appending edits composes maps: the joint spec does what the first, then the second, does."""
    joint = first.with_edits(first.edits + second.edits).affine()
    a, b = first.affine(), second.affine()
    for key in set(a) | set(b):
        ma, ca = a.get(key, (1.0, 0.0))
        mb, cb = b.get(key, (1.0, 0.0))
        expected = (coefficient * ma + ca) * mb + cb
        got = coefficient * joint[key][0] + joint[key][1]
        assert got == pytest.approx(expected, rel=1e-6, abs=1e-3 * (1 + abs(expected)))


def test_demo_strength_refuses_non_finite():
    from steer.ui.engine import apply_strength

    spec = Spec.build("s", [("L0.N1", "scale", 0.5)])
    for bad in (math.nan, math.inf, "2", None):
        with pytest.raises(SteerError, match="strength must be"):
            apply_strength(spec, bad)


# -- prompt files ---------------------------------------------------------------------------------
JSONL_LINES = st.one_of(
    st.builds(lambda t, extra: json.dumps({"prompt": {"text": t, **extra}}), TEXT,
              st.dictionaries(st.sampled_from(["toxicity", "text", "id"]), SCALARS, max_size=2)),
    JSONISH.map(json.dumps), st.text(max_size=20),
)


@FILES
@given(st.binary(max_size=200) | st.lists(JSONL_LINES, max_size=5).map(lambda ls: "\n".join(ls).encode()),
       st.sampled_from([".jsonl", ".txt"]))
def test_prompt_files_of_any_bytes(content, suffix):
    path = SCRATCH / f"prompts{suffix}"
    path.write_bytes(content)
    try:
        data = load_prompt_set(path)
    except SteerError as err:
        assert str(path) in str(err) and "\n" not in str(err)
        return
    assert len(data) >= 1 and all(isinstance(t, str) and t.strip() for t in data["text"])
    assert all(source.startswith(f"{path}:") for source in data[SOURCE])


@FILES
@given(st.lists(st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\r\n"), min_size=1, max_size=15)
                .filter(str.strip), min_size=1, max_size=6), st.sampled_from(["\n", "\r\n"]))
def test_text_prompt_files_round_trip(prompts, newline):
    path = SCRATCH / "round.txt"
    path.write_bytes(newline.join(prompts).encode("utf-8"))
    data = load_prompt_set(path)
    assert list(data["text"]) == prompts
    assert list(data[SOURCE]) == [f"{path}:{i}" for i in range(1, len(prompts) + 1)]


@FILES
@given(st.lists(TEXT.filter(str.strip), min_size=1, max_size=5))
def test_jsonl_prompt_files_round_trip(prompts):
    path = SCRATCH / "round.jsonl"
    path.write_text("".join(json.dumps({"prompt": {"text": p}}) + "\n" for p in prompts), encoding="utf-8")
    assert list(load_prompt_set(path)["text"]) == prompts


# -- concept word lists -----------------------------------------------------------------------------
TOKENIZER = tiny_tokenizer()
WORDS = st.lists(st.sampled_from([f"w{i}" for i in range(0, 96, 7)]) | st.text(max_size=8), max_size=6)


@FUZZ
@given(WORDS | JSONISH, st.sampled_from(["first", "whole"]) | TEXT)
def test_concepts_from_any_word_list(words, match):
    concept = assert_library_error(lambda: Concept.from_words("fuzz", words, TOKENIZER, match))
    if concept is not None:
        assert concept.token_ids and all(0 <= i < len(TOKENIZER) for i in concept.token_ids)
        assert set(concept.unmatched) <= set(concept.words)


@FILES
@given(st.binary(max_size=120) | WORDS.map(lambda ws: "\n".join(ws).encode()))
def test_concept_files_of_any_bytes(content):
    path = SCRATCH / "words.txt"
    path.write_bytes(content)
    try:
        Concept.from_file(path, TOKENIZER)
    except SteerError as err:
        assert "\n" not in str(err)


# -- sweep configs ----------------------------------------------------------------------------------
GRID = st.fixed_dictionaries({}, optional={
    "intervention": st.lists(st.sampled_from(["none", "preset", "a.json", "b/a.json"]) | JSONISH, max_size=3) | JSONISH,
    "strength": st.lists(st.floats() | SCALARS, max_size=3) | st.floats(),
    "n_vectors": st.lists(st.none() | st.integers(-1, 30) | SCALARS, max_size=3),
    "early_exit": st.lists(st.booleans() | SCALARS, max_size=2),
    "strenght": JSONISH,
})
VALID_SWEEP = st.fixed_dictionaries({
    "samples": st.integers(1, 30), "limit": st.none() | st.integers(1, 9), "top_p": st.floats(0.01, 1),
    "seed": st.integers(0, 5), "judge": st.sampled_from(["embedded", "self", "owner/model"]),
    "scorer": st.sampled_from(["auto", "profanity-check", "detoxify:original"]), "challenging": st.booleans(),
    "grid": st.fixed_dictionaries({
        "intervention": st.lists(st.sampled_from(["none", "preset", "a.json", "b/a.json"]), min_size=1, max_size=3),
        "strength": st.lists(st.floats(-2, 2), min_size=1, max_size=3),
        "n_vectors": st.lists(st.none() | st.integers(1, 30), min_size=1, max_size=2)}),
})
SWEEP_DATA = mutated(VALID_SWEEP, {
    "samples": st.integers(-1, 30), "limit": st.integers(-1, 9), "top_p": st.floats(), "seed": st.integers(-2, 5),
    "judge": st.sampled_from(["not a model!", "", "a/b/c"]), "challenging": WRONG, "prompts": WRONG,
    "scorer": st.sampled_from(["perspective", "detoxify:nope", "auto:x", ""]), "grid": GRID,
    "early_exit": st.fixed_dictionaries({"exit_model": TEXT | SCALARS, "threshold": st.floats() | SCALARS}),
})


@settings(FUZZ, max_examples=300)
@given(SWEEP_DATA)
def test_sweep_configs_from_any_data(data):
    config = assert_library_error(lambda: SweepConfig.from_dict(data, "fuzz.yaml"))
    if config is None:
        return
    assert isinstance(config.challenging, bool) and 0 < config.top_p <= 1 and config.samples >= 1
    assert config.early_exit is None or 0 <= config.early_exit["threshold"] <= 1
    points = assert_library_error(lambda: grid_points(config.grid))
    if points is not None:
        assert points and len({p.name for p in points}) == len(points)
        assert all(math.isfinite(p.strength) for p in points)


@FILES
@given(st.binary(max_size=200) | SWEEP_DATA.map(lambda d: yaml.safe_dump(d).encode()))
def test_sweep_config_files_of_any_bytes(content):
    path = SCRATCH / "sweep.yaml"
    path.write_bytes(content)
    try:
        SweepConfig.load(path)
    except SteerError as err:
        assert str(path) in str(err) and "\n" not in str(err)
