"""bench/concepts.py's score stage on a partial generate folder: incomplete topics stay out of the RESULT line."""
from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _bench():
    spec = importlib.util.spec_from_file_location("bench_concepts", ROOT / "bench" / "concepts.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _run(method, strength, success, ppl=10.0):
    return dict(method=method, strength=strength, success=success, perplexity=ppl, distinct_2=0.98)


def test_incomplete_topic_is_left_out_of_the_result_line():
    bench = _bench()
    full = [_run("none", 0, 0.0)] + [_run(f, 1, 0.2) for f in bench.BASELINES] + [_run(bench.OURS, 1, 0.4)]
    partial = [_run("none", 0, 0.0)] + [_run(f, 1, 0.9) for f in bench.BASELINES]  # stopped before ffn-built
    report = {"topic": {"topic:food": full, "topic:science": partial}}
    assert bench.missing_families(partial) == [bench.OURS]
    assert bench.missing_families(full) == []
    assert list(bench.complete_topics(report)) == ["topic:food"]
    line = bench.result_line(report)
    values = dict(kv.split("=") for kv in line.split()[1:])
    assert float(values["topic_ffn"]) == 0.4 and float(values["topic_best_baseline"]) == 0.2
    assert not any(math.isnan(float(v)) for v in values.values())
