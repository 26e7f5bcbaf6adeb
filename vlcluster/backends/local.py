"""Local backend: run stages one after another on this machine.

Each stage is a subprocess (torchrun for training stages) whose output goes
to the stage log and, line by line, to the console. A stage whose upstream
failed is not started. Killing ``vlcluster submit`` kills its stages too
(they would otherwise keep writing checkpoints under the next submit).
"""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from vlcluster.graph import Graph
from vlcluster.launch import is_distributed, stage_command
from vlcluster.plan import StagePlan
from vlcluster.rundir import stage_dir
from vlcluster.jobspec.load import SpecError
from vlcluster.storage.errors import redact
from vlcluster.storage.paths import Mirror, local_side

PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """Runs in the child between fork and exec: SIGTERM it when we die.
    torchrun forwards SIGTERM to its ranks."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


@contextmanager
def run_lock(run_dir: Path):
    """One submit per run directory at a time (per machine for a remote run
    directory: the lock file lives in its local side)."""
    local = local_side(run_dir)
    local.mkdir(parents=True, exist_ok=True)
    with open(local / ".lock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SpecError(f"{run_dir}: another vlcluster submit is running on this run directory") from None
        yield


class LocalBackend:
    name = "local"

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
                prefix = f"[{index}/{len(plans)}] {plan.name}"
                blocked = [dep for dep in graph.upstream(plan.name) if dep in failed]
                if not plan.runs:
                    self.console.print(f"[dim]{prefix}: skipped (done)[/]")
                elif blocked:
                    failed.add(plan.name)
                    stage_dir(run_dir, plan.name).write_state(state="blocked", blocked_by=sorted(blocked))
                    self.console.print(f"[yellow]{prefix}: not started, upstream failed: {', '.join(sorted(blocked))}[/]")
                elif not self.run_stage(plan, run_dir, prefix):
                    failed.add(plan.name)
        return not failed

    def run_stage(self, plan: StagePlan, run_dir: Path, prefix: str) -> bool:
        directory = stage_dir(run_dir, plan.name)
        # The log is appended line by line: locally (beside a remote run
        # directory), uploaded every 30 s while it grows and when the stage ends.
        log_file = local_side(directory.root) / "logs" / "stage.log"
        log_file.parent.mkdir(parents=True, exist_ok=True)
        mirror = Mirror(log_file, directory.log_file)
        command = stage_command(plan.kind, str(run_dir), plan.name, plan.ranks)
        how = f"torchrun x{plan.ranks}" if is_distributed(plan.kind) else "python"
        self.console.print(f"[bold]{prefix}[/] ({plan.kind}, {how}): {plan.describe()}")
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "VLCLUSTER_DIE_WITH_PARENT": "1"}
        if is_distributed(plan.kind):
            env.setdefault("OMP_NUM_THREADS", "1")  # ranks share the cores
        started = time.time()
        with open(log_file, "a") as log:
            log.write(f"==== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(command)}\n")
            log.flush()
            process = subprocess.Popen(
                command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True,
                bufsize=1, preexec_fn=_die_with_parent,
            )
            directory.write_state(state="running", backend=self.name, pid=process.pid, started=started, command=command)
            for line in process.stdout:
                log.write(line)
                log.flush()
                self.console.print(f"  [dim]{escape(redact(line.rstrip()))}[/]")
                mirror.maybe_sync()
            code = process.wait()
        mirror.sync()
        if code == 0 and directory.done_hash() != plan.spec_hash:
            code = 1  # exited cleanly without its outputs: never let dependants start on that
            self.console.print(f"[red]{prefix}: exited 0 but wrote no done-marker[/]")
        elapsed = time.time() - started
        state = "done" if code == 0 else "failed"
        directory.write_state(state=state, returncode=code, ended=time.time())
        if code == 0:
            self.console.print(f"[green]{prefix}: done in {elapsed:.1f} s[/]")
        else:
            self.console.print(f"[red]{prefix}: failed (exit {code}) after {elapsed:.1f} s; log: {directory.log_file}[/]")
        return code == 0
