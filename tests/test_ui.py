"""The demo: its engine in-process, and the app served by ``steer ui`` and driven through gradio_client.

The model is a tiny random llama with the embedded model's tokenizer (so concepts and the
toxicity lexicon resolve to real tokens) and a large init, so that steering visibly changes
what it writes.
"""
from __future__ import annotations

import json
import socket
import threading
from pathlib import Path

import pytest
import torch

from conftest import tiny_model
from steer import Concept, Spec, SpecError, VectorName, rank_vectors
from steer.errors import SteerError
from steer.models import prepare_tokenizer
from steer.ui.engine import BY_INDEX, BY_SCORE, COLUMNS, LEXICON, NEGATIVE, POSITIVE, PRESET, PROMOTE, RAISE, SUPPRESS, WORDS, Limits, Sampling, SteerDemo, \
    apply_strength

GREEDY = Sampling(temperature=0.0, max_new_tokens=8)
SAMPLED = Sampling(temperature=1.0, top_p=0.95, max_new_tokens=8, seed=3)
PROMPT = "The weather today is"


@pytest.fixture(scope="module")
def tokenizer(embedded):
    return embedded[1]


@pytest.fixture(scope="module")
def tiny(tokenizer):
    model = tiny_model("llama", vocab_size=len(tokenizer), initializer_range=0.3)
    prepare_tokenizer(tokenizer, model)
    return model


@pytest.fixture(scope="module")
def demo(tiny, tokenizer):
    return SteerDemo(tiny, tokenizer, limits=Limits(prompt_chars=200, prompt_tokens=40, max_new_tokens=16))


def spec_a(model) -> Spec:
    return Spec.build("a", [("L1.N3", "set", 40.0), ("L1.N9", "set", 40.0)], model=model)


def spec_b(model) -> Spec:
    return Spec.build("b", [("L1.N20", "set", -40.0), ("L0.N5", "scale", 0.0)], model=model)


# -- engine -------------------------------------------------------------------------------------
def test_apply_strength_scales_each_edits_change():
    spec = Spec.build("s", [("L0.N1", "scale", 0.5), ("L0.N2", "add", 2.0), ("L0.N3", "set", 4.0)])
    assert apply_strength(spec, 1.0) == spec
    # one meaning everywhere (Spec.scaled): each vector's map a -> a*m + c moves toward identity
    assert [(e.op, e.value) for e in apply_strength(spec, 2.0).edits] == [
        ("scale", 0.0), ("scale", 1.0), ("add", 4.0), ("scale", -1.0), ("add", 8.0)]
    assert all(e.value == (1.0 if e.op == "scale" else 0.0) for e in apply_strength(spec, 0.0).edits)


def test_concept_spec_takes_the_top_ranked_vectors(demo, tiny, tokenizer):
    ranked = rank_vectors(tiny, tokenizer, Concept.from_words("w", ["rain", "storm"], tokenizer), top=4)
    suppress = demo.concept_spec(WORDS, "rain, storm", SUPPRESS, strength=2.0, n=4)
    assert [e.name for e in suppress.edits] == [str(r.name) for r in ranked]
    assert {(e.op, e.value) for e in suppress.edits} == {("scale", -1.0)}  # 1 - 2
    promote = demo.concept_spec(WORDS, "rain, storm", PROMOTE, strength=3.0, n=4)
    assert {(e.op, e.value) for e in promote.edits} == {("scale", -2.0), ("add", 3.0)}  # set 1 at strength 3
    lexicon = demo.concept_spec(LEXICON, n=7)
    assert len(lexicon.edits) == 7 and lexicon.model.n_layers == 2
    with pytest.raises(ValueError, match="between 1 and 500"):
        demo.concept_spec(LEXICON, n=501)
    with pytest.raises(ValueError, match="type one or more words"):
        demo.concept_spec(WORDS, "  ")


def test_builder_modes_build_once_then_reuse(demo, tiny, monkeypatch, tmp_path):
    import steer.build

    monkeypatch.setenv("STEER_CACHE", str(tmp_path))
    calls = []

    def fake_build(model, tokenizer, concept, direction, **size):
        calls.append((concept, direction))
        return Spec.build(f"{concept}-{direction}", [("L1.N4", "set", 2.0), ("L0.N2", "set", 1.0)], model=model,
                          direction=direction)

    monkeypatch.setattr(steer.build, "build_concept_spec", fake_build)
    raised = demo.concept_spec(WORDS, "rain, storm", RAISE, strength=1.0, n=1)
    assert [e.name for e in raised.edits] == ["L1.N4"] and calls == [("rain, storm", "up")]
    again = demo.concept_spec(WORDS, "rain, storm", RAISE, strength=0.5, n=2)  # from the disk cache
    assert len(calls) == 1 and {e.name for e in again.edits} == {"L1.N4", "L0.N2"}
    positive = demo.concept_spec(POSITIVE, "", RAISE, n=2)  # no shipped spec fits the tiny model: built
    assert calls[-1] == ("positive", "up") and positive.edits
    assert demo.default_mode(POSITIVE) == RAISE and demo.default_mode(WORDS) == SUPPRESS


def test_detox_preset_is_the_default_when_one_fits(tiny, tokenizer, monkeypatch):
    import steer.presets

    preset = Spec.build("detox preset", [("L1.N4", "scale", -1.0), ("L0.N2", "set", 2.0), ("L1.N8", "add", 1.0)],
                        model=tiny)
    monkeypatch.setattr(steer.presets, "preset_for", lambda model: preset)
    demo = SteerDemo(tiny, tokenizer)
    assert demo.concepts == [PRESET, POSITIVE, NEGATIVE, LEXICON, WORDS] and demo.default_n() == 3
    assert demo.default_spec().edits == preset.edits  # strength 1, all edits: as shipped
    half = demo.concept_spec(PRESET, strength=0.5, n=2)
    assert [(e.name, e.op, e.value) for e in half.edits] == [("L1.N4", "scale", 0.0), ("L0.N2", "scale", 0.5),
                                                             ("L0.N2", "add", 1.0)]
    monkeypatch.setattr(steer.presets, "preset_for", lambda model: (_ for _ in ()).throw(ValueError("no preset fits")))
    without = SteerDemo(tiny, tokenizer)
    assert without.concepts == [POSITIVE, NEGATIVE, LEXICON, WORDS] and without.preset_error == "no preset fits"
    with pytest.raises(ValueError, match="no detox preset for this model: no preset fits"):
        without.concept_spec(PRESET)


def test_pair_shares_the_seed_and_only_steering_differs(demo, tiny):
    empty = Spec.build("none", [], model=tiny)
    plain, same = demo.generate(PROMPT, empty, SAMPLED)
    assert plain.text == same.text and plain.tokens == 8
    plain2, steered = demo.generate(PROMPT, spec_a(tiny), SAMPLED)
    assert plain2.text == plain.text  # same seed, unsteered: reproducible
    assert steered.text != plain.text
    for c in (plain, steered):
        assert c.tokens_per_s > 0 and c.layers_saved is None
        assert c.scorer.startswith("alt-profanity-check")  # the offline scorer, named
        assert c.toxicity is not None and 0.0 <= c.toxicity <= 1.0  # scoring must not silently break


def test_concurrent_requests_each_get_their_own_steering(demo, tiny):
    specs = {"a": spec_a(tiny), "b": spec_b(tiny)}
    alone = {k: demo.continue_one(PROMPT, s, SAMPLED).text for k, s in specs.items()}
    assert alone["a"] != alone["b"]
    together: dict[str, list[str]] = {"a": [], "b": []}
    start = threading.Barrier(2)

    def worker(key):
        start.wait()
        for _ in range(3):
            together[key].append(demo.continue_one(PROMPT, specs[key], SAMPLED).text)

    threads = [threading.Thread(target=worker, args=(k,)) for k in specs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert together == {k: [alone[k]] * 3 for k in specs}


@pytest.fixture(scope="module")
def exit_dir(tiny, tokenizer, tmp_path_factory):
    """An exit model fitted for the tiny model on a little docstring prose, saved to a folder."""
    from steer import generation
    from steer.generation.corpus import docstring_text

    fitted = generation.fit_exit_model(tiny, tokenizer, docstring_text("fit", max_chars=12_000), max_tokens=2048)
    return fitted.save(tmp_path_factory.mktemp("exit-model"))


def test_early_exit_reports_layers_saved(tiny, tokenizer, exit_dir):
    demo = SteerDemo(tiny, tokenizer, exit_model=str(exit_dir))
    assert demo.has_exit_model and demo.threshold == demo.exit_model().default_threshold
    plain, steered = demo.generate(PROMPT, spec_a(tiny), SAMPLED)
    never = demo.generate(PROMPT, spec_a(tiny), SAMPLED, early_exit=True, threshold=1.0)
    assert [c.text for c in never] == [plain.text, steered.text]  # threshold 1 never exits
    assert [c.layers_saved for c in never] == [0.0, 0.0]
    eager = demo.generate(PROMPT, spec_a(tiny), SAMPLED, early_exit=True, threshold=0.0)
    assert all(0.0 < c.layers_saved < 1.0 for c in eager)


def test_exit_model_is_fitted_once_then_loaded_from_the_cache(tiny, tokenizer, exit_dir, tmp_path, monkeypatch):
    from steer import generation

    monkeypatch.setenv("STEER_CACHE", str(tmp_path))
    fits = []
    monkeypatch.setattr(generation, "fit_exit_model", lambda *a, **k: fits.append(1) or generation.load_exit_model(exit_dir))
    monkeypatch.setattr("steer.generation.corpus.docstring_text", lambda split: "some prose")
    first = SteerDemo(tiny, tokenizer)
    assert not first.has_exit_model and first.threshold == 0.9 and fits == []  # nothing fitted up front
    fitted = first.exit_model()
    assert fits == [1] and first.threshold == fitted.default_threshold
    again = SteerDemo(tiny, tokenizer)  # a restart: loads the cached fit at once, fits nothing
    assert again.has_exit_model and fits == [1]
    assert torch.equal(again.exit_model().weight, fitted.weight)
    assert SteerDemo(tiny, tokenizer, exit_threshold=0.5).threshold == 0.5


def test_inputs_are_bounded_with_clear_messages(demo, tiny):
    spec = spec_a(tiny)
    with pytest.raises(SteerError, match="the prompt is only whitespace"):
        demo.generate("   ", spec)
    with pytest.raises(ValueError, match="201 characters long; the limit is 200"):
        demo.generate("x" * 201, spec)
    with pytest.raises(ValueError, match="tokens long; the limit is 40"):
        demo.generate(" dog" * 45, spec)
    with pytest.raises(ValueError, match="max new tokens must be between 1 and 16, got 17"):
        demo.generate(PROMPT, spec, Sampling(max_new_tokens=17))
    with pytest.raises(ValueError, match="top-p"):
        demo.generate(PROMPT, spec, Sampling(top_p=0.0, max_new_tokens=8))


def test_table_rows_round_trip_and_bad_rows_are_named(demo, tiny):
    spec = spec_b(tiny)
    rows = demo.rows(spec)
    assert [r[:3] for r in rows] == [["L1.N20", "set", -40.0], ["L0.N5", "scale", 0.0]]
    assert all(len(r[3].split(" | ")) == 8 for r in rows)  # top tokens shown
    again = demo.spec_from_rows(rows + [["", "", "", ""]], "b", demo.extra(spec))
    assert again == spec
    added = demo.edit_rows(rows, "L0.N7, L0.N5", "set", 2.5)
    assert [r[:3] for r in added] == [["L1.N20", "set", -40.0], ["L0.N7", "set", 2.5], ["L0.N5", "set", 2.5]]
    assert [r[0] for r in demo.edit_rows(added, "L1.N20")] == ["L0.N7", "L0.N5"]
    with pytest.raises(SpecError, match="row 1 \\(L0.N1\\): value must be a number"):
        demo.spec_from_rows([["L0.N1", "scale", "lots"]])
    with pytest.raises(SpecError, match="unknown layer 7"):
        demo.spec_from_rows([["L7.N1", "scale", 0]])
    with pytest.raises(ValueError, match="bad value-vector name"):
        demo.edit_rows(rows, "layer 3", "set", 1.0)


def test_search_finds_the_vectors_promoting_words(demo, tiny, tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("STEER_CACHE", str(tmp_path))
    by_score = demo.search("rain, storm", top=5, method=BY_SCORE)
    ranked = rank_vectors(tiny, tokenizer, Concept.from_words("w", ["rain", "storm"], tokenizer), top=5)
    assert [r[0] for r in by_score] == [str(r.name) for r in ranked]
    assert [r[2] for r in by_score] == demo.top_tokens([r.name for r in ranked])
    # a word that some vector promotes most: the index search must list that vector
    index = demo.index()
    for layer, idx in ((layer, idx) for layer in range(2) for idx in range(64)):
        token = int(index.top_ids[layer, idx, 0])
        word = tokenizer.decode([token])
        if word.startswith(" ") and word[1:].isalpha() and len(word) > 4:
            ids = Concept.from_words("w", [word[1:]], tokenizer).token_ids
            if token in ids:
                break
    found = demo.search(word[1:], top=500, method=BY_INDEX)
    assert f"L{layer}.N{idx}" in [row[0] for row in found]
    for name, hits, _ in found:
        vector = VectorName.parse(name)
        assert hits == sum(int(i) in ids for i in index.top_ids[vector.layer, vector.index].tolist()) >= 1


# -- the served app, through gradio_client ----------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(tiny, tokenizer, exit_dir, tmp_path_factory):
    """``steer ui --model DIR --port P`` run through the CLI (serving in this process), and a client."""
    from gradio_client import Client

    from steer.ui import app as ui_app
    from steer.ui.cli import main

    folder = tmp_path_factory.mktemp("tiny-model")
    tiny.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    port = _free_port()
    launched = []
    real_launch = ui_app.launch

    def launch(page, host, port, block=True, **kwargs):  # serve without blocking the test
        launched.append((page, host, port, block))
        return real_launch(page, host, port, block=False, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ui_app, "launch", launch)
        assert main(["ui", "--model", str(folder), "--port", str(port), "--max-new-tokens", "16",
                     "--exit-model", str(exit_dir)]) == 0
    page, host, bound, block = launched[0]
    assert (host, bound, block) == ("127.0.0.1", port, True)
    try:
        yield Client(f"http://127.0.0.1:{port}/", verbose=False,
                     download_files=str(tmp_path_factory.mktemp("downloads")))
    finally:
        page.close()


def table(rows) -> dict:
    return {"headers": COLUMNS, "data": [list(r) + [""] * (4 - len(r)) for r in rows]}


def generate(client, rows, prompt=PROMPT, **settings):
    s = dict(temperature=1.0, top_p=0.95, max_new=8, seed=3, early=False, threshold=0.9) | settings
    return client.predict(prompt, table(rows), "api spec", s["temperature"], s["top_p"], s["max_new"], s["seed"],
                          s["early"], s["threshold"], api_name="/generate")


ROWS_A = [["L1.N3", "set", 40.0], ["L1.N9", "set", 40.0]]
ROWS_B = [["L1.N20", "set", -40.0], ["L0.N5", "scale", 0.0]]


def test_api_generate_shows_both_continuations_with_scores(served, demo, tiny):
    plain, plain_stats, steered, steered_stats, threshold = generate(served, ROWS_A)
    expected = demo.generate(PROMPT, spec_a(tiny), SAMPLED)
    assert (plain, steered) == (expected[0].text, expected[1].text)
    assert steered_stats.startswith("*api spec*")
    for stats, c in zip((plain_stats, steered_stats), expected):
        assert "tokens/s" in stats and "8 tokens" in stats and "early exit" not in stats
        assert c.toxicity is not None and c.scorer in stats
        assert f"toxicity {c.toxicity:.3f}" in stats


def test_api_early_exit_shows_layers_saved(served, tiny, tokenizer, exit_dir):
    outputs = generate(served, ROWS_A, early=True, threshold=0.0)
    expected = SteerDemo(tiny, tokenizer, exit_model=str(exit_dir)).generate(PROMPT, spec_a(tiny), SAMPLED, True, 0.0)
    assert (outputs[0], outputs[2], outputs[4]) == (expected[0].text, expected[1].text, 0.0)
    for stats, c in zip((outputs[1], outputs[3]), expected):
        assert f"early exit saved {100 * c.layers_saved:.1f}% of layers" in stats and c.layers_saved > 0


def test_api_concurrent_requests_with_different_specs(served):
    alone = {k: generate(served, rows)[2] for k, rows in (("a", ROWS_A), ("b", ROWS_B))}
    assert alone["a"] != alone["b"]
    s = dict(temperature=1.0, top_p=0.95, max_new=8, seed=3, early=False, threshold=0.9)
    jobs = {k: [served.submit(PROMPT, table(rows), k, *s.values(), api_name="/generate") for _ in range(2)]
            for k, rows in (("a", ROWS_A), ("b", ROWS_B))}
    assert {k: [j.result(timeout=120)[2] for j in js] for k, js in jobs.items()} == {k: [v, v] for k, v in alone.items()}


def test_api_download_then_upload_round_trips(served, tiny):
    from gradio_client import handle_file

    path = served.predict(table(ROWS_B), "my spec", api_name="/download")
    spec = Spec.load(path)
    assert Path(path).name == "my-spec.json"
    assert spec.name == "my spec" and spec.edits == spec_b(tiny).edits and spec.model.n_layers == 2
    rows, name, summary = served.predict(handle_file(path), api_name="/upload")
    assert name == "my spec" and [r[:3] for r in rows["data"]] == ROWS_B
    assert "2 value-vector edits on 2 layers" in summary


def test_api_errors_are_messages_not_tracebacks(served, tmp_path):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    bad_json = tmp_path / "broken.json"
    bad_json.write_text("{not json")
    wrong_model = tmp_path / "other.json"
    wrong_model.write_text(json.dumps({"name": "x", "edits": [{"vector": "L25.N829", "op": "set", "value": 3}]}))
    cases = [
        (lambda: generate(served, ROWS_A, prompt="x" * 2001), "the prompt is 2001 characters long; the limit is 2000"),
        (lambda: generate(served, ROWS_A, max_new=17), "Value 17 is greater than maximum value 16"),  # the slider
        (lambda: generate(served, [["L1.N99", "set", 1.0]]), "L1.N99: index 99 out of range"),
        (lambda: served.predict(handle_file(str(bad_json)), api_name="/upload"), "is not valid JSON"),
        (lambda: served.predict(handle_file(str(wrong_model)), api_name="/upload"), "unknown layer 25"),
        (lambda: served.predict("", BY_SCORE, 5, api_name="/search"), "type one or more words"),
    ]
    for call, message in cases:
        with pytest.raises(AppError) as caught:
            call()
        assert message in str(caught.value) and "Traceback" not in str(caught.value)


def test_api_explorer_adds_and_removes_vectors(served, demo):
    found = served.predict("rain, storm", BY_SCORE, 3, api_name="/search")
    assert [r[0] for r in found["data"]] == [r[0] for r in demo.search("rain, storm", 3, BY_SCORE)]
    first = found["data"][0][0]
    rows, summary = served.predict(table(ROWS_A), first, "set", 2.0, "with one more", api_name="/add")
    assert [r[:3] for r in rows["data"]] == ROWS_A + [[first, "set", 2.0]] and "3 value-vector edits" in summary
    rows, summary = served.predict(rows, "L1.N3", "with one more", api_name="/remove")
    assert [r[0] for r in rows["data"]] == ["L1.N9", first] and "2 value-vector edits" in summary


def test_api_intervention_from_a_concept(served, demo):
    rows, name, summary = served.predict(WORDS, "rain, storm", SUPPRESS, 2.0, 3, api_name="/intervention")
    expected = demo.concept_spec(WORDS, "rain, storm", SUPPRESS, 2.0, 3)
    assert [r[:3] for r in rows["data"]] == [[e.name, e.op, e.value] for e in expected.edits]
    assert name == expected.name
