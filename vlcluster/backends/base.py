"""What every backend provides."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from vlcluster.graph import Graph
from vlcluster.plan import StagePlan


class Backend(Protocol):
    name: str

    def validate(self, graph: Graph, source: str) -> None:
        """Raise SpecError if the pipeline cannot run on this backend."""

    def submit(self, graph: Graph, plans: list[StagePlan], run_dir: Path) -> bool:
        """Run (or queue) every stage that is not done; True if all succeeded."""
