"""Inline backend: every stage one plain ``python -m vlcluster.run`` process,
one after another, on this machine.

The smallest backend the contract (``backends/contract.py``) allows, and the
worked example of docs/extending: no torchrun, so each stage is a world of
one rank; a stage whose upstream failed is not started. Starting the process,
its log and the success rule come from ``backends/stage_process.py``, as on
every backend, and so do ``describe`` and ``cancel`` of a stage run as the
submit's child, as on the local backend; ``done``, ``blocked`` and ``gated`` are decided for all
backends in ``backends/run_status.py``.
"""

from __future__ import annotations

import shlex
import sys
import time
from pathlib import Path

from vlcluster.backends.contract import StageStatus
from vlcluster.backends.run_lock import run_lock
from vlcluster.backends.stage_process import (
    cancel_child_stages, child_env, child_stage_status, copy_lines, exit_status, process_start, record_end, stage_log, start_piped,
    write_header,
)
from vlcluster.errors import SpecError
from vlcluster.graph import Graph
from vlcluster.plan import StagePlan
from vlcluster.stages.rundir import stage_dir


def stage_command(run_dir: Path, stage: str) -> list[str]:
    return [sys.executable, "-m", "vlcluster.run", str(run_dir), stage]


class InlineBackend:
    name = "inline"
    queues = False  # submit returns when every stage has ended
    rendered_file = "commands.sh"

    def validate(self, graph: Graph, source: str) -> None:
        for name, spec in graph.pipeline.stages.items():
            if spec.resources.world_size > 1:
                raise SpecError(f"{source}: stages.{name}.resources asks for {spec.resources.world_size} ranks; "
                                "the inline backend runs each stage as one process (use --backend local)")

    def render(self, graph: Graph, plans: list[StagePlan], run_dir: Path) -> str:
        return "".join(shlex.join(stage_command(run_dir, plan.name)) + "\n" for plan in plans if plan.runs)

    def submit(self, graph: Graph, plans: list[StagePlan], run_dir: Path) -> bool:
        failed: set[str] = set()
        with run_lock(run_dir):
            for plan in plans:
                blocked_by = sorted(set(plan.deps) & failed)
                if not plan.runs:
                    continue
                if blocked_by:
                    stage_dir(run_dir, plan.name).write_state(state="blocked", backend=self.name, blocked_by=blocked_by)
                    failed.add(plan.name)
                elif not self.run_stage(plan, run_dir):
                    failed.add(plan.name)
        return not failed

    def run_stage(self, plan: StagePlan, run_dir: Path) -> bool:
        directory = stage_dir(run_dir, plan.name)
        command = stage_command(run_dir, plan.name)
        log_file, mirror = stage_log(directory)
        started = time.time()
        with open(log_file, "a") as log:
            write_header(log, self.name, command)
            process = start_piped(command, child_env(plan.kind, plan.ranks))
            directory.write_state(state="running", backend=self.name, pid=process.pid, pid_start=process_start(process.pid),
                                  started=started, command=command, failure=None)
            for line in copy_lines(process, log, mirror=mirror):
                print(f"[{plan.name}] {line}", end="", flush=True)
            code = exit_status(process.wait(), directory, plan.spec_hash)
        mirror.sync()
        return record_end(directory, code, started=started) == "done"

    def describe(self, plans: list[StagePlan], records: dict[str, dict], run_dir: Path) -> dict[str, StageStatus]:
        # A stage this submit ran as its child process reads as it does on the local backend.
        return {plan.name: child_stage_status(records[plan.name], plan.status, stage_dir(run_dir, plan.name).log_file) for plan in plans}

    def logs(self, run_dir: Path, stage: str, record: dict) -> str:
        log_file = stage_dir(run_dir, stage).log_file
        if not log_file.is_file():
            raise SpecError(f"{log_file}: no log (has stage {stage!r} started?)")
        return log_file.read_text()

    def cancel(self, run_dir: Path, records: dict[str, dict]) -> list[str]:
        """SIGTERM the stage a submit is running (a training stage checkpoints and exits)."""
        return cancel_child_stages(records)
