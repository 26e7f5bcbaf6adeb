"""Which processes are still alive: the check that nothing a killed submit or
stage started outlives it."""

from __future__ import annotations

from pathlib import Path


def live_processes_mentioning(text: str) -> list[int]:
    """Pids of the processes (not zombies) whose command line contains ``text``."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
                state = next(line for line in (entry / "status").read_text().splitlines() if line.startswith("State:"))
            except (OSError, StopIteration):
                continue
            if text in cmdline and "zombie" not in state:
                pids.append(int(entry.name))
    return pids
