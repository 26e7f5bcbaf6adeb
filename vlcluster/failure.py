"""Why a stage failed, in a form `status` can show without reading the log.

A rank that fails for a reason it can name (a full disk, too little memory,
a collective that timed out, more bad data than allowed, an object store
that stayed down) writes ``<stage>/failure.json``: ``{"cause", "message",
"rank", "time"}``; the records of earlier attempts are removed when an
attempt begins (:func:`begin_attempt`: no clock decides which attempt a
record belongs to, so a node's clock that jumps cannot hide a cause). A rank
cannot name its own SIGKILL (the kernel's out-of-memory killer, an
operator); the process that started the stage sees
the signal in the exit codes torchrun reports instead. The backend copies
the cause into ``state.json`` when the stage ends (:func:`failure_at_end`),
and ``status`` prints it beside the exit code.

Errors a rank sees only because a peer died first (gloo's "Connection
closed by peer") are not recorded: they would hide the real cause.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from pathlib import Path
from typing import Any

from vlcluster.errors import EXIT_OK
from vlcluster.stages.rundir import StageDir, read_json, write_json_atomic

log = logging.getLogger(__name__)

DISK_FULL = "disk full"
OUT_OF_MEMORY = "out of memory"
COLLECTIVE_TIMEOUT = "collective timeout"
BAD_DATA = "bad data over the limit"
STORAGE = "object store unavailable"
KILLED = "killed by SIGKILL"

# Messages of a collective that waited too long (gloo, NCCL, the c10d store).
TIMEOUT_WORDS = ("timed out", "timeout", "watchdog caught collective operation")
# Messages a rank sees when a peer is gone: a consequence, not a cause.
PEER_LOST_WORDS = ("connection closed by peer", "connection reset by peer", "broken pipe")
# CUDA's and the CPU allocator's words (torch raises a plain RuntimeError for the latter).
OOM_WORDS = ("out of memory", "can't allocate memory", "cannot allocate memory")
MESSAGE_CHARS = 600


STORAGE_WORDS = ("storage request failed", "cannot reach the storage")


def cause_of(exc: BaseException, run_dir: str = "") -> tuple[str, str] | None:
    """(cause, one paragraph) for an exception whose cause can be named, else
    None. ``run_dir`` names the store in the paragraph of a storage failure
    that was raised untranslated (s3fs's own OSError)."""
    from vlcluster.data.quality import BadDataError
    from vlcluster.storage.errors import StorageError, disk_full, explain

    if (full := disk_full(exc)) is not None:
        return DISK_FULL, full
    if isinstance(exc, BadDataError):
        return BAD_DATA, str(exc)
    storage = str(exc) if isinstance(exc, StorageError) else explain(exc, run_dir) if run_dir else None
    if storage is not None and any(words in storage for words in STORAGE_WORDS):
        return STORAGE, storage
    if _is_out_of_memory(exc):
        return OUT_OF_MEMORY, f"{type(exc).__name__}: {exc}".rstrip(": ")
    if _is_collective_timeout(exc):
        return COLLECTIVE_TIMEOUT, f"{type(exc).__name__}: {exc}"
    return None


def _is_out_of_memory(exc: BaseException) -> bool:
    import torch

    text = str(exc).lower()
    return isinstance(exc, (MemoryError, torch.OutOfMemoryError)) or any(words in text for words in OOM_WORDS)


def peer_lost(exc: BaseException) -> bool:
    """A collective failed because another rank is gone (its own log names why)."""
    return any(word in str(exc).lower() for word in PEER_LOST_WORDS)


def _is_collective_timeout(exc: BaseException) -> bool:
    import torch.distributed as dist

    text = str(exc).lower()
    if peer_lost(exc):
        return False
    distributed = isinstance(exc, (dist.DistError, TimeoutError)) or "gloo" in text or "nccl" in text
    return distributed and any(word in text for word in TIMEOUT_WORDS)


def failure_file(directory: StageDir) -> Path:
    return directory.root / "failure.json"


def note_failure(directory: StageDir, exc: BaseException, run_dir: str = "") -> tuple[str, str] | None:
    """Record why this rank fails, if the exception names it; returns (cause,
    paragraph). Best effort: on a full disk, or a store that is down, the
    record itself may not land."""
    named = cause_of(exc, run_dir)
    if named is None:
        return None
    cause, message = named
    record = {"cause": cause, "message": message[:MESSAGE_CHARS], "rank": int(os.environ.get("RANK", 0)), "time": time.time()}
    try:
        write_json_atomic(failure_file(directory), record)
    except Exception as error:  # noqa: BLE001 - the failure itself is what the rank reports
        log.warning("could not record the failure (%s): %s", cause, str(error).split("\n")[0])
        _keep_on_this_node(directory, record)
    return named


def _node_copy(directory: StageDir) -> Path | None:
    """Where this node keeps a failure record of a remote run directory (None for a local one)."""
    from vlcluster.storage.paths import is_remote, local_side

    return local_side(directory.root) / failure_file(directory).name if is_remote(directory.root) else None


def _keep_on_this_node(directory: StageDir, record: dict) -> None:
    """A record that could not reach a remote run directory (the store is what
    failed) is kept on this node's side of it, where the process that started
    the stage looks when it writes the stage's outcome."""
    if (copy := _node_copy(directory)) is None:
        return
    try:
        write_json_atomic(copy, record)
    except OSError:
        pass  # best effort: the log still has the paragraph


def _recorded(directory: StageDir) -> Any:
    """The rank's failure record: in the run directory, else on this node's side of a remote one."""
    record = read_json(failure_file(directory))
    if record is None and (copy := _node_copy(directory)) is not None:
        record = read_json(copy)
    return record


def said_in_one_paragraph(named: tuple[str, str] | None) -> bool:
    """Causes whose paragraph says what to do: a traceback would only bury it."""
    return named is not None and named[0] in (DISK_FULL, STORAGE, BAD_DATA)


def killed_by_signal(codes: list[int]) -> int | None:
    """The signal that ended a rank (torchrun reports -N; a shell reports 128+N)."""
    for code in codes:
        if code < 0:
            return -code
        if code > 128 and code - 128 in (signal.SIGKILL, signal.SIGSEGV, signal.SIGBUS, signal.SIGABRT):
            return code - 128
    return None


def begin_attempt(directory: StageDir) -> None:
    """Forget the failure records of earlier attempts (in the run directory and
    on this node's side of a remote one), so a record found when this attempt
    ends is its own, whatever the clocks of the nodes that wrote it said."""
    from vlcluster.storage.paths import remove_tree

    if (copy := _node_copy(directory)) is None:
        failure_file(directory).unlink(missing_ok=True)
    else:
        remove_tree(failure_file(directory))
        copy.unlink(missing_ok=True)


def failure_at_end(directory: StageDir, code: int, rank_codes: list[int]) -> dict[str, Any] | None:
    """What a failed attempt recorded (since :func:`begin_attempt`) or showed, for ``state.json``."""
    if code == EXIT_OK:
        return None
    record = _recorded(directory)
    if isinstance(record, dict) and isinstance(record.get("cause"), str) and isinstance(record.get("message"), str):
        return {"cause": record["cause"], "message": record["message"][:MESSAGE_CHARS]}
    sig = killed_by_signal([*rank_codes, code])
    if sig == signal.SIGKILL:
        return {"cause": KILLED, "message": "by the kernel's out-of-memory killer (see `dmesg`) or an operator; "
                                            "submit again to resume from the last checkpoint"}
    if sig is not None:
        return {"cause": f"killed by {signal.Signals(sig).name}", "message": f"a rank ended on signal {signal.Signals(sig).name}"}
    return None


SHOWN_CHARS = 200


def describe(failure: Any) -> str:
    """The ``failure`` field of ``state.json`` for `status`: the cause and the
    message's first sentence (the whole paragraph is in the log and the record)."""
    if not isinstance(failure, dict) or not isinstance(failure.get("cause"), str):
        return ""
    message = failure.get("message") if isinstance(failure.get("message"), str) else ""
    first = message.split(". ", 1)[0].split("\n", 1)[0]
    if len(first) > SHOWN_CHARS:
        first = first[:SHOWN_CHARS - 3] + "..."
    return f"{failure['cause']}: {first}" if first else failure["cause"]
