"""The job file's ``tracking:`` section: where stages log besides TensorBoard.

Only names and addresses live here; credentials (``WANDB_API_KEY``,
``MLFLOW_TRACKING_TOKEN``/``MLFLOW_TRACKING_USERNAME``/``…PASSWORD``) come
from the environment, as for object storage: the job loader refuses
credential-looking keys and URLs with a user:password part anywhere.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class WandbSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    project: str = Field(description="W&B project (one run per stage; the pipeline is the run group)")
    entity: str | None = Field(None, description="team or user (default: the API key's default entity)")
    mode: Literal["online", "offline"] = Field(
        "online", description="offline: runs are written under <stage>/wandb/ and uploaded later with `wandb sync`")


class MlflowSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tracking_uri: str = Field(description="MLflow tracking server URL (http://host:5000) or a local store (file:DIR, sqlite:///FILE)")
    experiment: str | None = Field(None, description="experiment name (default: the pipeline's name); one run per stage")


class TrackingSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    wandb: WandbSpec | None = Field(None, description="log every stage to Weights & Biases (needs vlcluster[tracking])")
    mlflow: MlflowSpec | None = Field(None, description="log every stage to MLflow (needs vlcluster[tracking])")
