"""Data-parallel sweeps: the same sweep on one process and under ``accelerate launch`` with N.

Runs the detox grid (unsteered; the preset at three strengths) three ways into ``--out``:

1. ``single``: ``python -m steer sweep`` in one process (timed);
2. ``multi``: ``accelerate launch --multi_gpu --num_processes N -m steer sweep`` (timed);
3. ``resumed``: the same launch killed (SIGKILL to the whole process group) after ``--kill-after``
   seconds, then launched again: it must resume without losing or doubling a row.

Then every grid point's summary (timings aside) and every continuation must be identical across
the three, and each prompt must be recorded exactly once. Last line:
``RESULT speedup_2gpu=<single s / multi s> identical=<1|0> processes=N gpus=<visible GPUs>``.

    python bench/multi_gpu.py --model MODEL.gguf --out $OUT/mg                    # 2 GPUs
    python bench/multi_gpu.py --prompts 8 --samples 2 --out /tmp/mg               # CPU, a smoke test
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def write_config(args, out: Path) -> Path:
    config = dict(model=args.model, judge="self", limit=args.prompts, samples=args.samples,
                  max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, scorer=args.scorer, out=str(out),
                  grid=dict(intervention=["none", "preset"], strength=[0.5, 1.0, 1.5]))
    path = out.parent / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def launch(config: Path, processes: int, kill_after: float | None = None) -> float:
    """Run the sweep; with ``kill_after``, SIGKILL it then (returns the seconds it ran)."""
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    if processes == 1:
        command = [sys.executable, "-m", "steer", "sweep", str(config), "--quiet"]
    else:
        command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
                   str(processes), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                   "-m", "steer", "sweep", str(config), "--quiet"]
    start = time.perf_counter()
    proc = subprocess.Popen(command, env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        _, stderr = proc.communicate(timeout=kill_after)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        ran = time.perf_counter() - start
        proc.communicate()
        return ran
    if proc.returncode != 0:  # torchrun's own report buries a rank's traceback: keep all of it
        log = config.with_suffix(".stderr.log")
        log.write_text(stderr)
        raise SystemExit(f"sweep failed ({' '.join(command)}), whole stderr in {log}:\n{stderr[-4000:]}")
    return time.perf_counter() - start


def collected(out: Path) -> dict:
    """Per grid point: summary (timings aside) and prompt index -> continuations, from every shard."""
    from steer.evaluation.protocol import TIMING_KEYS

    points = {}
    for folder in sorted(p for p in out.iterdir() if (p / "summary.json").exists()):
        summary = json.loads((folder / "summary.json").read_text())
        rows, counts = {}, {}
        for shard in folder.glob("records-rank*.jsonl"):
            for line in shard.read_text().splitlines():
                row = json.loads(line)
                if "index" in row:
                    counts[row["index"]] = counts.get(row["index"], 0) + 1
                    rows[row["index"]] = row["continuations"]
        points[folder.name] = dict(summary={k: v for k, v in summary.items() if k not in TIMING_KEYS and k != "name"},
                                   rows=rows, once=all(n == 1 for n in counts.values()))
    return points


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model folder or .gguf (default: the embedded model)")
    parser.add_argument("--out", default="runs/multi_gpu")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--prompts", type=int, default=400)
    parser.add_argument("--samples", type=int, default=25)
    parser.add_argument("--max-new-tokens", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--scorer", default="profanity-check")
    parser.add_argument("--kill-after", type=float, default=None, help="seconds (default: half the multi run)")
    args = parser.parse_args()
    import torch

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = {name: write_config(args, out / name) for name in ("single", "multi", "resumed")}
    seconds = {"single": launch(runs["single"], 1)}
    print(f"single process: {seconds['single']:.1f} s", flush=True)
    seconds["multi"] = launch(runs["multi"], args.processes)
    print(f"{args.processes} processes: {seconds['multi']:.1f} s", flush=True)
    kill_after = args.kill_after or seconds["multi"] / 2
    ran = launch(runs["resumed"], args.processes, kill_after=kill_after)
    done = sum(shard.read_text().count('"done": true') for shard in (out / "resumed").glob("*/records-rank*.jsonl"))
    print(f"killed after {ran:.1f} s with {done} batches written; resuming", flush=True)
    seconds["resume"] = launch(runs["resumed"], args.processes)
    print(f"resumed run finished in {seconds['resume']:.1f} s", flush=True)

    results = {name: collected(out / name) for name in runs}
    single = results["single"]
    same = {name: sorted(single) == sorted(res) and all(
        res[p]["summary"] == single[p]["summary"] and res[p]["rows"] == single[p]["rows"] and res[p]["once"]
        for p in single) for name, res in results.items()}
    expected = set(range(args.prompts))
    complete = all(set(point["rows"]) == expected for res in results.values() for point in res.values())
    identical = int(all(same.values()) and complete and len(single) == 4)
    for point, data in single.items():
        s = data["summary"]
        print(f"| {point} | EMT {s.get('emt', float('nan')):.3f} | Tox. Prob. {s.get('tox_prob', float('nan')):.3f} | "
              f"ppl {s.get('perplexity', float('nan')):.2f} |")
    print(f"identical to the single process: {same}; every prompt exactly once: {complete}")
    (out / "multi_gpu.json").write_text(json.dumps(dict(seconds=seconds, batches_before_kill=done, identical=identical, same=same,
                                                        processes=args.processes,
                                                        gpus=torch.cuda.device_count()), indent=1))
    print(f"RESULT speedup_2gpu={seconds['single'] / seconds['multi']:.3f} identical={identical} "
          f"processes={args.processes} gpus={torch.cuda.device_count()}")


if __name__ == "__main__":
    main()
