"""Resumable, atomic training checkpoints.

A checkpoint is a directory ``step_XXXXXXXX`` holding

- ``model.safetensors`` / ``optim.safetensors``: full (unsharded) state,
  gathered to rank 0 — safetensors, so loading never unpickles anything;
- ``rank_R.safetensors`` + ``rank_R.json``: per-rank RNG states and data
  position;
- ``meta.json``: step, spec hash, scheduler and optimizer hyper-parameters,
  and ``files``: the size and sha256 of every other file, each fsynced
  before ``meta.json`` is written.

On resume every file a rank reads is checked against ``files``; a
checkpoint that fails on any rank is skipped for the newest intact one
(and set aside as ``step_XXXXXXXX.damaged``), so a truncated or bit-flipped
file never stops a run nor resumes it with damaged weights.

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

import hashlib
import logging
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vlcluster.storage.paths import is_remote, fetched, local_side, publish, read_json, remove_tree, write_json
from vlcluster.train.checkpoint_index import (  # noqa: F401 - re-exported for callers
    Checkpoint,
    complete_checkpoints,
    discard_foreign,
    latest_checkpoint,
    prune,
    step_dir_name,
)
from vlcluster.storage.tensorfile import TensorFileError, load_tensors, save_tensors
from vlcluster.train.dist import DistEnv, barrier, gather_objects

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
    verify: bool = True,
) -> Path:
    """Collective: every rank calls it; ``model_state``/``optim_state`` are
    only read on rank 0 (the full state gathered there). ``verify=False``
    skips the digests (benchmark baseline only)."""
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
    save_tensors(rank_tensors, partial / rank_files[0])
    write_json(partial / rank_files[1], rank_info)
    main_files = ["model.safetensors", "optim.safetensors"]
    if env.is_main:
        save_tensors(model_state, partial / main_files[0])
        optim_tensors, param_groups = flatten_optimizer_state(optim_state)
        save_tensors(optim_tensors, partial / main_files[1])
    mine = rank_files + (main_files if env.is_main else [])
    records = {name: sealed(partial / name, verify) for name in mine}
    if remote:
        _upload(partial, final, mine)
    files = {name: record for ranks in gather_objects(records) for name, record in ranks.items()}  # a barrier too
    if env.is_main:
        commit = {**meta, "step": step, "param_groups": param_groups, "world_size": env.world_size}
        if verify:
            commit["files"] = files
        write_json(partial / "meta.json", commit)
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


def sealed(path: Path, digest: bool = True) -> dict[str, Any]:
    """Flush ``path`` to disk (a power loss must not commit a short file) and
    describe it for the commit marker: size and, with ``digest``, sha256."""
    sha = hashlib.sha256()
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())
        if digest:
            for chunk in iter(lambda: handle.read(1 << 22), b""):
                sha.update(chunk)
    record: dict[str, Any] = {"bytes": path.stat().st_size}
    if digest:
        record["sha256"] = sha.hexdigest()
    return record


def _upload(local: Path, remote: Path, names: list[str]) -> None:
    for name in names:
        publish(local / name, remote / name)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class DamagedCheckpoint(Exception):
    """A committed checkpoint whose files do not match its commit marker."""


@dataclass
class LoadedCheckpoint:
    step: int
    path: Path
    meta: dict
    model_state: dict[str, torch.Tensor]
    optim_state: dict
    rank_tensors: dict[str, torch.Tensor]
    rank_info: dict
    # Every saving rank's record, when the checkpoint was written by another number of ranks (else None).
    saved_rank_info: list[dict] | None = None

    @property
    def saved_world(self) -> int | None:
        return self.meta.get("world_size")


def _check_file(local: Path, name: str, expected: Any) -> None:
    if not isinstance(expected, dict):
        return  # a checkpoint written before digests were recorded
    size = local.stat().st_size
    if expected.get("bytes") != size:
        raise DamagedCheckpoint(f"{name}: {size} bytes, {expected.get('bytes')} recorded")
    if "sha256" in expected:
        sha = hashlib.sha256()
        with open(local, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 22), b""):
                sha.update(chunk)
        if sha.hexdigest() != expected["sha256"]:
            raise DamagedCheckpoint(f"{name}: sha256 mismatch")


def load_checkpoint(ckpt: Checkpoint, rank: int, world_size: int | None = None) -> LoadedCheckpoint:
    """Read one rank's view of ``ckpt``, every file checked against the
    commit marker (after download, for a remote run directory).

    Resuming on another number of ranks (``world_size``): rank ``r`` takes the
    RNG state of saving rank ``r mod saved``, and every saving rank's record
    is read (the data position is global; bad-data counts are summed)."""
    meta = ckpt.meta()
    saved_world = meta.get("world_size")
    resharded = world_size is not None and isinstance(saved_world, int) and saved_world > 0 and saved_world != world_size
    source_rank = rank % saved_world if resharded else rank
    files = meta.get("files") if isinstance(meta.get("files"), dict) else {}

    @contextmanager
    def checked(name: str) -> Iterator[Path]:
        path = ckpt.path / name
        if not path.is_file():
            if files or name.startswith("model") or name.startswith("optim"):
                raise DamagedCheckpoint(f"{name}: missing")
            raise RuntimeError(f"{ckpt.path} has no state for rank {rank}: it was written with a different number of ranks")
        with fetched(path) as local:  # safetensors and hashing read local files only
            _check_file(local, name, files.get(name) if files else None)
            yield local

    def tensors(name: str) -> dict[str, torch.Tensor]:
        with checked(name) as local:
            try:
                return load_tensors(local)
            except TensorFileError as exc:
                raise DamagedCheckpoint(f"{name}: {exc}") from None

    def record(name: str) -> dict:
        with checked(name) as local:
            value = read_json(local)
        if not isinstance(value, dict):
            raise DamagedCheckpoint(f"{name}: not a JSON object")
        return value

    if not isinstance(meta.get("param_groups"), list):
        raise DamagedCheckpoint("meta.json: no param_groups")
    return LoadedCheckpoint(
        step=ckpt.step,
        path=ckpt.path,
        meta=meta,
        model_state=tensors("model.safetensors"),
        optim_state=unflatten_optimizer_state(tensors("optim.safetensors"), meta["param_groups"]),
        rank_tensors=tensors(f"rank_{source_rank}.safetensors"),
        rank_info=record(f"rank_{source_rank}.json"),
        saved_rank_info=[record(f"rank_{saved}.json") for saved in range(saved_world)] if resharded else None,
    )


def load_intact_checkpoint(root: Path, spec_hash: str, env: DistEnv) -> LoadedCheckpoint | None:
    """Collective: the newest checkpoint of this spec that every rank reads
    intact, or None. Damaged ones are logged, set aside and skipped."""
    candidates = [c for c in reversed(complete_checkpoints(root)) if c.meta().get("spec_hash") == spec_hash]
    for index, ckpt in enumerate(candidates):
        try:
            loaded, problem = load_checkpoint(ckpt, env.rank, env.world_size), None
        except DamagedCheckpoint as exc:
            loaded, problem = None, str(exc)
        problems = list(dict.fromkeys(p for p in gather_objects(problem) if p))  # a shared file: once, not per rank
        if not problems:
            return loaded
        following = candidates[index + 1].path.name if index + 1 < len(candidates) else None
        if env.is_main:
            then = f"resuming from {following}" if following else "no intact checkpoint left; starting from the beginning"
            log.warning("%s is damaged (%s); %s", ckpt.path.name, "; ".join(problems), then)
            set_aside(ckpt)
        barrier()
    return None


def set_aside(ckpt: Checkpoint) -> None:
    """Take a damaged checkpoint out of every listing, keeping it for inspection
    where that is cheap (a rename locally; remotely only the commit marker goes)."""
    if is_remote(ckpt.path):
        remove_tree(ckpt.path / "meta.json")
        return
    target = ckpt.path.with_name(ckpt.path.name + ".damaged")
    shutil.rmtree(target, ignore_errors=True)
    os.replace(ckpt.path, target)
