"""Merging a model: in memory and from file to file.

``merge_state`` merges a state dict held in memory (tests, small models);
``merge_checkpoint`` (the ``merge`` stage, ``vlcluster merge``) streams from
and to safetensors (:mod:`vlcluster.merge.stream`) through the same
per-tensor code. The output is a checkpoint of the
``agnostic`` arch plus provenance (sources and their hashes, method,
hyper-parameters) in ``model.json``.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from vlcluster.merge.engine import MergeInputs, StateSource, merge_steps
from vlcluster.merge.methods import get_method
from vlcluster.merge.layout import plan_merge
from vlcluster.merge.stream import merge_files
from vlcluster.model.config import ModelConfig
from vlcluster.model.load import locate_model
from vlcluster.model.files import file_sha256, weights_sha256, write_model_record
from vlcluster.storage.paths import ensure_dir, local_copy, writable


def merge_state(
    state: dict[str, torch.Tensor], method: str, *, base: dict[str, torch.Tensor] | None = None,
    grams: dict[str, torch.Tensor] | None = None, **params: Any,
) -> dict[str, torch.Tensor]:
    inputs = MergeInputs(
        get_method(method), params,
        base=None if base is None else StateSource(base),
        grams=None if grams is None else StateSource(grams),
    )
    return dict(merge_steps(plan_merge(state), StateSource(state), inputs))


def merge_checkpoint(
    source: Path, out_dir: Path, method: str, params: dict[str, Any], base: Path | None = None,
    grams: Path | None = None, provenance: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Merge the model at ``source`` (any model location :func:`locate_model`
    reads: a stage or converted directory, a training checkpoint, or the
    weights file of one) into ``out_dir`` (weights + model.json); returns the provenance.

    Input digests come from the records written with the inputs; an input
    without one (or changed since) is hashed on a second thread while the merge
    runs (hashlib releases the GIL)."""
    models = {name: locate_model(path) for name, path in (("source", source), ("base", base)) if path}
    config: ModelConfig = models["source"].config
    files = {name: model.weights for name, model in models.items()}
    if grams:
        files["grams"] = grams if grams.name.endswith(".safetensors") else grams / "grams.safetensors"
    prefixes = {name: model.prefix for name, model in models.items()}
    local = {name: local_copy(path) for name, path in files.items()}  # the streaming merge reads local files
    ensure_dir(out_dir)
    with ThreadPoolExecutor(max_workers=1) as pool, writable(out_dir / "model.safetensors") as out_file:
        digests = pool.submit(lambda: {
            name: weights_sha256(path.parent) if path.name == "model.safetensors" and name != "grams" else file_sha256(local[name])
            for name, path in files.items()
        })
        count = merge_files(
            local["source"], out_file, get_method(method), params,
            base=local.get("base"), grams=local.get("grams"), metadata={"format": "pt"}, prefixes=prefixes,
        )
        hashes = digests.result()
    record = {
        **(provenance or {}),
        "method": method,
        "params": params,
        "inputs": {name: {"path": str(path), "sha256": hashes[name]} for name, path in files.items()},
        "source_arch": config.arch,
        "tensors": count,
    }
    write_model_record(out_dir, config.with_arch("agnostic"), record)
    return record
