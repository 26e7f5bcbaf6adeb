"""Stage outputs: model checkpoints other stages consume, results, done-marker."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from vlcluster.model.config import ModelConfig
from vlcluster.rundir import StageDir, read_json, write_json_atomic
from vlcluster.storage.paths import local_copy, run_path, writable


def write_model(out: StageDir, state: dict[str, torch.Tensor], config: ModelConfig, provenance: dict[str, Any]) -> None:
    """Write ``model.safetensors`` + ``model.json`` atomically (temp file, then rename or upload)."""
    tensors = {key: value.contiguous() for key, value in state.items()}
    with writable(out.model_weights) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    write_model_record(out.root, config, provenance)


def write_model_record(out_dir: Path, config: ModelConfig, provenance: dict[str, Any]) -> None:
    """``model.json`` beside a ``model.safetensors`` (written by write_model or a streaming writer)."""
    write_json_atomic(run_path(out_dir) / "model.json", {"config": config.to_dict(), "provenance": provenance})


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

