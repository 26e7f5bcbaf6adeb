"""What one Ray job of vlcluster runs: ``python -m vlcluster.backends.ray_stage RUN_DIR STAGE``.

It starts the stage's command (torchrun for training, see
:func:`vlcluster.launch.stage_command`) and copies every output line to the
job's log (what the Ray dashboard shows) and to ``<stage>/logs/stage.log``.
Training lines ("step 8/24 ... loss 8.93 | lr ... | 410 samples/s") are also
parsed into ``state.json``'s ``progress``, which ``vlcluster status`` shows
and the driver prints.

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
import re
import signal
import socket
import subprocess
import sys
import time

from vlcluster.backends.local import _die_with_parent
from vlcluster.context import load_context
from vlcluster.launch import EXIT_REQUEUE, is_distributed, stage_command
from vlcluster.rundir import StageDir

DEFAULT_MAX_RESTARTS = 3
STEP_LINE = re.compile(r"step (\d+)/(\d+) \(\d+%\) (.*?) \| lr (\S+) \| ([\d.]+) samples/s")
LOSS = re.compile(r"\bloss ([-\d.e]+|nan|inf)")
# torchrun's reports of a rank that ended badly: the line it logs for the first
# failure it observes ("failed (exitcode: -9) local_rank: 1 (pid: ...)") and one
# "exitcode  : -9 (pid: ...)" line per failed rank in its final summary. Both
# are read: when a killed rank's peer fails on the broken connection first,
# only the summary names the SIGKILL.
RANK_FAILED = re.compile(r"failed \(exitcode: (-?\d+)\) local_rank|^\s+exitcode\s+: (-?\d+) \(pid: \d+\)")


def parse_progress(line: str) -> dict | None:
    """The trainer's step line as numbers, or None for any other line."""
    match = STEP_LINE.search(line)
    if match is None:
        return None
    loss = LOSS.search(match.group(3))
    return {
        "step": int(match.group(1)), "steps": int(match.group(2)),
        "loss": float(loss.group(1)) if loss else None,
        "lr": float(match.group(4)), "samples_per_s": float(match.group(5)), "at": time.time(),
    }


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


def child_env(kind: str) -> dict:
    # Ranks die with torchrun, torchrun with its parent: a SIGKILLed job leaves nothing behind.
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "VLCLUSTER_DIE_WITH_PARENT": "1"}
    if is_distributed(kind):
        env.setdefault("OMP_NUM_THREADS", "1")  # ranks share the node's cores
    return env


def run_once(command: list[str], env: dict, directory: StageDir | None, log) -> tuple[int, list[int]]:
    """One torchrun (or python) start, its output copied to stdout and
    ``log``; its exit code and the exit codes torchrun reported for failed
    ranks. Progress goes to ``directory``'s state (None: not this node's job)."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True,
                               bufsize=1, preexec_fn=_die_with_parent)
    rank_codes = []
    for line in process.stdout:
        sys.stdout.write(line)
        sys.stdout.flush()
        log.write(line)
        log.flush()
        progress = parse_progress(line)
        if progress is not None and directory is not None:
            directory.write_state(progress=progress)
        elif (failed := RANK_FAILED.search(line)) is not None:
            rank_codes.append(int(failed.group(1) or failed.group(2)))
    return process.wait(), rank_codes


def attempt(ctx, log, stopping: Stopping) -> tuple[int, list[int]]:
    """Run the stage once: here, or for a multi-node stage on one Ray task per node."""
    spec = ctx.spec
    if spec.resources.nodes > 1:
        from vlcluster.backends.ray_nodes import run_nodes

        results = run_nodes(str(ctx.run_dir), ctx.name, spec, lambda: stopping.requested)
        code = next((result.code for result in results if result.code != 0), 0)
        return code, [rank_code for result in results for rank_code in result.rank_codes]
    command = stage_command(spec.kind, str(ctx.run_dir), ctx.name, spec.resources.ranks_per_node)
    log.write(f"==== {time.strftime('%Y-%m-%d %H:%M:%S')} ray job on {socket.gethostname()}: {' '.join(command)}\n")
    log.flush()
    return run_once(command, child_env(spec.kind), ctx.dir, log)


def run_stage(run_dir: str, stage: str, max_restarts: int) -> int:
    ctx = load_context(run_dir, stage)
    directory: StageDir = ctx.dir
    stopping = Stopping()
    directory.log_file.parent.mkdir(parents=True, exist_ok=True)
    directory.write_state(state="running", host=socket.gethostname(), pid=os.getpid(), started=time.time())
    restarts = 0
    with open(directory.log_file, "a") as log:
        while True:
            code, rank_codes = attempt(ctx, log, stopping)
            if code == 0 or stopping.requested or restarts >= max_restarts or not restartable(rank_codes):
                break
            restarts += 1
            notice = (f"==== rank exit codes {rank_codes}: restarting the ranks ({restarts}/{max_restarts}), "
                      "they resume from the latest checkpoint\n")
            sys.stdout.write(notice)
            log.write(notice)
            log.flush()
            directory.write_state(worker_restarts=restarts, restarted=time.time())
    if code == 0 and directory.done_hash() == ctx.spec_hash:
        directory.write_state(state="done", returncode=0, ended=time.time())
        return 0
    state = "cancelled" if stopping.requested else "failed"
    directory.write_state(state=state, returncode=code, ended=time.time())
    return code or 1  # exit 0 without a done-marker is a failure too


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vlcluster.backends.ray_stage")
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
