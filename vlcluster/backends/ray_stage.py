"""What one Ray job of vlcluster runs: ``python -m vlcluster.backends.ray_stage RUN_DIR STAGE``.

It starts the stage's command (torchrun for training, see
:func:`vlcluster.launch.stage_command`) and copies every output line to the
job's log (what the Ray dashboard shows) and to ``<stage>/logs/stage.log``.
Training lines ("step 8/24 ... loss 8.93 | lr ... | 410 samples/s") are also
parsed into ``state.json``'s ``progress``, which ``vlcluster status`` shows
and the driver prints.

Fault tolerance is torchrun's: it runs with ``--max_restarts``, so when a rank
dies (killed, OOM, a lost worker process) torchrun stops the other ranks and
starts the group again, and the trainer resumes from the stage's latest
checkpoint in ``<stage>/checkpoints/``. Only when the restarts are used up
does the job fail.

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
from vlcluster.launch import is_distributed, stage_command
from vlcluster.rundir import StageDir

DEFAULT_MAX_RESTARTS = 3
STEP_LINE = re.compile(r"step (\d+)/(\d+) \(\d+%\) (.*?) \| lr (\S+) \| ([\d.]+) samples/s")
LOSS = re.compile(r"\bloss ([-\d.e]+|nan|inf)")
RESTART_LINE = "will restart worker group"  # torchrun's warning when it restarts the ranks


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


def run_stage(run_dir: str, stage: str, max_restarts: int) -> int:
    ctx = load_context(run_dir, stage)
    directory: StageDir = ctx.dir
    spec = ctx.spec
    command = stage_command(spec.kind, run_dir, stage, spec.resources.ranks_per_node, max_restarts=max_restarts)
    stopping = Stopping()
    # Ranks die with torchrun, torchrun with this wrapper: a SIGKILLed job leaves nothing behind.
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "VLCLUSTER_DIE_WITH_PARENT": "1"}
    if is_distributed(spec.kind):
        env.setdefault("OMP_NUM_THREADS", "1")  # ranks share the node's cores
    directory.log_file.parent.mkdir(parents=True, exist_ok=True)
    directory.write_state(state="running", host=socket.gethostname(), pid=os.getpid(), started=time.time(), command=command)
    restarts = 0
    with open(directory.log_file, "a") as log:
        log.write(f"==== {time.strftime('%Y-%m-%d %H:%M:%S')} ray job on {socket.gethostname()}: {' '.join(command)}\n")
        log.flush()
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True,
                                   bufsize=1, preexec_fn=_die_with_parent)
        for line in process.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            log.write(line)
            log.flush()
            progress = parse_progress(line)
            if progress is not None:
                directory.write_state(progress=progress)
            elif RESTART_LINE in line:
                restarts += 1
                directory.write_state(worker_restarts=restarts)
        code = process.wait()
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
