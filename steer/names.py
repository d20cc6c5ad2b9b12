"""The one canonical name of a value vector, ``L{layer}.N{index}``, used in CLI, JSON, UI and reports."""
from __future__ import annotations

import re
from typing import NamedTuple

from .errors import SpecError

_NUMBER = r"(0|[1-9][0-9]*)"  # ASCII digits, no leading zeros: one spelling per vector
_NAME = re.compile(rf"L{_NUMBER}\.N{_NUMBER}")


class VectorName(NamedTuple):
    layer: int
    index: int

    def __str__(self) -> str:
        return f"L{self.layer}.N{self.index}"

    @classmethod
    def parse(cls, text: str) -> "VectorName":
        """Parse ``L25.N829`` (the only accepted spelling, so names stay greppable); else :class:`SpecError`."""
        match = _NAME.fullmatch(text.strip()) if isinstance(text, str) else None
        if not match:
            raise SpecError(f"bad value-vector name {text!r}: expected L<layer>.N<index>, e.g. L25.N829")
        return cls(int(match[1]), int(match[2]))
