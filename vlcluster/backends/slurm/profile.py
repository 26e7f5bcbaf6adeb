"""A stage's SLURM cluster profile: which one it uses (``resources.profile``,
else ``$VLCLUSTER_SLURM_PROFILE``, else ``local``) and loading it from the
search path of ``profiles.py``. Light (no submitit): ``plan`` and
``preflight`` read profiles too."""

from __future__ import annotations

import functools
import os
from pathlib import Path

from vlcluster.errors import SpecError
from vlcluster.jobspec.load import read_yaml
from vlcluster.jobspec.models import ClusterProfile


def load_profile(name: str) -> ClusterProfile:
    """``<name>.yaml`` on the profile search path (``profiles.py``), or a path
    to a YAML file; validated like job files."""
    from vlcluster.profiles import profile_dirs

    return load_profile_from(name, tuple(profile_dirs()))


@functools.lru_cache(maxsize=None)
def load_profile_from(name: str, folders: tuple[Path, ...]) -> ClusterProfile:
    from pydantic import ValidationError

    candidates = [Path(name)] if name.endswith((".yaml", ".yml")) else [folder / f"{name}.yaml" for folder in folders]
    path = next((candidate for candidate in candidates if candidate.is_file()), None)
    if path is None:
        raise SpecError(f"cluster profile {name!r} not found (looked in {', '.join(str(c) for c in candidates)}; "
                        "`vlcluster profiles` lists those found)")
    try:
        return ClusterProfile.model_validate(read_yaml(path))
    except ValidationError as exc:
        from vlcluster.jobspec.load import describe_validation_error

        raise SpecError(describe_validation_error(str(path), exc)) from None


def profile_name(spec) -> str:
    return spec.resources.profile or os.environ.get("VLCLUSTER_SLURM_PROFILE", "local")
