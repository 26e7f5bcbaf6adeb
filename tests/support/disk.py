"""A disk that fills up under a running stage: what is left free once the
filler has taken the rest."""

from __future__ import annotations

import os
from pathlib import Path

FREE_AFTER_FILL = 512 << 10  # room for log lines and records, not for a checkpoint (~11 MB)


def fill(disk: Path, leave: int) -> Path:
    """Take every block of ``disk`` but ``leave`` bytes: written until the disk
    refuses (the run keeps writing meanwhile), then ``leave`` given back."""
    filler = disk / "filler"
    chunk = b"\0" * (1 << 20)
    with open(filler, "wb", buffering=0) as handle:
        try:
            while True:
                handle.write(chunk)
        except OSError:
            pass
        handle.truncate(max(0, os.fstat(handle.fileno()).st_size - leave))
    return filler
