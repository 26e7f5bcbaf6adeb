"""Weights & Biases: one run per stage, grouped by pipeline; the API key comes from
``WANDB_API_KEY`` (or ``wandb login``); offline runs stay under the stage's ``wandb/``."""

from __future__ import annotations

from pathlib import Path

from vlcluster.extras import require
from vlcluster.tracking.spec import WandbSpec


class WandbAdapter:
    service = "wandb"

    def __init__(self, spec: WandbSpec, group: str, run_name: str, params: dict[str, str], tags: dict[str, str],
                 local_dir: Path, resume_id: str | None = None):
        wandb = require("wandb", "tracking.wandb")
        local_dir.mkdir(parents=True, exist_ok=True)
        self.wandb = wandb
        # resume="allow": the earlier attempt's run continues (offline: a new run file with the
        # same id, which `wandb sync` appends to that run); a new run when there is none.
        self.run = wandb.init(
            project=spec.project, entity=spec.entity, mode=spec.mode, group=group, name=run_name,
            job_type=tags.get("kind"), config={**params, **{f"lineage/{key}": value for key, value in tags.items()}},
            dir=str(local_dir), reinit="create_new", settings=wandb.Settings(console="off", x_disable_stats=True),
            id=resume_id, resume="allow",
        )
        self.run_id = self.run.id

    def log_metrics(self, scalars: dict[str, float], step: int) -> None:
        self.run.log(dict(scalars), step=step)

    def log_result(self, values: dict[str, float]) -> None:
        self.run.summary.update({f"result/{key}": value for key, value in values.items()})

    def log_artifacts(self, files: list[tuple[Path, str]]) -> None:
        if not files:
            return
        artifact = self.wandb.Artifact(f"{self.run.group}-{self.run.name}".replace("/", "-"), type="stage-outputs")
        for path, folder in files:
            artifact.add_file(str(path), name=f"{folder}/{path.name}" if folder else path.name)
        self.run.log_artifact(artifact)

    def finish(self, ok: bool) -> None:
        self.run.finish(exit_code=0 if ok else 1)
