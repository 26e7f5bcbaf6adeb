"""Which output tensor comes from which input tensors.

Every ``layers.{i}.{part}.{v,l,vl}.…`` group becomes one
``layers.{i}.{part}.shared.…`` tensor; a part that is already shared (the
shared-weight variants) and everything outside ``layers`` (embeddings, final
norm, heads) is copied unchanged. The plan only needs key names, so the
in-memory and the streaming executor share it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from vlcluster.merge.methods import GroupInfo
from vlcluster.model import SHARED, parse_layer_key


@dataclass(frozen=True)
class CopyTensor:
    key: str
    source_key: str


@dataclass(frozen=True)
class MergeTensor:
    key: str
    info: GroupInfo
    experts: dict[str, str]  # expert -> source key


PlanStep = CopyTensor | MergeTensor


def _collect_groups(keys: Iterable[str]) -> tuple[dict[str, GroupInfo | None], dict[GroupInfo, dict[str, str]]]:
    """Source key -> its group (None outside layers), and group -> expert keys."""
    owner: dict[str, GroupInfo | None] = {}
    groups: dict[GroupInfo, dict[str, str]] = {}
    for key in keys:
        parsed = parse_layer_key(key)
        if parsed is None:
            owner[key] = None
            continue
        layer, part, expert, rest = parsed
        info = GroupInfo(layer, part, rest)
        owner[key] = info
        groups.setdefault(info, {})[expert] = key
    return owner, groups


def _step_for(info: GroupInfo, experts: dict[str, str]) -> PlanStep:
    target = info.key(SHARED)
    if set(experts) == {SHARED}:
        return CopyTensor(target, experts[SHARED])  # already shared in this arch: nothing to merge
    if SHARED in experts or not {"v", "l"} <= set(experts):
        raise ValueError(f"{info.key('*')}: cannot merge experts {sorted(experts)}")
    return MergeTensor(target, info, experts)


def plan_merge(keys: Iterable[str]) -> list[PlanStep]:
    """One step per output tensor, in the order the source first names them."""
    owner, groups = _collect_groups(keys)
    steps: list[PlanStep] = []
    seen: set[GroupInfo] = set()
    for key, info in owner.items():
        if info is None:
            steps.append(CopyTensor(key, key))
        elif info not in seen:
            seen.add(info)
            steps.append(_step_for(info, groups[info]))
    return steps

