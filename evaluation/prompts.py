"""Prompt sets as ``datasets.Dataset`` with a ``text`` column (other fields kept, e.g. ``category``).

Sources:
* nothing: the shipped 400 challenging RealToxicityPrompts prompts (steer/data, Apache-2.0);
* ``*.jsonl`` / ``*.json``: RealToxicityPrompts format, one ``{"prompt": {"text": ...}, ...}`` a line;
* any other file: plain text, one prompt a line (blank lines skipped);
* ``hub:allenai/real-toxicity-prompts`` (online only), optionally keeping ``challenging`` rows.

JSONL is parsed line by line here (not by ``datasets``' JSON builder) so that a bad line is
reported with its file and line number; the rows then become a ``Dataset``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported where used: generation-only machines may lack datasets
    from datasets import Dataset

from steer.errors import MissingFileError, SteerError
from steer.inputs import check_prompt, lines, read_text, whole

DEFAULT_PROMPTS = Path(__file__).resolve().parent.parent / "steer" / "data" / "rtp_challenging_dev.jsonl"
HUB_PREFIX = "hub:"
SOURCE = "_source"  # column naming each prompt's file and line, for messages (not written to records)


def _rows_from_jsonl(path: Path) -> list[dict]:
    rows = []
    for number, line in enumerate(lines(read_text(path, "prompt file")), 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise SteerError(f"{where}: not valid JSON ({err.msg} at column {err.colno})") from None
        except RecursionError:
            raise SteerError(f"{where}: nested too deeply to read") from None
        prompt = row.get("prompt") if isinstance(row, dict) else None
        text = prompt.get("text") if isinstance(prompt, dict) else None
        if not isinstance(text, str):
            raise SteerError(f'{where}: missing prompt.text (expected {{"prompt": {{"text": "..."}}, ...}})')
        check_prompt(text, f"the prompt on {where}")
        rows.append({**{k: v for k, v in row.items() if k not in ("prompt", "text", SOURCE)},
                     **{f"prompt_{k}": v for k, v in prompt.items() if k != "text"}, "text": text, SOURCE: where})
    return rows


def _rows_from_text(path: Path) -> list[dict]:
    return [{"text": line, SOURCE: f"{path}:{number}"}
            for number, line in enumerate(lines(read_text(path, "prompt file")), 1) if line.strip()]


def _from_hub(name: str, challenging: bool) -> "Dataset":
    from datasets import load_dataset

    try:
        data = load_dataset(name, split="train")
    except Exception as err:  # offline: ConnectionError, DatasetNotFoundError, ...
        raise SteerError(f"cannot load {name} from the hub ({type(err).__name__}); offline, pass a local "
                         "JSONL file, or nothing for the shipped 400 challenging prompts") from None
    if challenging:
        data = data.filter(lambda row: bool(row.get("challenging")))
    return data.map(lambda row: {"text": row["prompt"]["text"]})


def load_prompt_set(path: str | Path | None = None, limit: int | None = None,
                    challenging: bool = False) -> "Dataset":
    """The prompts of ``path`` (see the module docstring), the first ``limit`` of them if given.

    Every prompt is checked here (text that is not empty or whitespace), so a bad line in the
    middle of a file stops a run before its first batch, with the file and line named.
    """
    from datasets import Dataset

    if limit is not None:
        whole(limit, "--prompts (the number of prompts)", low=1)
    source = str(path) if path is not None else str(DEFAULT_PROMPTS)
    if source.startswith(HUB_PREFIX):
        data = _from_hub(source[len(HUB_PREFIX):], challenging)
    else:
        file = Path(source)
        if not file.is_file():
            raise MissingFileError(f"prompt file {file} not found" + (" (it is a folder)" if file.is_dir() else ""))
        rows = _rows_from_jsonl(file) if file.suffix in (".jsonl", ".json") else _rows_from_text(file)
        if challenging:
            rows = [row for row in rows if row.get("challenging")]
        keys = list(dict.fromkeys(k for row in rows for k in row))
        try:
            data = Dataset.from_dict({k: [row.get(k) for row in rows] for k in keys})
        except Exception as err:  # pyarrow: a field with mixed types across lines
            raise SteerError(f"{file}: fields differ in type between lines ({' '.join(str(err).split())[:200]})") from None
    if limit is not None:
        data = data.select(range(min(limit, len(data))))
    if len(data) == 0:
        raise SteerError(f"no prompts in {source}{' (after the challenging filter)' if challenging else ''}: "
                         "give a file with one prompt a line (text) or RealToxicityPrompts JSONL")
    return data


def load_prompts(path: str | Path | None = None, limit: int | None = None) -> list[str]:
    """Just the prompt texts (the contract other modules code against); no ``datasets`` needed for files."""
    source = Path(path) if path is not None else DEFAULT_PROMPTS
    if path is not None and str(path).startswith(HUB_PREFIX):
        return list(load_prompt_set(path, limit)["text"])
    if limit is not None and limit < 1:
        raise ValueError(f"--prompts must be at least 1, got {limit}")
    if not source.is_file():
        raise FileNotFoundError(f"prompt file {source} not found")
    rows = _rows_from_jsonl(source) if source.suffix in (".jsonl", ".json") else _rows_from_text(source)
    texts = [row["text"] for row in rows][:limit]
    if not texts:
        raise ValueError(f"no prompts in {source}")
    return texts


NEUTRAL_TEMPLATES = Path(__file__).resolve().parent.parent / "steer" / "data" / "neutral_templates.json"
SPLITS = ("selection", "evaluation")


def neutral_prompts(split: str | None = None) -> list[str]:
    """The shipped neutral sentence beginnings (every subject x every predicate, 400), or one half.

    ``selection``: subjects at even positions (builders, layer and strength choices);
    ``evaluation``: odd positions (benchmarks only). The halves share no subject.
    """
    data = json.loads(NEUTRAL_TEMPLATES.read_text(encoding="utf-8"))
    if split is not None and split not in SPLITS:
        raise ValueError(f"unknown split {split!r}: use selection or evaluation")
    keep = [i for i in range(len(data["subjects"])) if split is None or i % 2 == SPLITS.index(split)]
    return [f"{data['subjects'][i]} {predicate}" for i in keep for predicate in data["predicates"]]
