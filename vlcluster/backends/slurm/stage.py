"""What a SLURM job of vlcluster runs: one task per node starts the stage's
command (torchrun for training, with the rendezvous taken from the
allocation) and waits for it.

submitit pickles a :class:`StageJob` into the job folder and calls it on
every task. On the USR2 it sends before the time limit (or on preemption)
submitit calls :meth:`StageJob.checkpoint`: we SIGTERM the stage, whose ranks
save a checkpoint at the next step boundary and exit, and hand submitit a
fresh StageJob to requeue. ``scontrol requeue`` signals the ranks directly
(SIGTERM), with the same effect. Either way the requeued job runs the same
command, and the trainer resumes from its latest checkpoint.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time

import submitit
from submitit.helpers import Checkpointable, DelayedSubmission

from vlcluster.backends.stage_process import (
    child_env, exit_status, log_lines_since, rank_exit_codes, record_end, stage_log, write_header,
)
from vlcluster.errors import EXIT_OK, EXIT_REQUEUE
from vlcluster.failure import begin_attempt
from vlcluster.launch import Rendezvous, stage_command
from vlcluster.stages.rundir import stage_dir

STOP_TIMEOUT_S = 60


def rendezvous_port(job_id: str) -> int:
    """Every node derives the same port without talking to the others; two
    jobs sharing a head node get different ports."""
    return 20000 + int(str(job_id).split("_")[0]) % 20000


def rendezvous_from_slurm(env: submitit.JobEnvironment) -> Rendezvous:
    """First host of SLURM_JOB_NODELIST is the torchrun master."""
    return Rendezvous(
        nnodes=env.num_nodes, node_rank=env.node, master_addr=env.hostnames[0], master_port=rendezvous_port(env.job_id)
    )


def _child_setup() -> None:
    # SLURM delivers its USR2 warning to every process of the step; only the
    # submitit wrapper may act on it (torchrun would die of it). Ignoring
    # survives exec, so torchrun and its ranks inherit it.
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)


class StageFailed(RuntimeError):
    pass


class StageJob(Checkpointable):
    def __init__(self, run_dir: str, stage: str, spec_hash: str, kind: str, procs_per_node: int, python: str):
        self.run_dir, self.stage, self.spec_hash, self.kind = run_dir, stage, spec_hash, kind
        self.procs_per_node, self.python = procs_per_node, python
        self._child: subprocess.Popen | None = None

    def __getstate__(self) -> dict:
        return {key: value for key, value in self.__dict__.items() if key != "_child"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _child=None)

    def command(self, env: submitit.JobEnvironment) -> list[str]:
        rendezvous = rendezvous_from_slurm(env) if env.num_nodes > 1 else None
        return stage_command(self.kind, self.run_dir, self.stage, self.procs_per_node, self.python, rendezvous)

    def __call__(self) -> str:
        env = submitit.JobEnvironment()
        directory = stage_dir(self.run_dir, self.stage)
        is_main = env.global_rank == 0
        log_file, mirror = stage_log(directory, "stage.log" if env.node == 0 else f"node_{env.node}.log")
        restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
        command = self.command(env)
        started, began = time.time(), time.monotonic()
        if is_main:
            begin_attempt(directory)
            directory.write_state(state="running", job_id=env.job_id, host=socket.gethostname(), restarts=restarts,
                                  started=started, failure=None)
        with open(log_file, "a") as log:
            offset = log.tell()
            write_header(log, f"slurm job {env.job_id} (restart {restarts})", command)
            self._child = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, env=child_env(self.kind, self.procs_per_node, die_with_parent=False),
                preexec_fn=_child_setup, start_new_session=True,
            )
            # poll, not wait(): submitit's signal handler runs on this thread
            # and must be able to reap the child itself.
            while (exited := self._child.poll()) is None:
                time.sleep(0.5)
                mirror.maybe_sync()
        mirror.sync()
        if exited == EXIT_REQUEUE:
            raise StageFailed(f"{self.stage}: stopped on a signal after saving a checkpoint; it resumes when requeued")
        code = exit_status(exited, directory, self.spec_hash)
        if is_main:
            record_end(directory, code, started=started, rank_codes=rank_exit_codes(log_lines_since(log_file, offset)),
                       duration_s=round(time.monotonic() - began, 3))
        if code == EXIT_OK:
            return f"{self.stage}: done"
        raise StageFailed(f"{self.stage}: exit {code}; log {log_file}")

    def checkpoint(self) -> DelayedSubmission:
        """Called by submitit on USR2 (time limit near, or preemption)."""
        self._stop_child()
        return DelayedSubmission(StageJob(self.run_dir, self.stage, self.spec_hash, self.kind, self.procs_per_node, self.python))

    def _stop_child(self) -> None:
        child = self._child
        if child is None or child.returncode is not None:
            return
        os.killpg(child.pid, signal.SIGTERM)  # ranks save at the next step boundary
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while time.monotonic() < deadline:
            try:
                pid, _ = os.waitpid(child.pid, os.WNOHANG)
            except ChildProcessError:
                return
            if pid:
                child.returncode = EXIT_REQUEUE
                return
            time.sleep(0.2)
        os.killpg(child.pid, signal.SIGKILL)
