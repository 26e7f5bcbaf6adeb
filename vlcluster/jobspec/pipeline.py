"""The pydantic model of a job file: named stages, each one member of a union
discriminated on ``kind``, plus the pipeline-wide settings.

The union is built from the table of kinds (``vlcluster/stages/kinds.py``):
each entry names its kind's spec model, which lives with the kind's runner in
``vlcluster/stages/<kind>.py``. Building it imports those modules, which is
why they keep torch and other heavy libraries inside their runner functions.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import Field, field_validator, model_validator

from vlcluster.jobspec.models import Strict
from vlcluster.stages.kinds import KINDS, spec_model
from vlcluster.storage.config import StorageSpec
from vlcluster.tracking.spec import TrackingSpec


def stage_union() -> Any:
    """Every kind's spec model, discriminated on ``kind``, in the table's order."""
    members = tuple(spec_model(kind) for kind in KINDS)
    for kind, member in zip(KINDS, members):
        declared = member.model_fields["kind"].annotation.__args__
        assert declared == (kind,), f"stages/kinds.py names {member.__name__} for kind {kind!r}, whose kind is {declared}"
    return Annotated[Union[members], Field(discriminator="kind")]


Stage = stage_union()


# How every key of a pipeline sweep starts: ``stages.STAGE.FIELD``.
SWEPT_KEY_PREFIX = "stages."


def pipeline_sweep_problems(zipped: dict[str, list], product: dict[str, list]) -> list[str]:
    """What is wrong with the axes of a pipeline sweep as written (stages are checked on expansion)."""
    problems = [] if zipped or product else ["give 'zip' (fields that vary together) and/or 'product' (fields that vary alone)"]
    for group, fields in (("zip", zipped), ("product", product)):
        for key, values in fields.items():
            if not key.startswith(SWEPT_KEY_PREFIX) or key.count(".") < 2:
                problems.append(f"{group}.{key}: expected stages.STAGE.FIELD, e.g. stages.seed.train.steps")
            elif not values:
                problems.append(f"{group}.{key}: no values")
    problems += [f"product.{key}: also in zip; a field is swept once" for key in zipped if key in product]
    lengths = {key: len(values) for key, values in zipped.items()}
    if len(set(lengths.values())) > 1:
        first = next(iter(lengths))
        problems += [
            f"zip.{key}: {count} values, but zip.{first} has {lengths[first]}; zipped fields vary together and need as many values each"
            for key, count in lengths.items() if count != lengths[first]
        ]
    return problems


class PipelineSweep(Strict):
    """Fields of several stages varied together (``vlcluster/jobspec/sweep.py``):
    each key is ``stages.STAGE.FIELD``; a stage runs once per combination of the
    values that reach it, with everything downstream of it."""

    zip: dict[str, list[Any]] = Field(
        default_factory=dict, description="fields that vary together: the i-th element takes the i-th value of each"
    )
    product: dict[str, list[Any]] = Field(default_factory=dict, description="fields that each vary on their own")

    @model_validator(mode="after")
    def _axes(self) -> PipelineSweep:
        problems = pipeline_sweep_problems(self.zip, self.product)
        if problems:
            raise ValueError("; ".join(problems))
        return self


class Replicates(Strict):
    """Copies of the seeded stages, replicate k with ``train.seed + k`` (initial weights and data
    order), everything they feed copied with them (``vlcluster/jobspec/sweep.py``)."""

    count: int = Field(ge=1, le=100, description="how many replicates (copies named [rep=0] ... [rep=count-1])")
    of: Literal["chain", "finetune"] = Field(
        "chain", description="chain: pre-training, merges, fine-tunes and evals per replicate; "
        "finetune: one pre-training, several fine-tune seeds of it (labelled so in the report)"
    )


class LimitsSpec(Strict):
    """What the whole pipeline may hold at once."""

    gpus: int | None = Field(None, ge=1, description="GPUs requested at once over all stages (SLURM: array throttles "
                             "and dependencies; Ray: placement); the local backend runs one stage at a time anyway")


class Pipeline(Strict):
    name: str
    run_dir: str | None = Field(None, description="default: runs/<name>; a local path or an s3:// URL")
    storage: StorageSpec | None = Field(None, description="object storage settings (no credentials)")
    tracking: TrackingSpec | None = Field(None, description="log every stage to W&B and/or MLflow besides TensorBoard (credentials from the environment)")
    stages: dict[str, Stage]
    sweep: PipelineSweep | None = Field(None, description="a sweep over fields of several stages (e.g. K_seed + K_VL = constant)")
    replicates: Replicates | None = Field(None, description="N (or {count: N, of: finetune}): repeat the study with other seeds")
    limits: LimitsSpec = LimitsSpec()

    @field_validator("replicates", mode="before")
    @classmethod
    def _replicate_count(cls, value: Any) -> Any:
        return {"count": value} if isinstance(value, int) and not isinstance(value, bool) else value

    @field_validator("stages")
    @classmethod
    def _not_empty(cls, stages: dict) -> dict:
        if not stages:
            raise ValueError("a pipeline needs at least one stage")
        return stages

    @property
    def resolved_run_dir(self) -> str:
        return self.run_dir or f"runs/{self.name}"
