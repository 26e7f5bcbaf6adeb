"""Where a stage spec names another stage, and which kinds each such field may name.

A reference is a field of a stage that reads another stage's output
(``init.from``, ``data.from``, ``tokenizer.from``, ``source``, ``seed``,
``grams``, report ``rows``, ``mergeability``). The graph turns them into
dependencies; the sweeps follow them to copy what a swept field reaches.
"""

from __future__ import annotations

from dataclasses import dataclass

from vlcluster.stages.kinds import MODEL_KINDS

# Which kinds each reference field may point at.
REFERENCE_TARGETS: dict[str, frozenset[str]] = {
    "init.from": MODEL_KINDS,
    "data.from": frozenset({"data", "import"}),
    "tokenizer.from": frozenset({"data"}),
    "source": MODEL_KINDS,
    "seed": MODEL_KINDS,
    "grams": frozenset({"grams"}),
    "rows": frozenset({"eval"}),
    "metrics": frozenset({"metrics"}),
    "merged": frozenset({"eval"}),
    "unmerged": frozenset({"eval"}),
}


@dataclass(frozen=True)
class Reference:
    field: str  # e.g. "init.from", "rows.merged", "mergeability.k100.metrics"
    target: str

    @property
    def kind_rule(self) -> str:
        """The key of ``REFERENCE_TARGETS`` that says which kinds ``target`` may be."""
        if self.field.startswith("rows."):
            return "rows"
        return self.field.rsplit(".", 1)[1] if self.field.startswith("mergeability.") else self.field


def references(stage) -> list[Reference]:
    """Every reference of a stage spec, in the order of its fields."""
    refs: list[Reference] = []
    init = getattr(stage, "init", None)
    if init is not None and init.from_ is not None:
        refs.append(Reference("init.from", init.from_))
    data = getattr(stage, "data", None)
    if data is not None and data.from_ is not None:
        refs.append(Reference("data.from", data.from_))
    tokenizer = getattr(stage, "tokenizer", None)
    if tokenizer is not None and not isinstance(tokenizer, str):
        refs.append(Reference("tokenizer.from", tokenizer.from_))
    for field in ("source", "seed", "grams"):
        target = getattr(stage, field, None)
        if isinstance(target, str):
            refs.append(Reference(field, target))
    for label, targets in getattr(stage, "rows", {}).items():
        refs.extend(Reference(f"rows.{label}", target) for target in ([targets] if isinstance(targets, str) else targets))
    for label, point in getattr(stage, "mergeability", {}).items():
        refs.extend(Reference(f"mergeability.{label}.{role}", getattr(point, role)) for role in ("metrics", "merged", "unmerged"))
    return refs
