"""Which checkpoints a stage has: the directory protocol, without tensors.

A checkpoint counts only once its ``meta.json`` exists: locally the whole
directory appears by one rename, on an object store ``meta.json`` is
uploaded last and is the commit marker. A ``step_*`` prefix without it is an
interrupted upload: never read, removed by :func:`discard_foreign`.

Kept free of torch so planning and status commands stay fast.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from vlcluster.storage.paths import read_json, remove_tree

STEP_DIR = re.compile(r"^step_(\d{8})$")


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    step: int

    def meta(self) -> dict:
        """The commit record; {} when it is not a JSON object (damaged: never matches a spec hash)."""
        record = read_json(self.path / "meta.json")
        return record if isinstance(record, dict) else {}


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
        uncommitted = STEP_DIR.match(entry.name) and not (entry / "meta.json").is_file()
        if entry.name.endswith(".partial") or uncommitted:
            remove_tree(entry)
    for ckpt in complete_checkpoints(root):
        if ckpt.meta().get("spec_hash") != spec_hash:
            remove_tree(ckpt.path)
            removed.append(ckpt.step)
    return removed


def prune(root: Path, keep: int) -> None:
    for ckpt in complete_checkpoints(root)[:-keep]:
        remove_tree(ckpt.path)
