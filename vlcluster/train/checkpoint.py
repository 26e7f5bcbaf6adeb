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

On an object store (``s3://``, no rename) the ``.partial`` directory is a
local staging directory (:func:`vlcluster.storage.paths.local_side`); each
rank uploads its own files into ``step_XXXXXXXX/``, rank 0 uploads the full
state and then ``meta.json`` last, as the commit marker. An upload cut short
has no ``meta.json`` and is never read (and removed on the next start).
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from vlcluster.rundir import write_json_atomic
from vlcluster.storage.paths import is_remote, fetched, local_side, publish, read_json, remove_tree
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
    remote = is_remote(root)
    partial = local_side(root) / f"{step_dir_name(step)}.partial"
    if env.is_main:
        shutil.rmtree(partial, ignore_errors=True)
        if remote:  # uncommit a checkpoint of this step left by an earlier attempt before overwriting its files
            remove_tree(final / "meta.json")
    barrier()
    partial.mkdir(parents=True, exist_ok=True)  # per node when ranks span nodes and the root is remote
    rank_files = [f"rank_{env.rank}.safetensors", f"rank_{env.rank}.json"]
    save_file(rank_tensors, str(partial / rank_files[0]))
    write_json_atomic(partial / rank_files[1], rank_info)
    main_files = ["model.safetensors", "optim.safetensors"]
    if env.is_main:
        save_file(model_state, str(partial / main_files[0]))
        optim_tensors, param_groups = flatten_optimizer_state(optim_state)
        save_file(optim_tensors, str(partial / main_files[1]))
        write_json_atomic(partial / "meta.json", {**meta, "step": step, "param_groups": param_groups})
    if remote:
        _upload(partial, final, rank_files + (main_files if env.is_main else []))
    barrier()
    if env.is_main:
        if remote:
            _upload(partial, final, ["meta.json"])  # the commit marker, last
            shutil.rmtree(partial, ignore_errors=True)
        else:
            _fsync_dir(partial)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(partial, final)
            _fsync_dir(root)
        prune(root, keep)
    barrier()
    if remote and not env.is_main:
        shutil.rmtree(partial, ignore_errors=True)
    return final


def _upload(local: Path, remote: Path, names: list[str]) -> None:
    for name in names:
        publish(local / name, remote / name)


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

    def tensors(path: Path) -> dict[str, torch.Tensor]:
        with fetched(path) as local:  # safetensors reads local files only
            return load_file(str(local))

    return LoadedCheckpoint(
        step=ckpt.step,
        meta=meta,
        model_state=tensors(ckpt.path / "model.safetensors"),
        optim_state=unflatten_optimizer_state(tensors(ckpt.path / "optim.safetensors"), meta["param_groups"]),
        rank_tensors=tensors(rank_file),
        rank_info=read_json(ckpt.path / f"rank_{rank}.json"),
    )
