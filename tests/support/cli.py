"""The ``vlcluster`` command as the tests run it: a fresh interpreter in the
repository root, output captured as text."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from tests.support import REPO


def cli(*args: str, timeout: float = 900, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``vlcluster ARGS...``; ``env`` is added to this process's environment.
    The timeout only ends a hang: the longest callers submit fault trials."""
    return subprocess.run([sys.executable, "-m", "vlcluster.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO, env={**os.environ, **(env or {})})


# The line a submit that waits for its run prints last (vlcluster/run_times.py).
CLOSING = re.compile(r"^run (?P<name>\S+) (?P<verdict>finished in|failed after) (?P<time>[^:]+): (?P<rest>.*)$", re.M)
TIME = re.compile(r"^(?:(?P<h>\d+) h (?P<hm>\d+) min|(?P<m>\d+) min (?P<ms>\d+) s|(?P<s>\d+\.\d) s)$")


def closing_line(stdout: str) -> tuple[str, float, str]:
    """A submit's closing line: its verdict, its wall time in seconds (as
    printed: to 0.1 s under a minute, to the second or minute above) and the
    rest (stage counts, failures, the slowest stages)."""
    found = CLOSING.findall(stdout)
    assert len(found) == 1, stdout
    _, verdict, shown, rest = found[0]
    return verdict, printed_seconds(shown), rest


def printed_seconds(shown: str) -> float:
    """``12.3 s``, ``9 min 3 s``, ``2 h 5 min`` as seconds."""
    parts = TIME.match(shown)
    assert parts, shown
    if parts["s"]:
        return float(parts["s"])
    if parts["m"]:
        return int(parts["m"]) * 60 + int(parts["ms"])
    return int(parts["h"]) * 3600 + int(parts["hm"]) * 60


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
