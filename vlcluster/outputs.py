"""Stage outputs: model checkpoints other stages consume, results, done-marker."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from vlcluster.model.config import ModelConfig
from vlcluster.rundir import StageDir, read_json, write_json_atomic
from vlcluster.storage.paths import is_remote, local_copy, run_path, writable


def write_model(out: StageDir, state: dict[str, torch.Tensor], config: ModelConfig, provenance: dict[str, Any]) -> None:
    """Write ``model.safetensors`` + ``model.json`` atomically (temp file, then rename or upload)."""
    tensors = {key: value.contiguous() for key, value in state.items()}
    with writable(out.model_weights) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
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
    write_json_atomic(run_path(out_dir) / "model.json", record)


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
    path = model_dir / "model.safetensors"
    identity = _file_identity(path)
    recorded = (read_json(model_dir / "model.json") or {}).get("weights")
    if identity and recorded and all(recorded.get(k) == v for k, v in identity.items()):
        return recorded["sha256"]
    return file_sha256(local_copy(path))


def read_model_config(model_dir: Path) -> ModelConfig:
    record = read_json(run_path(model_dir) / "model.json")
    if record is None:
        raise FileNotFoundError(f"{model_dir}: no model.json (expected a stage output with model.safetensors + model.json)")
    return ModelConfig.from_dict(record["config"])


def read_model(stage: StageDir) -> tuple[dict[str, torch.Tensor], ModelConfig]:
    record = read_json(stage.model_config)
    if record is None or not stage.model_weights.is_file():
        raise FileNotFoundError(f"{stage.root}: no model output (model.safetensors/model.json); did the stage finish?")
    return load_file(str(local_copy(stage.model_weights))), ModelConfig.from_dict(record["config"])


def finish_stage(ctx, result: dict[str, Any]) -> None:
    """Record the result, then the done-marker (last, so 'done' implies all outputs exist)."""
    write_json_atomic(ctx.dir.result_file, {"stage": ctx.name, "kind": ctx.spec.kind, **result})
    ctx.dir.mark_done(ctx.spec_hash)


def read_result(stage: StageDir) -> dict | None:
    return read_json(stage.result_file)

