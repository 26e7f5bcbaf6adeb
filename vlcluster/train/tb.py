"""TensorBoard scalars, written by rank 0 only (and handed to ``forward`` too:
the stage passes its W&B / MLflow tracker's ``log_metrics`` when the job file
has one).

Event files are appended to, which object stores cannot do: for a remote
``tb/`` the writer writes into a local directory and uploads its files
(each a whole-object PUT) at most every ``SYNC_EVERY_S`` seconds and on
close. A new run after a resume writes a new event file beside the old
ones; its purge marker hides the old events past the resume step.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from vlcluster.storage.paths import is_remote, local_side, upload_tree

SYNC_EVERY_S = 30.0


class MetricsWriter:
    def __init__(self, log_dir: Path, enabled: bool, purge_step: int | None = None,
                 forward: Callable[[dict[str, float], int], None] | None = None):
        self.writer, self.forward = None, forward
        self.remote = log_dir if is_remote(log_dir) else None
        self.synced = time.monotonic()
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step (the resumed run's first step) drops the events that a killed
            # run wrote after its last checkpoint, so curves have no duplicates.
            self.local = local_side(log_dir)
            self.writer = SummaryWriter(str(self.local), purge_step=purge_step or None)

    def add(self, scalars: dict[str, float], step: int) -> None:
        if self.writer is None:
            return
        if self.forward is not None:  # the same curves to W&B / MLflow
            self.forward(scalars, step)
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()
        if self.remote is not None and time.monotonic() - self.synced > SYNC_EVERY_S:
            self.sync()

    def sync(self) -> None:
        """Upload the local event files to the remote ``tb/`` (no-op for a local one)."""
        if self.writer is not None and self.remote is not None:
            upload_tree(self.local, self.remote)
            self.synced = time.monotonic()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.sync()
