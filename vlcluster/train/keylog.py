"""Optional record of the sample keys each training step consumed.

Set ``VLCLUSTER_RECORD_KEYS=DIR`` and every rank appends one line per step,
``<step> <key> <key> ...``, to ``DIR/keys_rank<R>.txt``, written once the
step's optimizer update is done. Steps re-run after a resume appear again,
so a file shows what each step trained on, run after run; the tests compare
it with an uninterrupted run to check exact resume.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

ENV = "VLCLUSTER_RECORD_KEYS"


class KeyRecorder:
    def __init__(self, rank: int) -> None:
        directory = os.environ.get(ENV)
        self.path = Path(directory) / f"keys_rank{rank}.txt" if directory else None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def record(self, step: int, keys: Sequence[str]) -> None:
        if self.path is None:
            return
        with open(self.path, "a") as out:  # one short append per step; nothing buffered is lost on a kill
            out.write(f"{step} {' '.join(keys)}\n")
