"""Layout of a run directory and the small JSON records kept in it.

```
<run_dir>/pipeline.json            the resolved pipeline (what `status` reads)
<run_dir>/<stage>/state.json       backend record: state, pid/job id, exit code, times
<run_dir>/<stage>/_SUCCESS         done marker holding the stage's spec hash
<run_dir>/<stage>/logs/stage.log   stdout+stderr of the stage
<run_dir>/<stage>/checkpoints/     resumable training checkpoints
<run_dir>/<stage>/tb/              TensorBoard events
<run_dir>/<stage>/model.safetensors, model.json, result.json   stage outputs
```
All writes go through :func:`write_json_atomic` so a crash never leaves a
half-written record behind. ``run_dir`` may be a local path or an object-store
URL (``s3://bucket/runs/x``); see :mod:`vlcluster.storage.paths`.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlcluster.jobspec.names import confined_child
from vlcluster.storage.paths import read_json, run_path, write_json

__all__ = ["SUCCESS", "StageDir", "pipeline_file", "read_json", "stage_dir", "write_json_atomic"]

SUCCESS = "_SUCCESS"
log = logging.getLogger(__name__)


def write_json_atomic(path: Path, payload: Any) -> None:
    """Replace a JSON record in one step (rename locally, one PUT on an object store)."""
    write_json(path, payload)


@dataclass(frozen=True)
class StageDir:
    """Paths of one stage inside a run directory."""

    root: Path

    @property
    def state_file(self) -> Path:
        return self.root / "state.json"

    @property
    def success_file(self) -> Path:
        return self.root / SUCCESS

    @property
    def log_file(self) -> Path:
        return self.root / "logs" / "stage.log"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def tensorboard(self) -> Path:
        return self.root / "tb"

    @property
    def model_weights(self) -> Path:
        return self.root / "model.safetensors"

    @property
    def model_config(self) -> Path:
        return self.root / "model.json"

    @property
    def result_file(self) -> Path:
        return self.root / "result.json"

    def done_hash(self) -> str | None:
        marker = read_json(self.success_file)
        return marker.get("spec_hash") if isinstance(marker, dict) else None

    def mark_done(self, spec_hash: str) -> None:
        write_json_atomic(self.success_file, {"spec_hash": spec_hash, "finished": time.time()})

    def read_state(self) -> dict:
        """The backend record; fields of the wrong type (a damaged or forged
        record) are dropped so every reader can trust the types it uses."""
        return checked_state(read_json(self.state_file), self.state_file)

    def write_state(self, **fields: Any) -> None:
        state = self.read_state()
        state.update(fields)
        write_json_atomic(self.state_file, state)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and -(2**31) <= value < 2**31


def _is_text_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(item, str) for item in value)


# Field -> check, for every field a backend writes and a reader interprets.
STATE_FIELDS: dict[str, Callable[[Any], bool]] = {
    "state": lambda v: isinstance(v, str), "backend": lambda v: isinstance(v, str),
    "host": lambda v: isinstance(v, str), "reason": lambda v: v is None or isinstance(v, str),
    "slurm_log": lambda v: isinstance(v, str), "job_id": lambda v: isinstance(v, str) or _is_int(v),
    "pid": lambda v: _is_int(v) and v > 0, "returncode": lambda v: v is None or _is_int(v),
    "worker_restarts": _is_int, "started": _is_number, "ended": _is_number,
    "cancelled": _is_number, "restarted": _is_number, "gate": lambda v: v is None or isinstance(v, dict),
    "failure": lambda v: v is None or isinstance(v, dict),
    "blocked_by": _is_text_list, "command": _is_text_list,
}


def checked_state(record: Any, path: Path) -> dict:
    if record is None:
        return {}
    if not isinstance(record, dict):
        log.warning("%s: not a JSON object; ignored (damaged state record)", path)
        return {}
    bad = sorted(key for key, check in STATE_FIELDS.items() if key in record and not check(record[key]))
    if bad:
        log.warning("%s: ignored fields of the wrong type: %s", path, ", ".join(bad))
    return {key: value for key, value in record.items() if key not in bad}


def stage_dir(run_dir: str | Path, stage: str) -> StageDir:
    """The directory of ``stage``; always one level below ``run_dir``, whatever
    the name holds (a run directory's records may come from anyone)."""
    return StageDir(run_path(run_dir) / confined_child(stage))


def pipeline_file(run_dir: str | Path) -> Path:
    return run_path(run_dir) / "pipeline.json"
