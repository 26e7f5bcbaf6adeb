"""The ``merge`` stage and the in-memory merge.

``merge_state`` merges a state dict held in memory (tests, small models);
the stage streams from and to safetensors (:mod:`vlcluster.merge.stream`)
through the same per-tensor code. The output is a checkpoint of the
``agnostic`` arch plus provenance (sources and their hashes, method,
hyper-parameters) in ``model.json``.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from vlcluster.stages.context import StageContext
from vlcluster.merge.engine import MergeInputs, StateSource, merge_steps
from vlcluster.merge.methods import get_method
from vlcluster.merge.layout import plan_merge
from vlcluster.merge.stream import merge_files
from vlcluster.model.config import ModelConfig
from vlcluster.model.load import locate_model
from vlcluster.model.files import file_sha256, weights_sha256, write_model_record
from vlcluster.stages.outputs import finish_stage
from vlcluster.storage.paths import ensure_dir, local_copy, writable

log = logging.getLogger("vlcluster.merge")


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


def run_merge_stage(ctx: StageContext) -> None:
    from vlcluster.metrics.gate import check_gate

    spec = ctx.spec
    source = ctx.upstream_dir(spec.source).root
    gate = check_gate(ctx, local_copy(source / "model.safetensors")) if spec.gate else None
    params = spec.method_values()
    record = merge_checkpoint(
        source, ctx.dir.root, spec.method, params,
        base=ctx.upstream_dir(spec.seed).root if spec.seed else None,
        grams=ctx.upstream_dir(spec.grams).root if spec.grams else None,
        provenance={"stage": ctx.name, "sources": {"source": spec.source, "seed": spec.seed, "grams": spec.grams}},
    )
    log.info("merged %s (%s) with %s %s -> agnostic", spec.source, record["source_arch"], spec.method, params)
    finish_stage(ctx, {"method": spec.method, "params": params, "source": spec.source, "tensors": record["tensors"], "gate": gate})
