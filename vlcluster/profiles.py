"""Where SLURM cluster profiles are found, and what the command line changes in them.

A profile is ``<name>.yaml`` (``ClusterProfile`` in ``jobspec/models.py``),
looked up in this order: each directory of ``$VLCLUSTER_PROFILE_PATH``
(``:``-separated), ``slurm/`` in the working directory, the user's
``~/.config/vlcluster/slurm/``, then the ``slurm/`` shipped with vlcluster.
A lab keeps its profile (partition, account, QoS, GPU type) in one of the
first three, so job files and this repository name no account.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

SHIPPED = Path(__file__).resolve().parents[1] / "slurm"


def profile_dirs() -> list[Path]:
    from_env = [Path(part).expanduser() for part in os.environ.get("VLCLUSTER_PROFILE_PATH", "").split(os.pathsep) if part]
    folders = [*from_env, Path("slurm"), Path("~/.config/vlcluster/slurm").expanduser(), SHIPPED]
    unique: dict[Path, Path] = {}
    for folder in folders:  # ./slurm in a checkout is the shipped one: listed once
        unique.setdefault(folder.resolve(), folder)
    return list(unique.values())


def found_profiles() -> list[tuple[str, Path, bool]]:
    """(name, file, shadowed by an earlier one of the same name) for every profile on the search path."""
    seen: set[str] = set()
    found = []
    for folder in profile_dirs():
        if not folder.is_dir():
            continue
        for path in sorted(folder.glob("*.yaml")):
            found.append((path.stem, path, path.stem in seen))
            seen.add(path.stem)
    return found


@dataclass(frozen=True)
class ProfileOverrides:
    """``submit --profile NAME --partition P --account A --qos Q --time MIN``."""

    profile: str | None = None  # every stage's profile
    time_min: int | None = None  # every stage's time limit
    fields: tuple[tuple[str, str], ...] = ()  # partition, account, qos of whichever profile

    @classmethod
    def from_args(cls, args) -> ProfileOverrides:
        fields = tuple((name, value) for name in ("partition", "account", "qos") if (value := getattr(args, name, None)))
        return cls(getattr(args, "profile", None), getattr(args, "time", None), fields)

    def apply_to_stages(self, pipeline) -> None:
        """Profile and time limit say how a stage runs, not what it computes: hashes stay."""
        update = {key: value for key, value in (("profile", self.profile), ("time_min", self.time_min)) if value is not None}
        if not update:
            return
        stages = pipeline.stages
        for name, spec in stages.items():
            stages[name] = spec.model_copy(update={"resources": spec.resources.model_copy(update=update)})
