"""TensorBoard scalars, written by rank 0 only."""

from __future__ import annotations

from pathlib import Path


class MetricsWriter:
    def __init__(self, log_dir: Path, enabled: bool, purge_step: int | None = None):
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step drops events past the resume point that a killed run
            # wrote after its last checkpoint, so curves have no duplicates.
            self.writer = SummaryWriter(str(log_dir), purge_step=purge_step or None)

    def add(self, scalars: dict[str, float], step: int) -> None:
        if self.writer is None:
            return
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
