"""Record ``vlcluster`` invocations for the docs check.

When ``$VLCLUSTER_RECORD_CLI`` names a file, every ``vlcluster.cli.main``
call appends one JSON line to it: its arguments and exit status. The test
session sets it (``tests/conftest.py``) and, after a whole-suite run, checks
that every ``vlcluster`` command shown in the docs was run by some test
(``tests/support/docs_commands.py``). Unset, nothing is written.
"""

from __future__ import annotations

import json
import os

ENV = "VLCLUSTER_RECORD_CLI"


def record_invocation(argv: list[str], code: int | None) -> None:
    """Append ``{"argv": [...], "code": N}`` (one ``write`` on an O_APPEND
    file, so concurrent processes do not interleave lines)."""
    path = os.environ.get(ENV)
    if not path:
        return
    line = json.dumps({"argv": [str(arg) for arg in argv], "code": code}) + "\n"
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    except OSError:  # a test that moved the working tree or filled the disk: recording is best effort
        return
    try:
        os.write(fd, line.encode())
    except OSError:
        pass
    finally:
        os.close(fd)
