"""The model file format: ``model.safetensors`` + ``model.json`` in one directory.

Every command and stage that writes a model (training, merging, ``convert``)
writes it here, and every reader of one finds its config and digest here.
``model.json`` holds the config, the provenance and, for a local file, the
weights' sha256 with the size and mtime it was taken at.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from vlcluster.model.config import ModelConfig
from vlcluster.storage.paths import is_remote, local_copy, read_json, run_path, writable, write_json
from vlcluster.storage.tensorfile import load_tensors, save_tensors

WEIGHTS = "model.safetensors"
RECORD = "model.json"


class ModelPaths(Protocol):
    """Where a model's two files are: a :class:`ModelDir`, or a stage's directory
    (``vlcluster.stages.rundir.StageDir`` has the same three paths; it is not
    imported here, so that the torch-free submit path can use it)."""

    @property
    def root(self) -> Path: ...

    @property
    def model_weights(self) -> Path: ...

    @property
    def model_config(self) -> Path: ...


@dataclass(frozen=True)
class ModelDir:
    """A directory holding a model."""

    root: Path

    @property
    def model_weights(self) -> Path:
        return self.root / WEIGHTS

    @property
    def model_config(self) -> Path:
        return self.root / RECORD


def write_model(out: ModelPaths, state: dict[str, torch.Tensor], config: ModelConfig, provenance: dict[str, Any]) -> None:
    """Write ``model.safetensors`` + ``model.json`` atomically (temp file, then rename or upload)."""
    tensors = {key: value.contiguous() for key, value in state.items()}
    with writable(out.model_weights) as tmp:
        save_tensors(tensors, tmp, metadata={"format": "pt"})
        digest = file_sha256(tmp)  # now, while the file is in the page cache
    identity = _file_identity(out.model_weights)
    weights = None if identity is None else {"sha256": digest, **identity}
    write_model_record(out.root, config, provenance, weights=weights)


def write_model_record(out_dir: Path, config: ModelConfig, provenance: dict[str, Any], weights: dict[str, Any] | None = None) -> None:
    """``model.json`` beside a ``model.safetensors`` (written by write_model or a streaming writer).

    ``weights`` (sha256, size, mtime of the weights file) lets consumers that
    record provenance, like merges, skip re-hashing the file."""
    record = {"config": config.to_dict(), "provenance": provenance}
    if weights is not None:
        record["weights"] = weights
    write_json(run_path(out_dir) / RECORD, record)  # one rename locally, one PUT on an object store


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _file_identity(path: Path) -> dict[str, int] | None:
    """Size and mtime of a local file; None for objects in a store (their copy is hashed instead)."""
    if is_remote(path):
        return None
    stat = Path(path).stat()
    return {"bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def weights_sha256(model_dir: Path) -> str:
    """sha256 of ``model_dir/model.safetensors``: the digest recorded when it was
    written if the file is unchanged since (same size and mtime), else computed."""
    model_dir = run_path(model_dir)
    path = model_dir / WEIGHTS
    identity = _file_identity(path)
    record = read_json(model_dir / RECORD)
    recorded = record.get("weights") if isinstance(record, dict) else None
    if identity and isinstance(recorded, dict) and all(recorded.get(k) == v for k, v in identity.items()) and isinstance(recorded.get("sha256"), str):
        return recorded["sha256"]
    return file_sha256(local_copy(path))


def read_model_config(model_dir: Path) -> ModelConfig:
    path = run_path(model_dir) / RECORD
    record = read_json(path)
    if record is None:
        raise FileNotFoundError(f"{model_dir}: no model.json (expected a stage output with model.safetensors + model.json)")
    return _config_of(record, path)


def _config_of(record: Any, path: Path) -> ModelConfig:
    """The model config in a ``model.json`` record; a damaged or foreign record is one clear error."""
    if not isinstance(record, dict) or "config" not in record:
        raise ValueError(f"{path}: not a model record (expected a JSON object with 'config')")
    try:
        return ModelConfig.from_dict(record["config"])
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{path}: invalid model config: {exc}") from None


def read_model(directory: ModelPaths) -> tuple[dict[str, torch.Tensor], ModelConfig]:
    record = read_json(directory.model_config)
    if record is None or not directory.model_weights.is_file():
        raise FileNotFoundError(f"{directory.root}: no model output (model.safetensors/model.json); did the stage finish?")
    config = _config_of(record, directory.model_config)
    return load_tensors(local_copy(directory.model_weights)), config
