"""What a conversion did with every tensor: mapped, fresh, dropped, and why."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model (one clear paragraph)."""


@dataclass
class ConversionReport:
    source: str
    format: str
    mapped: int = 0
    fresh: dict[str, str] = field(default_factory=dict)  # vlcluster key -> why it has no source weight
    dropped: dict[str, str] = field(default_factory=dict)  # source key -> why it was not used
    notes: list[str] = field(default_factory=list)

    def drop(self, key: str, reason: str) -> None:
        self.dropped[key] = reason

    def summary(self) -> dict[str, Any]:
        """JSON-able record; keys of repeated layers are grouped (``layers.*.``)."""
        return {
            "source": self.source,
            "format": self.format,
            "mapped_tensors": self.mapped,
            "fresh": grouped(self.fresh),
            "dropped": grouped(self.dropped),
            "notes": self.notes,
        }

    def lines(self) -> list[str]:
        """Human-readable lines for a log or the CLI."""
        out = [f"{self.source} ({self.format}): {self.mapped} tensors mapped"]
        out += [f"fresh   {pattern}: {reason}" for pattern, reason in grouped(self.fresh).items()]
        out += [f"dropped {pattern}: {reason}" for pattern, reason in grouped(self.dropped).items()]
        out += [f"note    {note}" for note in self.notes]
        return out


def grouped(reasons: dict[str, str]) -> dict[str, str]:
    """Keys differing only in layer numbers collapse to one pattern with ``*``."""
    out: dict[str, str] = {}
    for key, reason in sorted(reasons.items()):
        out.setdefault(re.sub(r"\.\d+\.", ".*.", key), reason)
    return out


def same_values(tensors: list[Tensor], value: float) -> bool:
    return all(bool((t == value).all()) for t in tensors)
