"""Names that become paths: stage names, the pipeline name, sweep elements.

A stage's name is its directory in the run directory, and the pipeline's name
is the default run directory, a SLURM job name and a Kubernetes label source.
One pattern keeps them plain words; sweep elements (``merge[alpha=0.25]``),
whose bracket holds user values, get a directory name that cannot leave the
run directory whatever those values contain.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import PurePosixPath

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
MAX_NAME = 100
NAME_RULE = "letters, digits, '_', '.', '-', starting with a letter or digit, at most 100 characters"
# Characters a sweep element's directory may keep as written; anything else
# (``/``, ``\``, spaces, shell characters, non-ASCII) is replaced and the name
# gets a digest suffix so distinct elements never share a directory.
DIR_SAFE = re.compile(r"[^A-Za-z0-9_.,=\[\]\"+-]")
MAX_DIR_NAME = 200


def name_problem(name: object) -> str | None:
    """Why ``name`` is not a valid stage or pipeline name, or None."""
    if not isinstance(name, str):
        return f"must be a string, not {type(name).__name__}"
    if len(name) > MAX_NAME or not NAME.match(name):
        return f"{name!r} is not a valid name ({NAME_RULE})"
    return None


def expanded_name_problem(name: object) -> str | None:
    """Like :func:`name_problem` for a name after sweep expansion: a plain
    name, or ``base[...]`` of a plain base (names read back from ``pipeline.json``)."""
    if isinstance(name, str) and name.endswith("]") and "[" in name:
        return name_problem(name.split("[", 1)[0])
    return name_problem(name)


def directory_name(stage: str) -> str:
    """The directory of a stage (or sweep element) inside the run directory.

    A plain name is its own directory. A sweep element keeps its readable
    name when every character is harmless, else unsafe characters become
    ``_`` and an 8-character digest of the full name is appended."""
    if NAME.match(stage) and len(stage) <= MAX_NAME:
        return stage
    safe = DIR_SAFE.sub("_", stage)
    if stage and safe == stage and len(stage) <= MAX_DIR_NAME and not stage.startswith("."):
        return stage
    digest = hashlib.sha256(stage.encode("utf-8", "surrogatepass")).hexdigest()[:8]
    return f"{safe.lstrip('.')[: MAX_DIR_NAME - 9] or 'stage'}~{digest}"


def confined_child(stage: str) -> str:
    """``directory_name`` checked to be one path component (never ``..``)."""
    name = directory_name(stage)
    parts = PurePosixPath(name).parts
    if len(parts) != 1 or name in {".", ".."} or "/" in name or "\\" in name:
        raise ValueError(f"stage name {stage!r} does not map to a directory inside the run directory")
    return name
