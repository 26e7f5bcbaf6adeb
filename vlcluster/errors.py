"""The bottom of vlcluster: the error every layer raises for the user, and
the exit statuses of commands and stage processes.

Imports nothing from vlcluster, so storage, extras, backends, plan and the
job-file loader can all raise :class:`SpecError` and every backend can read
a stage's exit status without importing the layer that produced it.
"""

from __future__ import annotations


class SpecError(Exception):
    """A job file that cannot be run; the message is meant for the user."""


# Exit statuses. A command (``vlcluster ...``) and a stage process
# (``python -m vlcluster.run``) share one table so a backend can tell
# "resume me" and "gate closed" from a failure by the number alone.

EXIT_OK = 0  # the command or stage did what it was asked
EXIT_FAILED = 1  # a stage failed (its cause recorded for `status`), or a command found a stage not done
EXIT_USAGE = 2  # a spec, input or storage error: one `error:` paragraph naming the file and field (argparse's usage errors too)
GATE_CLOSED = 3  # a merge stage stopped by its mergeability gate: a verdict, not a crash (status shows it apart)
EXIT_REQUEUE = 75  # a rank saved a checkpoint because it was told to stop (SIGTERM, preemption): "resume me", not "I failed"
EXIT_INTERRUPTED = 130  # the command was interrupted (Ctrl-C), 128 + SIGINT as shells report it
