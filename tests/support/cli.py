"""The ``vlcluster`` command as the tests run it: a fresh interpreter in the
repository root, output captured as text."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.support import REPO


def cli(*args: str, timeout: float = 900, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``vlcluster ARGS...``; ``env`` is added to this process's environment.
    The timeout only ends a hang: the longest callers submit fault trials."""
    return subprocess.run([sys.executable, "-m", "vlcluster.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO, env={**os.environ, **(env or {})})


# Runs the CLI in a fresh interpreter whose import system reports the given
# packages as not installed: a meta-path finder consulted before every other
# raises ModuleNotFoundError for them, exactly what `import` raises for a
# package that is absent. A stand-in for a venv without extras: the shared
# test venv has every extra, and a second venv with torch would take minutes
# and ~2 GB to build.
WITHOUT = """
import sys

blocked = set(sys.argv[1].split(","))


class NotInstalled:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in blocked:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


sys.meta_path.insert(0, NotInstalled())
sys.argv = ["vlcluster", *sys.argv[2:]]
from vlcluster.cli import main

sys.exit(main())
"""


def cli_without(packages: list[str], *args: str) -> subprocess.CompletedProcess:
    """``vlcluster ARGS...`` where ``packages`` cannot be imported (see WITHOUT)."""
    return subprocess.run([sys.executable, "-c", WITHOUT, ",".join(packages), *args],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
