"""`vlcluster.load_model(path)`: a trained model for a notebook.

:func:`locate_model` is how every command finds a model's weights, config
and key prefix. ``load_model`` reads a stage's output or a converted directory (``model.safetensors`` +
``model.json``) or a training checkpoint (``checkpoints/step_N``:
``model.safetensors`` + ``meta.json`` with the model config), local or
s3://, and returns the model in eval mode with ``encode_image``,
``encode_text``, ``fuse`` / ``fusion`` and the task heads its weights hold.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from vlcluster.storage.paths import local_copy, read_json, run_path
from vlcluster.storage.tensorfile import TensorFile, TensorFileError, load_tensors

from .config import ModelConfig
from .convert import load_into
from .formats.conversion import CheckpointError
from .heads import HEADS
from .multiway import MultiwayTransformer

OBJECTIVE_PREFIX = "model."  # a training checkpoint holds the objective's state; the model is under it
WHERE = "a stage output, a converted model, checkpoints/step_N or a model.safetensors in one of them"


@dataclass(frozen=True)
class ModelFile:
    """Where a model's weights are and how to read them: every command reads models through this."""

    weights: Path  # the safetensors file (local or object-store path)
    config: ModelConfig
    prefix: str  # the model's tensors are the file's keys under it, without it

    def open(self) -> TensorFile:
        return TensorFile(local_copy(self.weights), self.prefix)

    def tensors(self) -> dict[str, torch.Tensor]:
        try:
            return load_tensors(local_copy(self.weights), self.prefix)
        except TensorFileError as exc:
            raise CheckpointError(f"{self.weights}: {exc}") from None


def locate_model(path: str | Path) -> ModelFile:
    """A model directory (``model.safetensors`` + ``model.json``), a training
    checkpoint (``model.safetensors`` + ``meta.json``) or the weights file of either."""
    location = run_path(path)
    if location.name.endswith(".safetensors"):
        weights, location = location, location.parent
    else:
        weights = location / "model.safetensors"
    if not weights.is_file():
        raise CheckpointError(f"{path}: no model.safetensors (expected {WHERE})")
    config, from_checkpoint = _config(location, path)
    return ModelFile(weights, config, OBJECTIVE_PREFIX if from_checkpoint else "")


def load_model(path: str | Path, device: str | torch.device = "cpu") -> MultiwayTransformer:
    found = locate_model(path)
    state = found.tensors()
    heads = tuple(name for name in HEADS if any(key.startswith(f"heads.{name}.") for key in state))
    with torch.device("meta"):
        model = MultiwayTransformer(found.config, heads=heads)
    model.to_empty(device=device)
    try:
        load_into(model, state, allow_missing_prefixes=())
    except (ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{found.weights} does not fit its model config: {exc}") from None
    return model.eval()


def _config(location: Path, path: str | Path) -> tuple[ModelConfig, bool]:
    """From model.json (stage output, converted model) or meta.json (training
    checkpoint); the flag says which (a checkpoint's weights carry the objective's prefix).
    Apart from files.read_model_config (model.json only, a ValueError in stages): CheckpointError here, for the commands."""
    record = read_json(location / "model.json")
    config = record.get("config") if isinstance(record, dict) else None
    name = "model.json"
    if config is None:
        meta = read_json(location / "meta.json")
        config, name = (meta.get("model_config") if isinstance(meta, dict) else None), "meta.json"
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: no model.json beside it (nor a training checkpoint's meta.json with 'model_config'), "
                              "so the model's configuration (arch, size, layers) is unknown; pass the directory that vlcluster wrote")
    try:
        return ModelConfig.from_dict(config), name == "meta.json"
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{location / name}: invalid model config: {exc}") from None
