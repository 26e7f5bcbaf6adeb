"""`vlcluster.load_model(path)`: a trained model for a notebook.

Reads a stage's output or a converted directory (``model.safetensors`` +
``model.json``) or a training checkpoint (``checkpoints/step_N``:
``model.safetensors`` + ``meta.json`` with the model config), local or
s3://, and returns the model in eval mode with ``encode_image``,
``encode_text``, ``fuse`` / ``fusion`` and the task heads its weights hold.
"""

from __future__ import annotations

from pathlib import Path

import torch

from vlcluster.storage.paths import local_copy, read_json, run_path
from vlcluster.storage.tensorfile import TensorFileError, load_tensors

from .config import ModelConfig
from .convert import load_into
from .formats.report import CheckpointError
from .heads import HEADS
from .multiway import MultiwayTransformer

OBJECTIVE_PREFIX = "model."  # a training checkpoint holds the objective's state; the model is under it


def load_model(path: str | Path, device: str | torch.device = "cpu") -> MultiwayTransformer:
    location = run_path(path)
    weights = location / "model.safetensors"
    if not weights.is_file():
        raise CheckpointError(f"{path}: no model.safetensors (expected a stage output, a converted model or checkpoints/step_N)")
    config = _config(location, path)
    try:
        state = load_tensors(local_copy(weights))
    except TensorFileError as exc:
        raise CheckpointError(f"{weights}: {exc}") from None
    if any(key.startswith(OBJECTIVE_PREFIX) for key in state):
        state = {key[len(OBJECTIVE_PREFIX):]: value for key, value in state.items() if key.startswith(OBJECTIVE_PREFIX)}
    heads = tuple(name for name in HEADS if any(key.startswith(f"heads.{name}.") for key in state))
    with torch.device("meta"):
        model = MultiwayTransformer(config, heads=heads)
    model.to_empty(device=device)
    try:
        load_into(model, state, allow_missing_prefixes=())
    except (ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{weights} does not fit its model config: {exc}") from None
    return model.eval()


def _config(location: Path, path: str | Path) -> ModelConfig:
    """From model.json (stage output, converted model) or meta.json (training checkpoint)."""
    record = read_json(location / "model.json")
    config = record.get("config") if isinstance(record, dict) else None
    name = "model.json"
    if config is None:
        meta = read_json(location / "meta.json")
        config, name = (meta.get("model_config") if isinstance(meta, dict) else None), "meta.json"
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: no model config (model.json 'config' or a checkpoint's meta.json 'model_config')")
    try:
        return ModelConfig.from_dict(config)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{location / name}: invalid model config: {exc}") from None
