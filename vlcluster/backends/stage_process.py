"""Running one stage's process, the same way on every backend.

The local backend, a SLURM job (``slurm/stage.py``) and a Ray job
(``ray/stage.py``) all start ``python -m vlcluster.run`` (under torchrun
for distributed kinds) through this module: the environment, the log file
beside a remote run directory and its header line, the line-by-line copy of
the output, dying with the parent, and the one success rule — exit 0 *and*
a done-marker holding the stage's spec hash.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO

from vlcluster.errors import EXIT_FAILED, EXIT_OK
from vlcluster.launch import is_distributed
from vlcluster.stages.rundir import StageDir
from vlcluster.storage.paths import Mirror, local_side

PR_SET_PDEATHSIG = 1
DIE_WITH_PARENT_ENV = "VLCLUSTER_DIE_WITH_PARENT"
# torchrun's reports of a rank that ended badly: the line it logs for the first
# failure it observes ("failed (exitcode: -9) local_rank: 1 (pid: ...)") and one
# "exitcode  : -9 (pid: ...)" line per failed rank in its final summary. Both
# are read: when a killed rank's peer fails on the broken connection first,
# only the summary names the SIGKILL.
RANK_FAILED = re.compile(r"failed \(exitcode: (-?\d+)\) local_rank|^\s+exitcode\s+: (-?\d+) \(pid: \d+\)")


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """Have the kernel send ``sig`` to this process when its parent dies.

    As a ``preexec_fn`` it runs in the child between fork and exec (torchrun
    forwards SIGTERM to its ranks); ``vlcluster.run`` calls it for itself so a
    rank never outlives the torchrun that started it."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, sig)


def pid_alive(pid: int | None) -> bool:
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OverflowError:  # a pid no process can have (a damaged record)
        return False
    try:  # a killed stage whose parent died stays a zombie until init reaps it: that is not running
        return "\nState:\tZ" not in Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return True


def process_start(pid: int) -> int | None:
    """When ``pid`` started (clock ticks after boot, /proc/PID/stat field 22): with
    the pid it names one process for good, since pids are reused."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) ": the comm may hold spaces
    return int(fields[19])


def is_recorded_process(record: dict) -> bool:
    """Whether the process a stage record names is still that very process:
    alive, with the recorded start time (or, for records without one, the
    recorded command line). A pid reused after a crash, or a pid planted in
    ``state.json``, is never signalled or reported as running."""
    pid = record.get("pid")
    if not pid_alive(pid):
        return False
    if "pid_start" in record:
        return process_start(pid) == record["pid_start"]
    command = record.get("command")
    try:
        running = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[:-1]
    except OSError:
        return False
    return isinstance(command, list) and [arg.encode() for arg in map(str, command)] == running


def child_env(kind: str, ranks_per_node: int, die_with_parent: bool = True) -> dict[str, str]:
    """The stage's environment: unbuffered output (the log follows it live),
    the node's cores split between its ranks as OpenMP threads (one rank gets
    them all, as torch's own default gives it; torchrun alone would give every
    rank one thread only when there are several), and, where asked, ranks that
    die with their torchrun. An OMP_NUM_THREADS the user or the scheduler set
    is kept."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if die_with_parent:
        env[DIE_WITH_PARENT_ENV] = "1"
    if is_distributed(kind):
        env.setdefault("OMP_NUM_THREADS", str(threads_per_rank(ranks_per_node)))
    return env


def threads_per_rank(ranks_per_node: int) -> int:
    """The cores this process may use (its affinity, as SLURM and cgroups set
    it), shared evenly between the node's ranks; at least one each."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // max(1, ranks_per_node))


def stage_log(directory: StageDir, name: str = "stage.log") -> tuple[Path, Mirror]:
    """A log appended line by line needs a local file: beside a remote run
    directory it is uploaded every 30 s while it grows and when the stage ends."""
    local = local_side(directory.root) / "logs" / name
    local.parent.mkdir(parents=True, exist_ok=True)
    return local, Mirror(local, directory.root / "logs" / name)


def write_header(log: IO[str], label: str, command: list[str]) -> None:
    """One line per start of a stage's command, so restarts read apart in the log."""
    log.write(f"==== {time.strftime('%Y-%m-%d %H:%M:%S')} {label}{' ' if label else ''}{' '.join(command)}\n")
    log.flush()


def start_piped(command: list[str], env: dict[str, str]) -> subprocess.Popen:
    """The stage with its output on a pipe (read it with :func:`copy_lines`);
    SIGTERMed when this process dies."""
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True,
                            bufsize=1, preexec_fn=die_with_parent)


def copy_lines(process: subprocess.Popen, log: IO[str], echo: Callable[[str], None] | None = None,
               mirror: Mirror | None = None) -> Iterator[str]:
    """Every output line appended to the log (and echoed) as it comes, then yielded."""
    for line in process.stdout:
        log.write(line)
        log.flush()
        if echo is not None:
            echo(line)
        if mirror is not None:
            mirror.maybe_sync()
        yield line


def exit_status(code: int, directory: StageDir, spec_hash: str) -> int:
    """The stage succeeded only if it exited 0 *and* its done-marker holds its
    spec hash; exit 0 without the marker counts as a failure, so dependants never
    start on missing outputs."""
    if code == EXIT_OK and directory.done_hash() != spec_hash:
        return EXIT_FAILED
    return code


def record_end(directory: StageDir, code: int, cancelled: bool = False, started: float | None = None,
               rank_codes: list[int] | None = None, **fields) -> str:
    """Write the outcome into the stage's record, with the cause of a failure
    of the attempt that began at ``started`` where one is known (see
    :mod:`vlcluster.failure`); returns the state written."""
    from vlcluster.failure import failure_at_end

    state = "done" if code == EXIT_OK else "cancelled" if cancelled else "failed"
    ended = time.time()

    def write() -> None:
        failure = None if started is None or state != "failed" else failure_at_end(directory, code, rank_codes or [])
        directory.write_state(state=state, returncode=code, ended=ended, failure=failure, **fields)

    when_the_store_answers(write, directory.root, f"the outcome of the stage ({state})")
    return state


# How long the process that ran a stage waits for the run directory's object
# store to answer before it gives up writing the stage's outcome: an outage of
# minutes should still leave `status` the cause, not "interrupted".
STORE_WAIT_S = 900
STORE_RETRY_S = 5.0


def when_the_store_answers(action: Callable[[], None], root: Path, what: str, wait_s: float = STORE_WAIT_S) -> None:
    """``action()``; while the object store holding ``root`` is unavailable,
    again every few seconds (saying so once) until it answers or the wait ends."""
    from vlcluster.failure import STORAGE, cause_of
    from vlcluster.storage.paths import is_remote

    deadline = time.monotonic() + wait_s
    said = False
    while True:
        try:
            return action()
        except Exception as exc:  # noqa: BLE001 - only a store that is down is waited for; anything else is raised
            named = cause_of(exc, str(root)) if is_remote(root) else None
            if named is None or named[0] != STORAGE or time.monotonic() > deadline:
                raise
            if not said:  # stderr: the submit's terminal, a SLURM job's or a Ray job's log
                print(f"warning: the object store of {root} does not answer: writing {what} when it does "
                      f"(waiting up to {wait_s:.0f} s)", file=sys.stderr, flush=True)
                said = True
            time.sleep(STORE_RETRY_S)


def child_stage_status(record: dict, plan_status: str, log_file: Path):
    """``describe`` for a stage that a submit runs as its own child process (the
    local backend, the inline example): a record left ``running`` by a submit
    that is gone reads ``interrupted``; a failure shows its cause, exit code and log."""
    from vlcluster.backends.contract import StageStatus
    from vlcluster.failure import describe as describe_failure

    state = record.get("state")
    if state == "running" and not is_recorded_process(record):
        state = "interrupted"  # the submit that ran it was killed
    if state == "failed":
        return StageStatus("failed", "; ".join(filter(None, [
            describe_failure(record.get("failure")), f"exit {record.get('returncode')}", f"log {log_file}"])))
    if state in {"running", "interrupted", "cancelled", "blocked"}:
        return StageStatus(state)
    return StageStatus("stale" if plan_status == "stale" else "pending")


def cancel_child_stages(records: dict[str, dict]) -> list[str]:
    """``cancel`` for stages run as a submit's child processes: SIGTERM each one
    still running (a training stage checkpoints and exits); the stages signalled."""
    running = [name for name, record in records.items() if record.get("state") == "running" and is_recorded_process(record)]
    for name in running:
        os.kill(records[name]["pid"], signal.SIGTERM)
    return running


def rank_exit_codes(lines: Iterable[str]) -> list[int]:
    """The exit codes torchrun reported for failed ranks in ``lines`` of its output."""
    return [int(found.group(1) or found.group(2)) for line in lines if (found := RANK_FAILED.search(line))]


def log_lines_since(log_file: Path, offset: int) -> list[str]:
    """The lines appended to ``log_file`` after byte ``offset`` (what one start wrote)."""
    try:
        with open(log_file, "rb") as handle:
            handle.seek(offset)
            return handle.read().decode(errors="replace").splitlines()
    except OSError:
        return []


def echo(line: str) -> None:
    sys.stdout.write(line)  # e.g. the Ray job's log
    sys.stdout.flush()


def run_once(command: list[str], env: dict, log) -> tuple[int, list[int]]:
    """One torchrun (or python) start, its output copied to stdout and
    ``log``; its exit code and the exit codes torchrun reported for failed ranks."""
    process = start_piped(command, env)
    rank_codes = rank_exit_codes(copy_lines(process, log, echo))
    return process.wait(), rank_codes
