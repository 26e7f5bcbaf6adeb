"""MLflow: one experiment per pipeline (or ``tracking.mlflow.experiment``), one run per stage."""

from __future__ import annotations

import time
from pathlib import Path

from vlcluster.extras import require
from vlcluster.tracking.spec import MlflowSpec

MAX_KEY, MAX_VALUE = 250, 6000  # MLflow's limits on a parameter's name and value (a long shard list would be refused)


class MlflowAdapter:
    service = "mlflow"

    def __init__(self, spec: MlflowSpec, experiment: str, run_name: str, params: dict[str, str], tags: dict[str, str],
                 resume_id: str | None = None):
        require("mlflow", "tracking.mlflow")
        from mlflow.entities import Param, RunTag
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=spec.tracking_uri)
        experiment_id = self._experiment(spec.experiment or experiment)
        self.run_id = self._continued(resume_id, experiment_id) or self.client.create_run(
            experiment_id, run_name=run_name, tags=tags).info.run_id
        items = [Param(key[:MAX_KEY], value if len(value) <= MAX_VALUE else value[:MAX_VALUE - 1] + "…")
                 for key, value in params.items()]
        for start in range(0, len(items), 100):  # the server's batch limit
            self.client.log_batch(self.run_id, params=items[start:start + 100])
        self.client.log_batch(self.run_id, tags=[RunTag("mlflow.runName", run_name)])

    def _continued(self, run_id: str | None, experiment_id: str) -> str | None:
        """The earlier attempt's run, back to RUNNING; None when the server does not
        have it in this experiment (another server, a deleted run): a new run then."""
        if run_id is None:
            return None
        try:
            run = self.client.get_run(run_id)
        except Exception:  # noqa: BLE001 - RESOURCE_DOES_NOT_EXIST
            return None
        if run.info.experiment_id != experiment_id or run.info.lifecycle_stage != "active":
            return None
        self.client.update_run(run_id, status="RUNNING")
        return run_id

    def _experiment(self, name: str) -> str:
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        try:
            return self.client.create_experiment(name)
        except Exception:  # noqa: BLE001 - another stage of the pipeline created it first
            found = self.client.get_experiment_by_name(name)
            if found is None:
                raise
            return found.experiment_id

    def log_metrics(self, scalars: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(key, float(value), now, step) for key, value in scalars.items()]
        for start in range(0, len(metrics), 1000):
            self.client.log_batch(self.run_id, metrics=metrics[start:start + 1000])

    def log_result(self, values: dict[str, float]) -> None:
        self.log_metrics({f"result/{key}": value for key, value in values.items()}, step=0)

    def log_artifacts(self, files: list[tuple[Path, str]]) -> None:
        for path, folder in files:
            self.client.log_artifact(self.run_id, str(path), artifact_path=folder or None)

    def finish(self, ok: bool) -> None:
        self.client.set_terminated(self.run_id, "FINISHED" if ok else "FAILED")
