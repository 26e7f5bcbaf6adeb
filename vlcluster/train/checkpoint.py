"""Resumable, atomic training checkpoints.

A checkpoint is a directory ``step_XXXXXXXX`` holding

- ``model.safetensors`` / ``optim.safetensors``: full (unsharded) state,
  gathered to rank 0 — safetensors, so loading never unpickles anything;
- ``rank_R.safetensors`` + ``rank_R.json``: per-rank RNG states and data
  position;
- ``meta.json``: step, spec hash, scheduler and optimizer hyper-parameters.

Ranks write into ``step_XXXXXXXX.partial`` and rank 0 renames it once every
file is on disk. A crash at any point leaves either the new complete
checkpoint or only the previous ones: ``.partial`` directories are never read.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from vlcluster.rundir import write_json_atomic
from vlcluster.train.checkpoint_index import (  # noqa: F401 - re-exported for callers
    Checkpoint,
    complete_checkpoints,
    discard_foreign,
    latest_checkpoint,
    prune,
    step_dir_name,
)
from vlcluster.train.dist import DistEnv, barrier

log = logging.getLogger(__name__)

def flatten_optimizer_state(state: dict) -> tuple[dict[str, torch.Tensor], list[dict]]:
    tensors = {}
    for fqn, values in state["state"].items():
        for key, value in values.items():
            tensors[f"{fqn}/{key}"] = torch.as_tensor(value).contiguous()
    return tensors, state["param_groups"]


def unflatten_optimizer_state(tensors: dict[str, torch.Tensor], param_groups: list[dict]) -> dict:
    state: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        fqn, key = name.rsplit("/", 1)
        state.setdefault(fqn, {})[key] = tensor
    return {"state": state, "param_groups": param_groups}


def save_checkpoint(
    root: Path,
    step: int,
    env: DistEnv,
    model_state: dict[str, torch.Tensor],
    optim_state: dict,
    meta: dict[str, Any],
    rank_tensors: dict[str, torch.Tensor],
    rank_info: dict[str, Any],
    keep: int,
) -> Path:
    """Collective: every rank calls it; ``model_state``/``optim_state`` are
    only read on rank 0 (the full state gathered there)."""
    final = root / step_dir_name(step)
    partial = root / f"{step_dir_name(step)}.partial"
    if env.is_main:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    barrier()
    save_file(rank_tensors, str(partial / f"rank_{env.rank}.safetensors"))
    write_json_atomic(partial / f"rank_{env.rank}.json", rank_info)
    if env.is_main:
        save_file(model_state, str(partial / "model.safetensors"))
        optim_tensors, param_groups = flatten_optimizer_state(optim_state)
        save_file(optim_tensors, str(partial / "optim.safetensors"))
        write_json_atomic(partial / "meta.json", {**meta, "step": step, "param_groups": param_groups})
    barrier()
    if env.is_main:
        _fsync_dir(partial)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(partial, final)
        _fsync_dir(root)
        prune(root, keep)
    barrier()
    return final


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass
class LoadedCheckpoint:
    step: int
    meta: dict
    model_state: dict[str, torch.Tensor]
    optim_state: dict
    rank_tensors: dict[str, torch.Tensor]
    rank_info: dict


def load_checkpoint(ckpt: Checkpoint, rank: int) -> LoadedCheckpoint:
    meta = ckpt.meta()
    rank_file = ckpt.path / f"rank_{rank}.safetensors"
    if not rank_file.is_file():
        raise RuntimeError(
            f"{ckpt.path} has no state for rank {rank}: it was written with a different number of ranks"
        )
    return LoadedCheckpoint(
        step=ckpt.step,
        meta=meta,
        model_state=load_file(str(ckpt.path / "model.safetensors")),
        optim_state=unflatten_optimizer_state(load_file(str(ckpt.path / "optim.safetensors")), meta["param_groups"]),
        rank_tensors=load_file(str(rank_file)),
        rank_info=json.loads((ckpt.path / f"rank_{rank}.json").read_text()),
    )
