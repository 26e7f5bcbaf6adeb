"""Execution backends: where the stages of a pipeline run."""

from __future__ import annotations

import importlib

from vlcluster.backends.contract import Backend
from vlcluster.suggest import did_you_mean

# name -> "module:Class"; imported only when chosen, so the CLI does not pay
# for cluster client libraries it does not use.
BACKENDS: dict[str, str] = {
    "local": "vlcluster.backends.local:LocalBackend",
    "slurm": "vlcluster.backends.slurm.backend:SlurmBackend",
    "ray": "vlcluster.backends.ray.backend:RayBackend",
}


def get_backend(name: str, **options) -> Backend:
    target = BACKENDS.get(name)
    if target is None:
        raise ValueError(f"unknown backend {name!r}; available: {', '.join(BACKENDS)}{did_you_mean(name, BACKENDS)}")
    module, cls = target.split(":")
    return getattr(importlib.import_module(module), cls)(**options)
