"""Local backend: run stages one after another on this machine.

Each stage is a subprocess (torchrun for training stages) whose output goes
to the stage log and, line by line, to the console. A stage whose upstream
failed is not started. Killing ``vlcluster submit`` kills its stages too
(they would otherwise keep writing checkpoints under the next submit).
"""

from __future__ import annotations

import time
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from vlcluster.backends.contract import StageStatus
from vlcluster.backends.run_lock import run_lock
from vlcluster.backends.stage_process import (
    cancel_child_stages, child_env, child_stage_status, copy_lines, exit_status, process_start, rank_exit_codes, record_end, stage_log,
    start_piped, when_the_store_answers, write_header,
)
from vlcluster.graph import Graph
from vlcluster.launch import is_distributed, stage_command
from vlcluster.plan import StagePlan
from vlcluster.stages.rundir import stage_dir
from vlcluster.errors import EXIT_OK, SpecError
from vlcluster.failure import begin_attempt
from vlcluster.storage.errors import redact


class LocalBackend:
    name = "local"
    queues = False
    rendered_file = "commands.sh"

    def __init__(self, console: Console | None = None):
        self.console = console or Console(highlight=False, soft_wrap=True)

    def validate(self, graph: Graph, source: str) -> None:
        for name, spec in graph.pipeline.stages.items():
            if spec.resources.nodes > 1:
                raise SpecError(
                    f"{source}: stages.{name}.resources.nodes is {spec.resources.nodes}; "
                    "the local backend runs on one node (use --backend slurm or ray)"
                )

    def submit(self, graph: Graph, plans: list[StagePlan], run_dir: Path) -> bool:
        failed: set[str] = set()
        with run_lock(run_dir):
            for index, plan in enumerate(plans, start=1):
                prefix = escape(f"[{index}/{len(plans)}] {plan.name}")  # sweep elements are named stage[key=value]
                blocked = [dep for dep in graph.upstream(plan.name) if dep in failed]
                if not plan.runs:
                    self.console.print(f"[dim]{prefix}: skipped (done)[/]")
                elif blocked:
                    failed.add(plan.name)
                    stage_dir(run_dir, plan.name).write_state(state="blocked", blocked_by=sorted(blocked))
                    self.console.print(f"[yellow]{prefix}: not started, upstream failed: {escape(', '.join(sorted(blocked)))}[/]")
                elif not self.run_stage(plan, run_dir, prefix):
                    failed.add(plan.name)
        return not failed

    def run_stage(self, plan: StagePlan, run_dir: Path, prefix: str) -> bool:
        directory = stage_dir(run_dir, plan.name)
        log_file, mirror = stage_log(directory)
        command = stage_command(plan.kind, str(run_dir), plan.name, plan.ranks)
        how = f"torchrun x{plan.ranks}" if is_distributed(plan.kind) else "python"
        self.console.print(f"[bold]{prefix}[/] ({plan.kind}, {how}): {plan.describe()}")
        started, began = time.time(), time.monotonic()
        begin_attempt(directory)
        with open(log_file, "a") as log:
            write_header(log, "", command)
            process = start_piped(command, child_env(plan.kind, plan.ranks))
            directory.write_state(state="running", backend=self.name, pid=process.pid, pid_start=process_start(process.pid),
                                  started=started, command=command, failure=None)
            rank_codes = rank_exit_codes(
                copy_lines(process, log, lambda line: self.console.print(f"  [dim]{escape(redact(line.rstrip()))}[/]"), mirror))
            exited = process.wait()
            code = exit_status(exited, directory, plan.spec_hash)
        if exited == EXIT_OK and code != EXIT_OK:
            self.console.print(f"[red]{prefix}: exited 0 but wrote no done-marker[/]")
        when_the_store_answers(mirror.sync, directory.root, "the stage's log")
        elapsed = time.monotonic() - began  # a jump of the wall clock is no time spent
        record_end(directory, code, started=started, rank_codes=rank_codes, duration_s=round(elapsed, 3))
        if code == EXIT_OK:
            self.console.print(f"[green]{prefix}: done in {elapsed:.1f} s[/]")
        else:
            self.console.print(f"[red]{prefix}: failed (exit {code}) after {elapsed:.1f} s; log: {directory.log_file}[/]")
        return code == EXIT_OK

    # ---- what status, logs and cancel ask ---------------------------------------

    def render(self, graph: Graph, plans: list[StagePlan], run_dir: Path) -> str:
        """The commands submit would run, one after another (finished stages are skipped)."""
        import shlex

        lines = [f"# {len(plans)} stage(s) of {graph.pipeline.name}, run one after another by `vlcluster submit`"]
        for index, plan in enumerate(plans, start=1):
            if plan.runs:
                lines += [f"# [{index}/{len(plans)}] {plan.name} ({plan.kind}): {plan.describe()}",
                          shlex.join(stage_command(plan.kind, str(run_dir), plan.name, plan.ranks))]
        return "\n".join(lines) + "\n"

    def describe(self, plans: list[StagePlan], records: dict[str, dict], run_dir: Path) -> dict[str, StageStatus]:
        return {plan.name: child_stage_status(records[plan.name], plan.status, stage_dir(run_dir, plan.name).log_file) for plan in plans}

    def logs(self, run_dir: Path, stage: str, record: dict) -> str:
        from vlcluster.backends.run_status import no_log, stage_log_text

        text = stage_log_text(run_dir, stage)
        if text is None:
            raise no_log(run_dir, stage)
        return text

    def cancel(self, run_dir: Path, records: dict[str, dict]) -> list[str]:
        """SIGTERM the running stage of a local submit (its ranks checkpoint and exit)."""
        return cancel_child_stages(records)
