"""Where a stage spec names another stage, and which kinds it may name.

A reference is a field of a stage that reads another stage's output
(``init.from``, ``data.from``, a merge's ``source``, a report's ``rows`` ...).
Each kind declares its own: the ``references()`` of its spec model
(``vlcluster/stages/<kind>.py``; the shared pieces of ``jobspec/models.py``
declare theirs). The graph turns them into dependencies and checks the kinds
named; the sweeps follow them to copy what a swept field reaches.
"""

from __future__ import annotations

from dataclasses import dataclass

from vlcluster.stages.kinds import MODEL_KINDS


@dataclass(frozen=True)
class Reference:
    field: str  # e.g. "init.from", "rows.merged", "mergeability.k100.metrics"
    target: str
    kinds: frozenset[str]  # the kinds the target may be


def model_reference(field: str, target: str | None) -> list[Reference]:
    """A field naming a stage whose model is read (any kind that makes one); none when unset."""
    return [] if target is None else [Reference(field, target, MODEL_KINDS)]


def references(stage) -> list[Reference]:
    """Every reference of a stage spec, in the order of its fields."""
    return stage.references()
