"""Property-based fuzzing (hypothesis) of the loader and of the CLI commands
that read files: see tests/support/fuzz_driver.py. Each run is a child process under
a memory cap; every generated input must end, within 20 s, in a clean error
or a checked acceptance. Zero tracebacks, zero hangs."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
MEMORY_CAP = 8 << 30  # address space: torch alone maps a few GiB
GENERATORS = 6  # spec, sweep, spec-bytes, plan, status, tensors (metrics or merge)


def fuzz(examples_per_target: int, out: Path) -> dict:
    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (MEMORY_CAP, MEMORY_CAP))

    result = subprocess.run(
        [sys.executable, str(REPO / "tests" / "support" / "fuzz_driver.py"), str(examples_per_target), str(out)],
        capture_output=True, text=True, preexec_fn=cap, env={**os.environ, "PYTHONPATH": str(REPO)},
        timeout=60 + examples_per_target * 6 * 20,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(out.read_text())


def check(summary: dict, examples_per_target: int) -> None:
    total = summary["total"]
    print(json.dumps(summary["targets"]))
    assert total["tried"] == GENERATORS * examples_per_target
    assert total.get("tracebacks", 0) == 0 and total.get("hangs", 0) == 0, summary["failures"]
    assert total["tried"] == total.get("clean_errors", 0) + total.get("accepted", 0)
    # Both outcomes are exercised: the generators reach valid inputs too.
    for target in ("spec", "status", "sweep"):
        assert summary["targets"][target].get("accepted", 0) > 0, target
    assert summary["targets"]["sweep"].get("clean_errors", 0) > 0


def test_fuzz_files_ci(tmp_path):
    check(fuzz(60, tmp_path / "fuzz.json"), 60)


@pytest.mark.slow
@pytest.mark.heavy
def test_fuzz_files_thousands(tmp_path):
    check(fuzz(1000, tmp_path / "fuzz.json"), 1000)
