"""The subcommands of ``steer``, one module each; here, the argparse types they share.

Each type parses the text and checks it with :mod:`steer.inputs` (the checks the Python API
makes), so ``--samples 0`` or ``--top-p nan`` is refused by argparse, in one line, before
any model loads.
"""
from __future__ import annotations

import argparse
from typing import Callable

from steer.errors import SteerError
from steer.inputs import number, whole


def _arg_type(name: str, parse: Callable[[str], float | int], check: Callable, **bounds) -> Callable[[str], float | int]:
    def convert(text: str):
        try:
            value = parse(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {name}, got {text!r}") from None
        try:
            return check(value, "the value", **bounds)
        except SteerError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    convert.__name__ = name
    return convert


count = _arg_type("a whole number", int, whole, low=1)  # sizes, lengths, numbers of things
natural = _arg_type("a whole number", int, whole, low=0)  # seeds, and counts where 0 means "skip"
real = _arg_type("a number", float, number)  # any finite number: NaN and infinities refused
fraction = _arg_type("a number", float, number, low=0.0, high=1.0)  # thresholds, probabilities
