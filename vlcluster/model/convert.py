"""Checkpoint conversion between archs, and strict-but-forgiving loading.

Conversion only ever *copies* weights (shared -> every expert, or expert ->
same expert). Going from experts to a shared weight loses information and is
the merge engine's job, so it is refused here.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence

from torch import Tensor, nn

from .config import PARTS, SHARED

_LAYER_KEY = re.compile(rf"^layers\.(\d+)\.({'|'.join(PARTS)})\.([^.]+)\.(.+)$")


def parse_layer_key(key: str) -> tuple[int, str, str, str] | None:
    """'layers.3.attn.vl.qkv.weight' -> (3, 'attn', 'vl', 'qkv.weight'); None for non-expert keys."""
    m = _LAYER_KEY.match(key)
    return None if m is None else (int(m[1]), m[2], m[3], m[4])


def layer_key(layer: int, part: str, expert: str, rest: str) -> str:
    return f"layers.{layer}.{part}.{expert}.{rest}"


def _experts_by_part(keys: Iterable[str]) -> dict[tuple[int, str], set[str]]:
    groups: dict[tuple[int, str], set[str]] = {}
    for key in keys:
        if (parsed := parse_layer_key(key)) is not None:
            groups.setdefault(parsed[:2], set()).add(parsed[2])
    return groups


_LAYER_SCALE = re.compile(r"^layers\.\d+\.gamma_(attn|ffn)$")


def expand_to_experts(source_state: Mapping[str, Tensor], target: nn.Module) -> dict[str, Tensor]:
    """Map a checkpoint of any arch onto `target`'s parameter names.

    Each target expert takes the source's same expert if present, else the
    source's shared weight. Non-layer keys are copied by name when present
    (missing ones are left for `load_into` to judge; extra ones are dropped).
    Tensors are cloned so experts never alias each other.
    """
    target_keys = list(target.state_dict().keys())
    src_groups, tgt_groups = _experts_by_part(source_state), _experts_by_part(target_keys)

    if extra := sorted(set(src_groups) - set(tgt_groups)):
        raise ValueError(f"source has layer parts the target lacks (depth mismatch?): {extra[:5]}")
    for (layer, part), tgt_experts in tgt_groups.items():
        src_experts = src_groups.get((layer, part), set())
        if tgt_experts == {SHARED} and src_experts - {SHARED}:
            raise ValueError(
                f"layers.{layer}.{part}: source has experts {sorted(src_experts)} but the target shares "
                "one weight; collapsing experts needs a merge, not a conversion"
            )

    _check_layer_scale_kept(source_state, set(target_keys))
    out: dict[str, Tensor] = {}
    for key in target_keys:
        parsed = parse_layer_key(key)
        if parsed is None:
            if key in source_state:
                out[key] = source_state[key].detach().clone()
            continue
        layer, part, expert, rest = parsed
        candidates = (key, layer_key(layer, part, SHARED, rest))
        src_key = next((k for k in candidates if k in source_state), None)
        if src_key is None:
            raise ValueError(f"no source weight for {key}: tried {list(candidates)}")
        out[key] = source_state[src_key].detach().clone()
    return out


def _check_layer_scale_kept(source_state: Mapping[str, Tensor], target_keys: set[str]) -> None:
    """Dropping a trained layer-scale gamma changes the function the weights compute (each
    residual branch would come out unscaled), so it is an error, not a silent extra key.
    Gammas of exactly 1 scale nothing and may go."""
    dropped = sorted(key for key in source_state if _LAYER_SCALE.match(key) and key not in target_keys
                     and not bool((source_state[key] == 1).all()))
    if dropped:
        raise ValueError(
            f"the source scales its residual branches (layer scale: {_preview(dropped)}) but the target model "
            "has no layer scale; give the target `model.layer_scale` (any value: the gammas are loaded) so it "
            "computes the same function")


def _has_prefix(key: str, prefixes: Sequence[str]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def _preview(keys: Iterable[str], n: int = 5) -> str:
    keys = sorted(keys)
    more = f" ... (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def load_into(
    model: nn.Module, state: Mapping[str, Tensor], allow_missing_prefixes: Sequence[str] = ("heads.vqa",)
) -> None:
    """Strict load, except keys under `allow_missing_prefixes` may be absent (fresh task heads)."""
    expected = set(model.state_dict().keys())
    missing = {k for k in expected - set(state) if not _has_prefix(k, allow_missing_prefixes)}
    unexpected = set(state) - expected
    errors = []
    if missing:
        errors.append(f"{len(missing)} missing keys: {_preview(missing)}")
    if unexpected:
        errors.append(f"{len(unexpected)} unexpected keys: {_preview(unexpected)}")
    if errors:
        raise ValueError("cannot load state: " + "; ".join(errors))
    model.load_state_dict(state, strict=False)  # still raises on shape mismatches
