"""The one canonical name of a value vector, ``L{layer}.N{index}``, used in CLI, JSON, UI and reports."""
from __future__ import annotations

import re
from typing import NamedTuple

_NAME = re.compile(r"^L(\d+)\.N(\d+)$")


class VectorName(NamedTuple):
    layer: int
    index: int

    def __str__(self) -> str:
        return f"L{self.layer}.N{self.index}"

    @classmethod
    def parse(cls, text: str) -> "VectorName":
        """Parse ``L25.N829`` (the only accepted spelling, so names stay greppable)."""
        match = _NAME.match(text.strip())
        if not match:
            raise ValueError(f"bad value-vector name {text!r}: expected L<layer>.N<index>, e.g. L25.N829")
        return cls(int(match[1]), int(match[2]))
