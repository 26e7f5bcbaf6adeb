"""Which checkpoints a stage has: the directory protocol, without tensors.

Kept free of torch so planning and status commands stay fast.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from vlcluster.rundir import read_json

STEP_DIR = re.compile(r"^step_(\d{8})$")


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    step: int

    def meta(self) -> dict:
        return read_json(self.path / "meta.json") or {}


def complete_checkpoints(root: Path) -> list[Checkpoint]:
    """Finished checkpoints, oldest first (``.partial`` ones are ignored)."""
    if not root.is_dir():
        return []
    found = []
    for entry in root.iterdir():
        match = STEP_DIR.match(entry.name)
        if match and (entry / "meta.json").is_file():
            found.append(Checkpoint(entry, int(match.group(1))))
    return sorted(found, key=lambda ckpt: ckpt.step)


def latest_checkpoint(root: Path, spec_hash: str) -> Checkpoint | None:
    """Newest checkpoint written for this exact stage spec."""
    for ckpt in reversed(complete_checkpoints(root)):
        if ckpt.meta().get("spec_hash") == spec_hash:
            return ckpt
    return None


def discard_foreign(root: Path, spec_hash: str) -> list[int]:
    """Remove checkpoints of an earlier, different spec of this stage, and
    leftovers of interrupted writes. Returns the steps removed."""
    removed = []
    if not root.is_dir():
        return removed
    for entry in root.iterdir():
        if entry.name.endswith(".partial"):
            shutil.rmtree(entry, ignore_errors=True)
    for ckpt in complete_checkpoints(root):
        if ckpt.meta().get("spec_hash") != spec_hash:
            shutil.rmtree(ckpt.path, ignore_errors=True)
            removed.append(ckpt.step)
    return removed


def prune(root: Path, keep: int) -> None:
    for ckpt in complete_checkpoints(root)[:-keep]:
        shutil.rmtree(ckpt.path, ignore_errors=True)
