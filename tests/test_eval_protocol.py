"""The protocol, the run folder, sweeps and reports, on a tiny character-level llama."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import yaml

from steer.evaluation.perplexity import continuation_perplexity
from steer.evaluation.prompts import load_prompt_set
from steer.evaluation.protocol import TIMING_KEYS, generate_samples, run_eval, summarize
from steer.evaluation.report import pareto_front, write_reports
from steer.evaluation.store import RunStore
from steer.evaluation.sweep import Grid, Point, SweepConfig, first_vectors, grid_points, point_spec, with_strength
from steer.evaluation.toxicity import ProfanityCheckScorer
from steer import Spec, steering
from conftest import tiny_model
from test_eval_helpers import char_tokenizer, save_tiny_lm, tiny_lm

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = dict(samples=2, max_new_tokens=6, batch_size=2)


def stable(summary: dict) -> dict:
    return {k: v for k, v in summary.items() if k not in TIMING_KEYS and k != "name"}


@pytest.fixture(scope="module")
def scorer():
    return ProfanityCheckScorer()


def test_same_seed_same_records_other_seed_other_records(tmp_path, scorer):
    model, tokenizer = tiny_lm()
    prompts = load_prompt_set(limit=4).to_list()
    a = run_eval(model, tokenizer, prompts, seed=3, scorer=scorer, out_dir=tmp_path / "a", progress=False, **SETTINGS)
    b = run_eval(model, tokenizer, prompts, seed=3, scorer=scorer, out_dir=tmp_path / "b", progress=False, **SETTINGS)
    c = run_eval(model, tokenizer, prompts, seed=4, scorer=scorer, progress=False, **SETTINGS)
    rows_a = [json.loads(x) for x in (tmp_path / "a" / "records-rank0.jsonl").read_text().splitlines()]
    rows_b = [json.loads(x) for x in (tmp_path / "b" / "records-rank0.jsonl").read_text().splitlines()]
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert strip(rows_a) == strip(rows_b)
    assert stable(a) == stable(b) and a["perplexity"] != c["perplexity"]
    assert a["n_prompts"] == 4 and a["samples"] == 2 and a["scorer"].startswith("alt-profanity-check")
    assert [r["category"] for r in rows_a if "index" in r] == [p["category"] for p in prompts]  # extra fields kept


def test_steering_reaches_generation_and_judge_stays_unsteered(tmp_path, scorer):
    model, tokenizer = tiny_lm()
    prompts = ["Hello there", "A quick test"]
    spec = Spec.build("loud", [(layer, i, "set", 8.0) for layer in (0, 1) for i in range(16)], model=model)
    plain = run_eval(model, tokenizer, prompts, scorer=scorer, progress=False, **SETTINGS)
    steered = run_eval(model, tokenizer, prompts, spec, scorer=scorer, out_dir=tmp_path, progress=False, **SETTINGS)
    assert steered["intervention"] == "loud" and steered["n_edits"] == 32
    assert steered["perplexity"] != plain["perplexity"]
    assert not any(m._forward_pre_hooks for m in model.modules())  # steering hooks removed
    rows = [r for r in map(json.loads, (tmp_path / "records-rank0.jsonl").read_text().splitlines()) if "index" in r]
    pairs = [(r["prompt"], c) for r in rows for c in r["continuations"]]
    recorded = [p for r in rows for p in r["perplexity"]]
    unsteered = continuation_perplexity(model, tokenizer, *zip(*pairs))
    with steering(model, spec):
        under_spec = continuation_perplexity(model, tokenizer, *zip(*pairs))
    assert recorded == pytest.approx(unsteered, rel=1e-5) and recorded != pytest.approx(under_spec, rel=1e-3)


def test_perplexity_read_off_generate_equals_the_judge_pass(scorer):
    model, tokenizer = tiny_lm()
    prompts = ["Hello there", "A quick test", "Why"]
    # an empty spec edits nothing but forces the separate judge pass; None reads generate's log-probs
    recorded = run_eval(model, tokenizer, prompts, scorer=scorer, progress=False, **SETTINGS)
    judged = run_eval(model, tokenizer, prompts, Spec.build("empty", [], model=model), scorer=scorer, progress=False, **SETTINGS)
    assert judged["generated_tokens"] == recorded["generated_tokens"]
    assert judged["perplexity"] == pytest.approx(recorded["perplexity"], rel=1e-5)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma2", "opt"])
def test_shared_prefill_generates_what_plain_generate_does(family):
    model, tokenizer = tiny_model(family), char_tokenizer()
    enc = tokenizer(["Hello there", "Hi", "A longer prompt, padded less"], return_tensors="pt", padding=True)
    kwargs = dict(do_sample=True, top_k=1, max_new_tokens=5, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    shared = generate_samples(model, enc, 3, True, **kwargs)
    plain = generate_samples(model, enc, 3, False, **kwargs)
    assert torch.equal(shared.sequences, plain.sequences) and shared.sequences.shape == (9, enc["input_ids"].shape[1] + 5)
    for a, b in zip(shared.logits, plain.logits):
        assert torch.allclose(a, b, atol=1e-4)


def test_summary_numbers_by_hand():
    rows = [
        dict(index=0, continuations=["a b", "a b"], toxicity=[0.2, 0.7], perplexity=[2.0, 4.0], tokens=[2, 2]),
        dict(index=1, continuations=["c d e", "f"], toxicity=[0.1, 0.3], perplexity=[math.nan, 6.0], tokens=[0, 1]),
    ]
    summary = summarize({1: ({"tokens": 5, "seconds": 2.0, "layers_saved": None}, rows[1:]),
                         0: ({"tokens": 4, "seconds": 1.0, "layers_saved": None}, rows[:1])})
    assert summary["emt"] == pytest.approx(0.5) and summary["emt_std"] == pytest.approx(0.2)
    assert summary["tox_prob"] == 0.5 and summary["perplexity"] == pytest.approx(4.0)
    assert summary["distinct_1"] == pytest.approx((2 / 4 + 4 / 4) / 2)
    assert summary["distinct_2"] == pytest.approx((1 / 2 + 2 / 2) / 2)
    assert summary["tokens_per_s"] == pytest.approx(3.0) and summary["layers_saved"] is None


def test_store_drops_a_cut_off_batch_and_counts_each_batch_once(tmp_path):
    store = RunStore(tmp_path, {"k": 1})
    store.append(0, [{"index": 0, "x": 1}], {"tokens": 1, "seconds": 0.1})
    store.append(1, [{"index": 1, "x": 2}], {"tokens": 1, "seconds": 0.1})
    with store.path.open("a") as handle:  # what a kill mid-batch can leave behind
        handle.write(json.dumps({"batch": 2, "index": 2}) + "\n" + '{"batch": 2, "ind')
    # another process's file holding batch 1 again must not count twice
    (tmp_path / "records-rank1.jsonl").write_text(
        json.dumps({"batch": 1, "index": 1, "x": 99}) + "\n" + json.dumps({"batch": 1, "done": True}) + "\n")
    reopened = RunStore(tmp_path, {"k": 1})
    batches = reopened.batches()
    assert sorted(batches) == [0, 1] and batches[1][1][0]["x"] == 2
    assert store.path.read_text().count("\n") == 4 and store.path.read_text().endswith("\n")
    with pytest.raises(ValueError, match="another configuration .*differs in k"):
        RunStore(tmp_path, {"k": 2})


def test_spec_transforms():
    spec = Spec.build("s", [("L0.N1", "scale", 0.0), ("L1.N2", "set", 3.0), ("L0.N3", "add", 2.0), ("L1.N2", "scale", 2.0)])
    half = with_strength(spec, 0.5)
    maps = {(e.layer, e.index, e.op): e.value for e in half.edits}
    assert maps == {(0, 1, "scale"): 0.5, (1, 2, "scale"): 0.5, (1, 2, "add"): 3.0, (0, 3, "scale"): 1.0, (0, 3, "add"): 1.0}
    assert [(e.layer, e.index) for e in first_vectors(spec, 2).edits] == [(0, 1), (1, 2), (1, 2)]
    with pytest.raises(ValueError, match="has 3 vectors"):
        first_vectors(spec, 4)
    points = grid_points(Grid(intervention=["none", "specs/a.json"], strength=[0.5, 1], n_vectors=[None, 2],
                              early_exit=[False, True]))
    assert [p.name for p in points] == ["none", "none-exit", "a-s0.5", "a-s0.5-exit", "a-s0.5-n2", "a-s0.5-n2-exit",
                                        "a", "a-exit", "a-n2", "a-n2-exit"]


def test_pareto_front_and_reports(tmp_path):
    assert pareto_front([(10, 0.5), (12, 0.3), (11, 0.6), (9, 0.9), (math.nan, 0.1)]) == [True, True, False, True, False]
    base = dict(judge="tiny", n_prompts=2, samples=2, top_p=0.9, max_new_tokens=6, seed=0, scorer="alt-profanity-check 1.9.1",
                distinct_1=1.0, distinct_2=1.0, distinct_3=math.nan, tokens_per_s=5.0, layers_saved=None, n_edits=0, emt_std=0.1,
                tox_prob=0.5)
    runs = [dict(base, name="none", emt=0.5, perplexity=10.0), dict(base, name="preset", emt=0.3, perplexity=12.0),
            dict(base, name="bad", emt=0.6, perplexity=13.0)]
    paths = write_reports(runs, tmp_path, title="t")
    table = paths["markdown"].read_text()
    assert "alt-profanity-check 1.9.1" in table and "| preset | 0.300 |" in table
    assert [line.split("|")[-3].strip() for line in table.splitlines() if line.startswith("| none") or line.startswith("| bad")] == ["*", ""]
    assert paths["csv"].read_text().splitlines()[0].startswith("name,")
    import matplotlib.image

    assert matplotlib.image.imread(paths["plot"]).shape[0] > 100


def test_early_exit_is_wired_through_generation(monkeypatch, scorer):
    from steer import generation

    model, tokenizer = tiny_lm()
    calls = []

    class Stats:
        layers_saved_fraction, tokens = 0.25, 0

    @contextmanager
    def fake_early_exit(m, exit_model, threshold):
        calls.append((m is model, exit_model, threshold))
        yield Stats()

    monkeypatch.setattr(generation, "early_exit", fake_early_exit, raising=False)
    monkeypatch.setattr(generation, "load_exit_model", lambda path: f"loaded:{path}", raising=False)
    summary = run_eval(model, tokenizer, ["Hi", "Yo"], scorer=scorer, early_exit=("exit.pt", 0.8), progress=False, **SETTINGS)
    assert calls == [(True, "loaded:exit.pt", 0.8)] * 2 and summary["layers_saved"] == 0.25
    monkeypatch.delattr(generation, "early_exit")
    with pytest.raises(ValueError, match="early exit needs generation.early_exit"):
        run_eval(model, tokenizer, ["Hi"], scorer=scorer, early_exit=("exit.pt", 0.8), progress=False, **SETTINGS)


def _sweep_file(tmp_path: Path, model_dir: Path, out: Path, **extra) -> Path:
    spec_path = tmp_path / "damp.json"
    if not spec_path.exists():
        from steer import load_model

        model, _ = load_model(model_dir)
        Spec.build("damp", [(0, i, "scale", -2.0) for i in range(24)], model=model).save(spec_path)
    config = dict(model=str(model_dir), judge="self", limit=8, scorer="profanity-check", out=str(out),
                  grid={"intervention": ["none", str(spec_path)]}, **dict(SETTINGS, **extra))
    path = tmp_path / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "steer", *args]


def test_sweep_killed_with_sigkill_resumes_to_the_uninterrupted_result(tmp_path, scorer):
    model_dir = save_tiny_lm(tmp_path / "tiny")
    out = tmp_path / "sweep"
    config = _sweep_file(tmp_path, model_dir, out)
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.Popen(_cli("sweep", str(config), "--quiet"), cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    records = out / "none" / "records-rank0.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if records.exists() and '"done": true' in records.read_text():
            break
        time.sleep(0.02)
    assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = records.read_text().count('"done": true')
    assert 1 <= done_before < 8 and not (out / "summary.md").exists()  # really killed mid-run

    result = subprocess.run(_cli("sweep", str(config), "--quiet"), cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "| none |" in result.stdout and "| damp |" in result.stdout

    from steer import load_model

    model, tokenizer = load_model(model_dir)
    prompts = load_prompt_set(limit=8).to_list()
    cfg = SweepConfig.load(config)
    for point in (Point("none", 1.0, None, False), Point(str(tmp_path / "damp.json"), 1.0, None, False)):
        spec = point_spec(model, point, {})
        reference = run_eval(model, tokenizer, prompts, spec, scorer=scorer, progress=False, seed=cfg.seed, **SETTINGS)
        resumed = json.loads((out / point.name / "summary.json").read_text())
        assert stable(resumed) == stable(json.loads(json.dumps(reference))), point.name
        lines = [json.loads(x) for x in (out / point.name / "records-rank0.jsonl").read_text().splitlines()]
        assert sorted(r["index"] for r in lines if "index" in r) == list(range(8))  # nothing lost, nothing twice


def test_accelerate_launch_two_processes_merge_to_the_single_process_result(tmp_path, scorer):
    model_dir = save_tiny_lm(tmp_path / "tiny")
    out = tmp_path / "dp"
    config = _sweep_file(tmp_path, model_dir, out, batch_size=4)
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "-m", "steer", "sweep", str(config), "--quiet"]
    result = subprocess.run(command, cwd=tmp_path, env=dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1"),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("| none |") == 1  # only the main process prints
    shards = {p.name: p.read_text().count('"done": true') for p in (out / "none").glob("records-rank*.jsonl")}
    assert shards == {"records-rank0.jsonl": 2, "records-rank1.jsonl": 2}
    from steer import load_model

    model, tokenizer = load_model(model_dir)
    reference = run_eval(model, tokenizer, load_prompt_set(limit=8).to_list(), scorer=scorer, progress=False,
                         **dict(SETTINGS, batch_size=4))
    assert stable(json.loads((out / "none" / "summary.json").read_text())) == stable(json.loads(json.dumps(reference)))


@pytest.mark.embedded
def test_embedded_model_protocol_numbers_are_sane_and_both_perplexity_paths_agree(embedded, scorer):
    model, tokenizer = embedded
    prompts = load_prompt_set(limit=2).to_list()
    plain = run_eval(model, tokenizer, prompts, scorer=scorer, progress=False, samples=2, max_new_tokens=6, batch_size=4)
    judged = run_eval(model, tokenizer, prompts, Spec.build("empty", [], model=model), scorer=scorer, progress=False,
                      samples=2, max_new_tokens=6, batch_size=4)
    assert 1 < plain["perplexity"] < 200 and 0 <= plain["emt"] <= 1 and 0 < plain["generated_tokens"] <= 24
    assert judged["perplexity"] == pytest.approx(plain["perplexity"], rel=1e-3)
    assert judged["distinct_1"] == plain["distinct_1"] and judged["emt"] == plain["emt"]


def test_more_processes_than_gpus_is_a_clear_error_before_any_device_is_touched(monkeypatch):
    from steer.errors import SteerError
    from steer.evaluation.protocol import process_shard

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(SteerError, match="2 processes on this machine but 1 visible GPU"):
        process_shard()
