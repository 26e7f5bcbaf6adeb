"""The stage's tracking run ids, kept in ``<stage>/tracking.json`` so that a stage
resumed from its checkpoint (killed, requeued, resubmitted) continues its W&B and
MLflow runs instead of starting one run per attempt.

The record is read back from the run directory, which anyone may have written:
a field that is not a run id of the service's form, or a record written for
another spec hash, is ignored with a warning naming the file and the field,
and the stage starts a new run there.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from vlcluster.stages.rundir import read_json, write_json_atomic

log = logging.getLogger("vlcluster.tracking")

RECORD = "tracking.json"
RUN_ID_FORMS = {
    "mlflow": re.compile(r"[0-9a-f]{32}"),  # MLflow's run ids: uuid4 hex
    "wandb": re.compile(r"[a-z0-9]{1,64}"),  # W&B's generated ids (8 characters), or a longer lower-case one
}


def recorded_run_ids(stage_root: Path, spec_hash: str) -> dict[str, str]:
    """service -> run id of an earlier attempt of this stage (same spec hash)."""
    path = stage_root / RECORD
    try:
        record = read_json(path)
    except Exception as exc:  # noqa: BLE001 - an object store that fails: start new runs, never fail the stage
        log.warning("%s: unreadable (%s); the stage starts new tracking runs", path, str(exc)[:200])
        return {}
    if record is None:  # none yet, or not JSON (read_json's None): new runs
        return {}
    if not isinstance(record, dict) or record.get("spec_hash") != spec_hash:
        log.warning("%s: spec_hash: not this stage's (%s); the stage starts new tracking runs", path, spec_hash)
        return {}
    ids = {}
    for service, form in RUN_ID_FORMS.items():
        value = record.get(service)
        if value is None:
            continue
        if isinstance(value, str) and form.fullmatch(value):
            ids[service] = value
        else:
            log.warning("%s: %s: not a %s run id; the stage starts a new run there", path, service, service)
    return ids


def record_run_ids(stage_root: Path, spec_hash: str, ids: dict[str, str]) -> None:
    write_json_atomic(stage_root / RECORD, {"spec_hash": spec_hash, **ids})
