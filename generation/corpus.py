"""Held-out English prose that is always available offline: Python's own docstrings.

Docstrings are read from the standard library's source with ``ast`` (nothing is imported,
so no module runs). Each file goes to the ``fit`` or the ``heldout`` split by a hash of its
path, so the two splits never share a module and the split is the same on every machine.
The ``fit`` split continues with the prose of Python's language reference (``pydoc_data``,
what ``help("if")`` shows): together about 230k tokens, enough for the exit classifier's MLP.
"""
from __future__ import annotations

import ast
import hashlib
import sysconfig
from pathlib import Path
from typing import Literal

import torch

Split = Literal["fit", "heldout"]
_SKIP_DIRS = {"site-packages", "test", "tests", "idlelib", "lib2to3", "turtledemo", "__pycache__"}


def _split_of(relative: str) -> Split:
    return "fit" if hashlib.sha1(relative.encode()).digest()[0] % 2 == 0 else "heldout"


def _is_prose(doc: str) -> bool:
    lines = [line for line in doc.splitlines() if line.strip()]
    code = sum(line.lstrip().startswith((">>>", "...")) for line in lines)
    return len(doc.split()) >= 25 and code <= len(lines) // 4


def docstring_text(split: Split = "fit", max_chars: int = 200_000) -> str:
    """Prose docstrings of the standard library's files in ``split``, joined by blank lines."""
    if split not in ("fit", "heldout"):
        raise ValueError(f"unknown split {split!r}: use 'fit' or 'heldout'")
    root = Path(sysconfig.get_paths()["stdlib"])
    parts: list[str] = []
    total = 0
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root).as_posix()
        if _SKIP_DIRS.intersection(path.relative_to(root).parts) or _split_of(relative) != split:
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and _is_prose(doc):
                    parts.append(doc)
                    total += len(doc) + 2
                    if total >= max_chars:
                        return "\n\n".join(parts)
    if split == "fit":
        from pydoc_data.topics import topics

        for name in sorted(topics):
            parts.append(topics[name])
            total += len(topics[name]) + 2
            if total >= max_chars:
                break
    return "\n\n".join(parts)


def token_chunks(tokenizer, text: str, chunk: int = 128, max_tokens: int | None = None) -> list[torch.Tensor]:
    """``text`` tokenized once and cut into ``(1, chunk)`` id tensors (the ragged end is dropped)."""
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[0]
    if max_tokens is not None:
        ids = ids[:max_tokens]
    n = ids.numel() // chunk
    return [ids[i * chunk:(i + 1) * chunk].unsqueeze(0) for i in range(n)]
