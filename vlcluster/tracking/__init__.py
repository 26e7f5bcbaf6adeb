"""Experiment tracking besides TensorBoard: W&B and MLflow, one small adapter each
behind :class:`StageTracker`.

A stage process opens its tracker around the stage (``vlcluster.run``, rank 0
only); TensorBoard's writer forwards every scalar to :func:`current` (training
curves, throughput, MFU), and the end of the stage logs ``result.json``'s
numbers and the stage's small outputs (records, tables, figures) as artifacts.
One run per stage, continued when the stage resumes (its ids kept in
``<stage>/tracking.json``, :mod:`vlcluster.tracking.resume`); the pipeline is the W&B group and the MLflow experiment,
so a whole study is one view. The run's parameters are the stage's resolved
spec, its tags the lineage the study tables are keyed by.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

log = logging.getLogger("vlcluster.tracking")

ARTIFACT_SUFFIXES = {".json", ".md", ".csv", ".png", ".txt", ".tex", ".html"}
ARTIFACT_MAX_BYTES = 20 << 20
SKIPPED_DIRS = {"checkpoints", "tb", "wandb", "logs"}  # big, or written by the trackers themselves


class Adapter(Protocol):
    service: str  # the key of its run id in the stage's tracking.json
    run_id: str

    def log_metrics(self, scalars: dict[str, float], step: int) -> None: ...
    def log_result(self, values: dict[str, float]) -> None: ...
    def log_artifacts(self, files: list[tuple[Path, str]]) -> None: ...
    def finish(self, ok: bool) -> None: ...


class StageTracker:
    """Every configured service, called alike; a service that fails mid-run is
    logged and dropped, never the stage's failure."""

    def __init__(self, adapters: list[Adapter]):
        self.adapters = adapters

    def _each(self, action: str, *args: Any) -> None:
        for adapter in list(self.adapters):
            try:
                getattr(adapter, action)(*args)
            except Exception as exc:  # noqa: BLE001 - tracking must not fail a training run
                log.warning("tracking: %s.%s failed (%s); no more logging to it in this stage", type(adapter).__name__, action, exc)
                self.adapters.remove(adapter)

    def log_metrics(self, scalars: dict[str, float], step: int) -> None:
        self._each("log_metrics", scalars, step)

    def end(self, result: dict | None, files: list[tuple[Path, str]], ok: bool) -> None:
        if result:
            self._each("log_result", numbers(result))
        self._each("log_artifacts", files)
        self._each("finish", ok)


_current: StageTracker | None = None


def current() -> StageTracker | None:
    """The tracker of the stage running in this process (None: not tracked, or not rank 0)."""
    return _current


def numbers(record: dict, prefix: str = "") -> dict[str, float]:
    """The finite numbers of a (nested) record, by dotted key."""
    found: dict[str, float] = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            found.update(numbers(value, f"{name}."))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            found[name] = float(value)
    return found


def flat_params(spec: Any, prefix: str = "") -> dict[str, str]:
    """A resolved spec as dotted parameters (lists and scalars as JSON text)."""
    params: dict[str, str] = {}
    for key, value in (spec.items() if isinstance(spec, dict) else ()):
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            params.update(flat_params(value, f"{name}."))
        else:
            params[name] = value if isinstance(value, str) else json.dumps(value)
    return params


def stage_files(root: Path) -> list[tuple[Path, str]]:
    """The stage's small outputs (records, tables, figures) with their folder in the stage."""
    files = []
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root)
        if relative.parts[0] in SKIPPED_DIRS or path.suffix not in ARTIFACT_SUFFIXES or not path.is_file():
            continue
        if path.stat().st_size <= ARTIFACT_MAX_BYTES:
            files.append((path, str(relative.parent) if relative.parent != Path(".") else ""))
    return files


def is_main_rank() -> bool:
    return os.environ.get("RANK", "0") == "0"


@contextlib.contextmanager
def stage_tracking(ctx) -> Iterator[StageTracker | None]:
    """Track the stage run inside the block (a no-op without ``tracking:`` or off rank 0)."""
    global _current
    spec = ctx.pipeline.tracking
    if spec is None or not (spec.wandb or spec.mlflow) or not is_main_rank():
        yield None
        return
    from vlcluster.tracking.lineage import stage_tags

    params = flat_params(ctx.spec.model_dump(mode="json", by_alias=True))
    tags = stage_tags(ctx)
    from vlcluster.tracking.resume import record_run_ids, recorded_run_ids

    earlier = recorded_run_ids(ctx.dir.root, ctx.spec_hash)  # a resumed stage continues its runs
    adapters: list[Adapter] = []
    if spec.mlflow:
        from vlcluster.tracking.mlflow_adapter import MlflowAdapter

        _start(adapters, "mlflow", lambda: MlflowAdapter(spec.mlflow, ctx.pipeline.name, ctx.name, params, tags, earlier.get("mlflow")))
    if spec.wandb:
        from vlcluster.tracking.wandb_adapter import WandbAdapter
        from vlcluster.storage.paths import local_side

        _start(adapters, "wandb", lambda: WandbAdapter(spec.wandb, ctx.pipeline.name, ctx.name, params, tags,
                                                       local_side(ctx.dir.root / "wandb"), earlier.get("wandb")))
    if adapters:
        record_run_ids(ctx.dir.root, ctx.spec_hash, {adapter.service: adapter.run_id for adapter in adapters})
    tracker = _current = StageTracker(adapters)
    _ending[0] = lambda ok: tracker.end(_read_result(ctx), _artifacts(ctx.dir.root), ok)
    ok = False
    try:
        yield tracker
        ok = True
    finally:
        end_current(ok)


_ending: list = [None]  # how to end the current stage's runs (result, artifacts, status)


def end_current(ok: bool) -> None:
    """End the current stage's runs; training ranks leave by ``os._exit``
    (:func:`vlcluster.train.dist.exit_process`), past any ``finally``, so they call this first."""
    global _current
    ending, _ending[0], _current = _ending[0], None, None
    if ending is not None:
        ending(ok)


def forward_metrics():
    """What a TensorBoard writer hands its scalars to as well: the stage tracker's
    ``log_metrics``, or None without ``tracking:``."""
    tracker = current()
    return tracker.log_metrics if tracker is not None else None


def exit_rank(code: int) -> None:
    """End the stage's W&B / MLflow runs, then the rank: ``exit_process`` leaves
    by ``os._exit``, past the stage's ``with stage_tracking(...)``."""
    from vlcluster.errors import EXIT_OK
    from vlcluster.train.dist import exit_process

    end_current(code == EXIT_OK)
    exit_process(code)


def _start(adapters: list[Adapter], service: str, make) -> None:
    """A missing client is the stage's error (one paragraph naming the extra); a service
    that cannot be reached is a warning: the stage trains without it."""
    from vlcluster.errors import SpecError

    try:
        adapters.append(make())
    except SpecError:
        raise
    except Exception as exc:  # noqa: BLE001 - connection refused, bad URI, rejected key: never fail the training
        log.warning("tracking.%s: cannot start a run (%s); this stage is not tracked there", service, str(exc)[:300])


def _artifacts(root: Path) -> list[tuple[Path, str]]:
    from vlcluster.storage.paths import is_remote

    if not is_remote(root):
        return stage_files(root)
    try:
        return staged_remote_files(root)
    except Exception as exc:  # noqa: BLE001 - an unreachable store costs the artifacts, never the stage
        log.warning("tracking: the files of %s could not be fetched to log as artifacts (%s)", root, str(exc)[:300])
        return []


def staged_remote_files(root: Path) -> list[tuple[Path, str]]:
    """A stage directory in an object store: the trackers upload local files, so
    the files :func:`stage_files` would pick are downloaded first, into the
    stage's local side (``storage.cache_dir``), each only when it is small."""
    import fsspec

    from vlcluster.storage.paths import local_side

    fs, prefix = fsspec.core.url_to_fs(str(root))
    staging = local_side(root) / "artifacts"
    shutil.rmtree(staging, ignore_errors=True)  # only what the store holds now
    for name, info in sorted(fs.find(prefix, detail=True).items()):
        relative = Path(name[len(prefix):].lstrip("/"))
        if not relative.parts or relative.parts[0] in SKIPPED_DIRS or relative.suffix not in ARTIFACT_SUFFIXES:
            continue
        if (info.get("size") or 0) <= ARTIFACT_MAX_BYTES:
            (staging / relative).parent.mkdir(parents=True, exist_ok=True)
            fs.get_file(name, str(staging / relative))
    return stage_files(staging) if staging.is_dir() else []


def _read_result(ctx) -> dict | None:
    from vlcluster.stages.outputs import read_result

    return read_result(ctx.dir)
