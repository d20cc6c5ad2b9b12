"""Checks on what users hand to steer: prompts, text files and numbers.

The Python API, the CLI, sweeps and the demo all call these, so a bad input gets the same one-line
:class:`~steer.errors.SteerError` everywhere (naming the input and what to do), and gets it before
any model runs. Unchecked, an empty prompt fails deep inside torch ("cannot reshape tensor of 0
elements"), a prompt longer than the context generates nonsense without a word, and a file that is
not UTF-8 fails without its name.
"""
from __future__ import annotations

import codecs
import json
import math
import numbers
from pathlib import Path
from typing import Any, Sequence

import yaml

from .errors import MissingFileError, SteerError

# config attributes holding the number of positions a model was trained for, by family
CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length", "seq_length")


# -- numbers ------------------------------------------------------------------------------------
def number(value: Any, what: str, low: float | None = None, high: float | None = None) -> float:
    """``value`` as a finite float in ``[low, high]``; NaN, infinities, bools and text are refused."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise SteerError(f"{what} must be a number, got {shown(value)}")
    try:
        result = float(value)
    except OverflowError:  # an int beyond float range
        result = math.inf
    if not math.isfinite(result):
        raise SteerError(f"{what} must be finite, got {shown(value)}")
    _check_range(result, value, what, low, high)
    return result


def whole(value: Any, what: str, low: int | None = None, high: int | None = None) -> int:
    """``value`` as an int in ``[low, high]``; floats (even 2.0), bools and text are refused."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise SteerError(f"{what} must be a whole number, got {shown(value)}")
    _check_range(int(value), value, what, low, high)
    return int(value)


def integer(value: Any, what: str, low: int | None = None, high: int | None = None) -> int:
    """Like :func:`whole`, also taking a float with no fractional part (3.0: what sliders and JSON send)."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return whole(value, what, low, high)


def _check_range(value: float, given: Any, what: str, low: float | None, high: float | None) -> None:
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = (f"between {low} and {high}" if low is not None and high is not None
                  else f">= {low}" if low is not None else f"<= {high}")
        raise SteerError(f"{what} must be {bounds}, got {shown(given)}")


def shown(value: Any, limit: int = 40) -> str:
    """``repr(value)``, shortened: a message stays one readable line even for 10**400 or a long list."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


# -- files ----------------------------------------------------------------------------------------
def read_text(path: str | Path, what: str) -> str:
    """The text of a UTF-8 file (a leading BOM dropped); the error names the file, and the line of a bad byte."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise MissingFileError(f"cannot read {what} {path}: not found (check the path)") from None
    except OSError as err:
        raise SteerError(f"cannot read {what} {path}: {err.strerror or err}") from None
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8):]
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        column = err.start - data.rfind(b"\n", 0, err.start)
        raise SteerError(f"{path}:{line}: {what} is not UTF-8 (byte 0x{data[err.start]:02x} at column {column}); "
                         "save it as UTF-8") from None


def load_data(path: str | Path, what: str, fmt: str | None = None) -> Any:
    """A JSON or YAML file (``fmt``, default: by suffix) as plain data; a key given twice is an error,
    since both parsers would silently keep the last one."""
    path = Path(path)
    text = read_text(path, what)
    fmt = fmt or ("yaml" if path.suffix.lower() in (".yaml", ".yml") else "json")
    try:
        if fmt == "json":
            return json.loads(text, object_pairs_hook=_unique_pairs)
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except json.JSONDecodeError as err:
        raise SteerError(f"{path} is not valid JSON: {err.msg} at line {err.lineno}, column {err.colno}") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or " ".join(str(err).split())
        raise SteerError(f"{path} is not valid YAML: {problem}{where}") from None
    except _DuplicateKey as err:
        raise SteerError(f"{path}: key {err.args[0]!r} is given twice in one mapping; keep one") from None
    except RecursionError:
        raise SteerError(f"{path}: {what} is nested too deeply to read") from None


class _DuplicateKey(Exception):
    pass


def _unique_pairs(pairs: list[tuple[str, Any]]) -> dict:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise _DuplicateKey(next(k for k in keys if keys.count(k) > 1))
    return dict(pairs)


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key given twice in one mapping."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # ``<<: *base`` merges, checked by the base class
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    if key in seen:
                        raise _DuplicateKey(key)
                    seen.add(key)
                except TypeError:  # an unhashable key: the base class reports it
                    pass
        return super().construct_mapping(node, deep)


def lines(text: str) -> list[str]:
    """``text`` split at ``\\n`` or ``\\r\\n`` only (str.splitlines also splits inside JSON strings, at U+2028)."""
    parts = text.split("\n")
    if parts and parts[-1] == "":
        parts.pop()
    return [p[:-1] if p.endswith("\r") else p for p in parts]


# -- prompts --------------------------------------------------------------------------------------
def check_prompt(text: Any, where: str = "the prompt") -> str:
    """``text`` if it is a prompt a model can continue: a string with something besides whitespace.

    ``where`` names the prompt in the message: "the prompt", "prompt 3", "the prompt on p.jsonl:7".
    """
    if not isinstance(text, str):
        raise SteerError(f"{where} must be text, got {type(text).__name__} {text!r}")
    if not text.strip():
        kind = "empty" if not text else "only whitespace"
        raise SteerError(f"{where} is {kind}: give some text for the model to continue")
    return text


def context_length(model) -> int | None:
    """The number of positions ``model`` was made for (None when its config does not say)."""
    config = getattr(model, "config", None)
    for key in CONTEXT_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def _too_long(n_tokens: int, max_new_tokens: int, context: int, where: str, hint: str) -> SteerError:
    return SteerError(f"{where} is {n_tokens} tokens; with {max_new_tokens} new tokens that is more than the model's "
                      f"context of {context} positions: shorten it{hint}")


def encode_prompt(tokenizer, model, text: Any, max_new_tokens: int, truncate: bool = False,
                  where: str = "the prompt") -> tuple[dict, str | None]:
    """``text`` tokenized for ``generate`` (tensors ``input_ids``, ``attention_mask``) and a note.

    A prompt whose tokens plus ``max_new_tokens`` exceed the model's context is an error, unless
    ``truncate``: then only its last tokens are kept, and the note says so (show it to the user).
    """
    text = check_prompt(text, where)
    max_new_tokens = whole(max_new_tokens, "max new tokens", low=1)
    inputs = dict(tokenizer(text, return_tensors="pt"))
    n_tokens = int(inputs["input_ids"].shape[1])
    if n_tokens == 0:
        raise SteerError(f"{where} gives no tokens with this tokenizer: give some other text")
    context = context_length(model)
    if context is None or n_tokens + max_new_tokens <= context:
        return inputs, None
    keep = context - max_new_tokens
    if not truncate or keep < 1:
        hint = (f", ask for fewer than {context} new tokens" if keep < 1
                else f", or truncate it to its last {keep} tokens (--truncate, truncate=True)")
        raise _too_long(n_tokens, max_new_tokens, context, where, hint)
    inputs = {k: v[:, -keep:] for k, v in inputs.items()}
    return inputs, (f"prompt truncated to its last {keep} of {n_tokens} tokens, to fit the model's context of "
                    f"{context} positions with {max_new_tokens} new tokens")


def check_prompts(tokenizer, model, texts: Sequence[Any], max_new_tokens: int,
                  wheres: Sequence[str] | None = None) -> None:
    """Check every prompt of a run before its first batch: text, and fit in the context (the first bad one is named)."""
    wheres = list(wheres) if wheres is not None else [f"prompt {i}" for i in range(len(texts))]
    for text, where in zip(texts, wheres):
        check_prompt(text, where)
    max_new_tokens = whole(max_new_tokens, "max new tokens", low=1)
    context = context_length(model)
    lengths = [len(ids) for ids in tokenizer(list(texts))["input_ids"]] if texts else []
    for n_tokens, where in zip(lengths, wheres):
        if n_tokens == 0:
            raise SteerError(f"{where} gives no tokens with this tokenizer: give some other text")
        if context is not None and n_tokens + max_new_tokens > context:
            raise _too_long(n_tokens, max_new_tokens, context, where, " or drop it from the prompt set")
