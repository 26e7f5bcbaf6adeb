"""Apply a merge method to a multiway checkpoint: every
``layers.{i}.{part}.{v,l,vl}.…`` group becomes ``layers.{i}.{part}.shared.…``.
Embeddings, the final norm and heads are copied unchanged; the result is a
checkpoint of the ``agnostic`` arch that the same model class loads.
"""

from __future__ import annotations

import hashlib
import logging
from collections import defaultdict
from typing import Any

import torch

from vlcluster.context import StageContext
from vlcluster.merge.methods import METHODS, GroupInfo
from vlcluster.model import SHARED, layer_key, parse_layer_key
from vlcluster.model.config import ModelConfig
from vlcluster.outputs import finish_stage, read_model, write_model

log = logging.getLogger("vlcluster.merge")


def group_experts(state: dict[str, torch.Tensor]) -> tuple[dict[GroupInfo, dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """Split a state dict into expert groups and the keys that pass through."""
    groups: dict[GroupInfo, dict[str, torch.Tensor]] = defaultdict(dict)
    passthrough: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        parsed = parse_layer_key(key)
        if parsed is None:
            passthrough[key] = tensor
            continue
        layer, part, expert, rest = parsed
        groups[GroupInfo(layer, part, rest)][expert] = tensor
    return groups, passthrough


def merge_state(state: dict[str, torch.Tensor], method: str, **params: Any) -> dict[str, torch.Tensor]:
    fn = METHODS.get(method)
    if fn is None:
        raise ValueError(f"unknown merge method {method!r}; known: {sorted(METHODS)}")
    groups, merged = group_experts(state)
    for info, experts in groups.items():
        target = layer_key(info.layer, info.part, SHARED, info.rest)
        if set(experts) == {SHARED}:
            merged[target] = experts[SHARED]  # already shared in this arch: nothing to merge
        elif SHARED in experts or not {"v", "l"} <= set(experts):
            raise ValueError(f"layers.{info.layer}.{info.part}.*.{info.rest}: cannot merge experts {sorted(experts)}")
        else:
            merged[target] = fn(experts, info, **params).to(experts["v"].dtype)
    return merged


def file_digest(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def run_merge_stage(ctx: StageContext) -> None:
    spec = ctx.spec
    source = ctx.upstream_dir(spec.source)
    state, config = read_model(source)
    params = {"alpha": spec.alpha}
    merged = merge_state(state, spec.method, **params)
    out_config: ModelConfig = config.with_arch("agnostic")
    provenance = {
        "stage": ctx.name,
        "method": spec.method,
        "params": params,
        "source": {"stage": spec.source, "arch": config.arch, "sha256": file_digest(source.model_weights)},
    }
    write_model(ctx.dir, merged, out_config, provenance)
    log.info("merged %s (%s) with %s %s -> agnostic", spec.source, config.arch, spec.method, params)
    finish_stage(ctx, {"method": spec.method, "params": params, "source": spec.source, "tensors": len(merged)})
