"""Golden files (tests/support/golden/): what a command writes, compared with
the checked-in copy; ``VLCLUSTER_REGEN_GOLDEN=1`` rewrites them after an
intended change."""

from __future__ import annotations

import os

from tests.support import REPO

GOLDEN = REPO / "tests" / "support" / "golden"


def check_golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("VLCLUSTER_REGEN_GOLDEN") == "1":
        path.write_text(text)
    assert text == path.read_text(), f"{path} differs; regenerate with VLCLUSTER_REGEN_GOLDEN=1 if intended"
