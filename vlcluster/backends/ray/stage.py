"""What one Ray job of vlcluster runs: ``python -m vlcluster.backends.ray.stage RUN_DIR STAGE``.

It starts the stage's command (torchrun for training, see
:func:`vlcluster.launch.stage_command`) and copies every output line to the
job's log (what the Ray dashboard shows, the trainer's step lines included)
and to ``<stage>/logs/stage.log``. Progress reaches ``vlcluster status``
through the stage's own ``progress.json`` (:mod:`vlcluster.stages.progress`).

Fault tolerance: when a rank of a training stage dies by a signal (killed,
OOM-killed, a crashed worker process) or stops with ``EXIT_REQUEUE``,
torchrun stops the other ranks and exits; this wrapper then starts torchrun
again, up to ``--max-restarts`` times, and the trainer resumes from the
stage's latest checkpoint in ``<stage>/checkpoints/``. A rank that fails
with an ordinary error (exit 1: a bug, bad data) fails the job at once.
Restarting the whole torchrun, not torchrun's own ``--max_restarts``, is
deliberate: a restarted worker group of a ``--standalone`` torchrun (torch
2.13) reconnects to the old rendezvous store, whose keys still name the
dead ranks' addresses, and hangs in ``init_process_group``; a fresh torchrun
has a fresh store.

On ``ray job stop`` (``vlcluster cancel``) Ray sends SIGTERM to this process
and all its descendants: the ranks save a checkpoint at the next step
boundary and exit, and this wrapper waits for them before recording the
stage as cancelled.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
import time

from vlcluster.backends.stage_process import child_env, exit_status, record_end, run_once, write_header
from vlcluster.stages.context import load_context
from vlcluster.errors import EXIT_OK, EXIT_REQUEUE
from vlcluster.failure import begin_attempt
from vlcluster.launch import stage_command
from vlcluster.stages.rundir import StageDir

DEFAULT_MAX_RESTARTS = 3



class Stopping:
    """Records that Ray asked the job to stop; the wrapper itself keeps
    running until the stage's processes (which got the same signal) exit."""

    def __init__(self) -> None:
        self.requested = False
        signal.signal(signal.SIGTERM, self._handle)
        signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum: int, frame) -> None:
        self.requested = True


def restartable(rank_exit_codes: list[int]) -> bool:
    """A rank was lost (killed by a signal) or asked to be resumed, rather
    than failing on an error that a restart would only repeat."""
    return any(code < 0 or code == EXIT_REQUEUE for code in rank_exit_codes)


def attempt(ctx, log, stopping: Stopping) -> tuple[int, list[int]]:
    """Run the stage once: here, or for a multi-node stage on one Ray task per node."""
    spec = ctx.spec
    if spec.resources.nodes > 1:
        from vlcluster.backends.ray.multi_node import run_nodes

        results = run_nodes(str(ctx.run_dir), ctx.name, spec, lambda: stopping.requested)
        code = next((result.code for result in results if result.code != EXIT_OK), EXIT_OK)
        return code, [rank_code for result in results for rank_code in result.rank_codes]
    command = stage_command(spec.kind, str(ctx.run_dir), ctx.name, spec.resources.ranks_per_node)
    write_header(log, f"ray job on {socket.gethostname()}:", command)
    return run_once(command, child_env(spec.kind, spec.resources.ranks_per_node), log)


def run_stage(run_dir: str, stage: str, max_restarts: int) -> int:
    ctx = load_context(run_dir, stage)
    directory: StageDir = ctx.dir
    stopping = Stopping()
    directory.log_file.parent.mkdir(parents=True, exist_ok=True)
    started, began = time.time(), time.monotonic()
    begin_attempt(directory)
    directory.write_state(state="running", host=socket.gethostname(), pid=os.getpid(), started=started, failure=None)
    restarts = 0
    with open(directory.log_file, "a") as log:
        while True:
            code, rank_codes = attempt(ctx, log, stopping)
            if code == EXIT_OK or stopping.requested or restarts >= max_restarts or not restartable(rank_codes):
                break
            restarts += 1
            notice = (f"==== rank exit codes {rank_codes}: restarting the ranks ({restarts}/{max_restarts}), "
                      "they resume from the latest checkpoint\n")
            sys.stdout.write(notice)
            log.write(notice)
            log.flush()
            directory.write_state(worker_restarts=restarts, restarted=time.time())
    code = exit_status(code, directory, ctx.spec_hash)
    record_end(directory, code, cancelled=stopping.requested, started=started, rank_codes=rank_codes,
               duration_s=round(time.monotonic() - began, 3))
    return code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vlcluster.backends.ray.stage")
    parser.add_argument("run_dir")
    parser.add_argument("stage")
    parser.add_argument("--max-restarts", type=int, default=DEFAULT_MAX_RESTARTS)
    parser.add_argument("--workdir", help="directory relative paths of the job file are resolved in, if it exists here")
    args = parser.parse_args(argv)
    if args.workdir and os.path.isdir(args.workdir):
        os.chdir(args.workdir)
    return run_stage(args.run_dir, args.stage, args.max_restarts)


if __name__ == "__main__":
    sys.exit(main())
