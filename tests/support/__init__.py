"""What the tests share and are not tests themselves: the repository root,
the CLI helper, job texts, data builders, servers and proxies. Test modules
import from here, never from one another."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
