"""One driving submit per run directory at a time (local and Ray backends)."""

from __future__ import annotations

import fcntl
from contextlib import contextmanager
from pathlib import Path

from vlcluster.errors import SpecError
from vlcluster.storage.paths import local_side


@contextmanager
def run_lock(run_dir: Path):
    """One submit per run directory at a time (per machine for a remote run
    directory: the lock file lives in its local side)."""
    local = local_side(run_dir)
    local.mkdir(parents=True, exist_ok=True)
    with open(local / ".lock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SpecError(f"{run_dir}: another vlcluster submit is running on this run directory") from None
        yield
