"""A run folder that survives ``kill -9``: append-only JSONL, one commit line per batch.

Layout::

    RUN/config.json              what produced the records (a rerun must match it)
    RUN/records-rank{R}.jsonl    one line per prompt, then a footer line {"batch": b, "done": ...}
    RUN/summary.json             written at the end, from the records

Each process appends only to its own file, one ``write`` + ``fsync`` per batch. A batch counts
only when its footer is on disk, so a kill at any point loses at most the batch in flight: on
restart, a cut-off last line and rows without a footer are dropped (the file is rewritten
atomically) and that batch runs again. Batches found in several files count once.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from steer.identity import atomic_write


def ensure_writable(folder: str | os.PathLike) -> Path:
    """Create ``folder`` and prove we can write there, or raise a clear ValueError."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise ValueError(f"cannot write to output folder {folder}: {err.strerror or err}") from None
    return folder


def write_json(path: Path, data: Any) -> None:
    """Atomic JSON write (a reader never sees half a file)."""
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n"))


def _parse(path: Path, repair: bool) -> dict[int, tuple[dict, list[dict]]]:
    """Complete batches of one records file: {batch: (footer, rows)}; optionally drop the rest."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    lines = text.split("\n")
    tail = lines.pop()  # "" when the file ends with a newline, else a line cut off by a kill
    pending: dict[int, list[tuple[str, dict]]] = {}
    complete: dict[int, tuple[dict, list[dict]]] = {}
    kept: list[str] = []
    for number, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
            batch = int(row["batch"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            raise ValueError(f"{path}:{number}: corrupt record line; delete {path.parent} to start over") from None
        if row.get("done"):
            rows = pending.pop(batch, [])
            if batch not in complete:
                complete[batch] = (row, [r for _, r in rows])
                kept.extend([raw for raw, _ in rows] + [line])
        else:
            pending.setdefault(batch, []).append((line, row))
    if repair and (tail or pending or len(kept) < len(lines)):
        atomic_write(path, lambda tmp: tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8"))
    return complete


class RunStore:
    """The records of one evaluation run, shared by the processes of a data-parallel launch."""

    def __init__(self, folder: str | os.PathLike, config: dict, rank: int = 0):
        self.folder = ensure_writable(folder)
        self.rank = rank
        self._check_config(config)
        self.path = self.folder / f"records-rank{rank}.jsonl"
        _parse(self.path, repair=True)

    def _check_config(self, config: dict) -> None:
        path = self.folder / "config.json"
        config = json.loads(json.dumps(config))  # normalize tuples, keys
        if path.exists():
            old = json.loads(path.read_text())
            if old != config:
                keys = sorted(k for k in set(old) | set(config) if old.get(k) != config.get(k))
                raise ValueError(f"{self.folder} holds results of another configuration (differs in "
                                 f"{', '.join(keys)}); pass another output folder or delete it")
        else:
            write_json(path, config)

    def batches(self) -> dict[int, tuple[dict, list[dict]]]:
        """Every complete batch in the folder, from any process's file, each counted once."""
        merged: dict[int, tuple[dict, list[dict]]] = {}
        for path in sorted(self.folder.glob("records-rank*.jsonl")):
            for batch, item in _parse(path, repair=False).items():
                merged.setdefault(batch, item)
        return merged

    def append(self, batch: int, rows: list[dict], footer: dict) -> None:
        """Commit one batch: its rows then its footer, in one write, flushed to disk."""
        lines = [json.dumps({**row, "batch": batch}) for row in rows]
        lines.append(json.dumps({"batch": batch, "done": True, **footer}))
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write("".join(line + "\n" for line in lines))
            handle.flush()
            os.fsync(handle.fileno())

    def write_summary(self, summary: dict) -> None:
        write_json(self.folder / "summary.json", summary)
