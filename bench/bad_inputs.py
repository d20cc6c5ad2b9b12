"""Tries every bad input of the catalogue (tests/bad_inputs.py) through the Python API, the CLI,
sweep configs and the demo (served on 127.0.0.1, driven through gradio_client), and counts what
escaped as a traceback.

Each input must be refused with the library's own one-line error containing the expected words,
before any run starts (a sweep must leave no records behind). Two inputs are also tried through
the installed entry point (``python -m steer``, a fresh process) to show the script behaves as
``main()`` does. ``--markdown`` prints the table of docs/reliability.md.

Last line: ``RESULT inputs_tried=N tracebacks=0`` (the exit status is 1 if any input escaped,
was taken silently or got another message).
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from bad_inputs import API, CLI, DEMO, SWEEPS, Workspace, outcome, passed, served_demo  # noqa: E402

TESTS = {"API": "test_bad_input_is_refused_in_one_line", "CLI": "test_bad_input_is_refused_in_one_line",
         "sweep": "test_bad_input_is_refused_in_one_line", "demo": "test_bad_demo_input_is_a_message_in_the_page"}


def entry_point(ws: Workspace) -> list[tuple[str, bool, str]]:
    """The ``steer`` script in a fresh process: exit status 2, one error line, no traceback."""
    checks = []
    for argv in (["generate", "", "--model", str(ws.model_dir)],
                 ["eval", "--prompt-file", ws.path("not_utf8.txt"), "--model", str(ws.model_dir), "--quiet"]):
        run = subprocess.run([sys.executable, "-m", "steer", *argv], capture_output=True, text=True, cwd=ws.root,
                             env=dict(os.environ, PYTHONPATH=str(ROOT)))
        errors = [line for line in run.stderr.splitlines() if line.startswith("steer") and ": error: " in line]
        ok = run.returncode == 2 and len(errors) == 1 and "Traceback" not in run.stderr
        checks.append((" ".join(argv[:2]), ok, errors[0] if errors else run.stderr[-300:]))
    return checks


def markdown(rows, root: str) -> str:
    """The table of docs/reliability.md (temporary folders left out of the messages)."""
    lines = ["| # | where | input | message (excerpt) | test |", "|---:|---|---|---|---|"]
    for i, (case, result) in enumerate(rows, 1):
        message = result.message.split(": error: ", 1)[-1].replace(root + "/", "")
        message = re.sub(r"/\S*/gradio/[0-9a-f]+/", "", message)
        message = message if len(message) <= 150 else message[:147] + "..."
        cell = lambda text: text.replace("|", "\\|").replace("\n", " ")  # noqa: E731
        lines.append(f"| {i} | {case.surface} | {cell(case.input)} | {cell(message)} | "
                     f"`{TESTS[case.surface]}[{case.id}]` |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--markdown", action="store_true", help="also print the table for docs/reliability.md")
    args = parser.parse_args()
    start = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory(prefix="steer-bad-inputs-") as tmp:
        os.environ["STEER_CACHE"] = str(Path(tmp) / "cache")
        ws = Workspace(Path(tmp))
        for case in API + CLI + SWEEPS:
            rows.append((case, outcome(case, ws)))
        with served_demo(ws) as client:
            for case in DEMO:
                rows.append((case, outcome(case, ws, client)))
        checks = entry_point(ws)
        table = markdown(rows, str(ws.root))
    for case, result in rows:
        status = "ok" if passed(case, result) else result.kind.upper() if result.kind != "error" else "WRONG MESSAGE"
        print(f"{status:<13} {case.surface:<5} {case.id:<36} {result.message[:160]}")
    for what, ok, line in checks:
        print(f"{'ok' if ok else 'FAILED':<13} steer {what} (a fresh process): {line[:120]}")
    if args.markdown:
        print(table)
    tracebacks = sum(r.kind == "traceback" for _, r in rows) + sum(not ok for _, ok, _ in checks)
    failed = sum(not passed(c, r) for c, r in rows)
    by_surface = {s: sum(c.surface == s for c, _ in rows) for s in ("API", "CLI", "sweep", "demo")}
    print(f"{len(rows)} bad inputs ({', '.join(f'{n} {s}' for s, n in by_surface.items())}) in "
          f"{time.perf_counter() - start:.0f} s; {failed} not refused as expected (silent, half done or another message)")
    print(f"RESULT inputs_tried={len(rows)} tracebacks={tracebacks}")
    return 1 if failed or tracebacks else 0


if __name__ == "__main__":
    sys.exit(main())
