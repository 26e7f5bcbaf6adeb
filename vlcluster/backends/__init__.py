"""Execution backends: where the stages of a pipeline run."""

from __future__ import annotations

from vlcluster.backends.base import Backend


def get_backend(name: str) -> Backend:
    if name == "local":
        from vlcluster.backends.local import LocalBackend

        return LocalBackend()
    raise ValueError(f"unknown backend {name!r}; available: local")
