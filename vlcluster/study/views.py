"""The paper's views of a set of arms, as plain data (tables and figures draw them).

Each view selects arms by what they are (architecture, K_seed, merge setting),
never by stage names, and leaves a gap where an arm is missing. A cell holds
every replicate of its setting, summarised as an ``Interval`` (``cell``).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

from vlcluster.metrics import METRICS
from vlcluster.metrics.correlation import DROP_SCORES
from vlcluster.study import stats
from vlcluster.study.lineage import Arm
from vlcluster.study.stats import Interval
from vlcluster.tasks.registry import HEADLINE_SCORES

# Scores drawn in the figures, in this order, when present: each task's headline scores.
PRIMARY = HEADLINE_SCORES
LABELS = {
    "vqa_acc": "VQA acc", "tr": "TR (mean R@1/5/10)", "ir": "IR (mean R@1/5/10)", "tr_r1": "TR R@1",
    "ir_r1": "IR R@1", "nlvr2_acc": "NLVR2 acc", "top1": "top-1", "top5": "top-5", "miou": "mIoU",
    "retrieval": "retrieval (mean of TR and IR)",
    **{f"{side}_r{k}": f"{side.upper()} R@{k}" for side in ("tr", "ir") for k in (5, 10)},
}
DISTANCES = METRICS
ROLE_ORDER = ("MAA", "MSA", "merging baseline", "merged")
_DETAIL = re.compile(r"_r\d+$|^top5$")


def label(score: str) -> str:
    return LABELS.get(score, score)


def score_names(arms: list[Arm]) -> list[str]:
    """Scores shown in tables: the primary ones first, then the others (R@k details last)."""
    present = {name for arm in arms for name in arm.scores}
    primary = [name for name in PRIMARY if name in present]
    if {"tr", "ir"} <= present:  # the paper's COCO score and the drop the verdicts judge, beside its parts
        primary.insert(primary.index("ir") + 1, "retrieval")
        present.discard("rsum_mean")  # the same number under the task eval's name
    rest = sorted(present - set(primary), key=detail_order)
    return primary + rest


def detail_order(name: str) -> tuple:
    """Other scores by name, then the R@k details by side and k (R@1, R@5, R@10)."""
    if not _DETAIL.search(name):
        return (False, name, 0)
    prefix, k = re.fullmatch(r"(.*?)(?:_r)?(\d+)", name).groups()
    return (True, prefix, int(k))


def plotted_scores(arms: list[Arm]) -> list[str]:
    present = {name for arm in arms for name in arm.scores}
    primary = [name for name in PRIMARY if name in present]
    return primary or sorted(name for name in present if not _DETAIL.search(name))


def score(arm: Arm, name: str) -> float | None:
    """A score of an arm; a combined one (``retrieval``: the mean of TR and IR) as ``metrics.correlation`` defines it."""
    values = [arm.scores.get(part) for part in DROP_SCORES.get(name, (name,))]
    return None if None in values else sum(values) / len(values)


def replicate_values(arms: list[Arm], name: str) -> dict[tuple, Arm]:
    """One arm per replicate that has the score (the first, when a replicate was evaluated twice)."""
    chosen: dict[tuple, Arm] = {}
    for arm in arms:
        if score(arm, name) is not None:
            chosen.setdefault(arm.replicate, arm)
    return chosen


def cell(arms: list[Arm], name: str) -> Interval | None:
    """A score over the replicates of one setting: t interval over replicates; with one
    replicate, a bootstrap over its evaluation items when it recorded them (the narrower
    interval, labelled so); else the bare value. None when no arm has the score."""
    chosen = list(replicate_values(arms, name).values())
    if not chosen:
        return None
    if len(chosen) > 1:
        return stats.mean_interval([score(arm, name) for arm in chosen])
    items = chosen[0].items.get(name)
    if items:
        interval = stats.bootstrap_interval([items])
        return Interval(score(chosen[0], name), interval.low, interval.high, interval.n, interval.basis)
    return stats.single(score(chosen[0], name))


def contrast(terms: list[tuple[float, list[Arm]]], name: str) -> Interval | None:
    """Σ weight · score, computed within each replicate (arms paired by their seeds), then its
    interval over replicates; with one replicate, a bootstrap over the items the arms share.
    Pairs are looked for within one run first, then across runs by seeds alone (one run per
    K_seed). None when no replicate has every term."""
    for key in (lambda arm: arm.pairing, lambda arm: arm.pairing[1:]):
        per_term = [{key(arm): arm for arm in replicate_values(arms, name).values()} for _, arms in terms]
        shared = [rep for rep in per_term[0] if all(rep in values for values in per_term[1:])]
        if shared:
            break
    else:
        return None
    weights = [weight for weight, _ in terms]
    per_replicate = [sum(w * score(values[rep], name) for w, values in zip(weights, per_term)) for rep in shared]
    if len(shared) > 1:
        return stats.mean_interval(per_replicate, basis="paired replicates")
    columns = [values[shared[0]].items.get(name) for values in per_term]
    if all(columns) and len({len(column) for column in columns}) == 1:
        interval = stats.bootstrap_interval(columns, lambda *cols: sum(w * c.mean(axis=-1) for w, c in zip(weights, cols)))
        return Interval(per_replicate[0], interval.low, interval.high, interval.n, interval.basis)
    return stats.single(per_replicate[0])


def settings(arms: list[Arm]) -> dict[tuple, list[Arm]]:
    """Arms grouped by setting (replicates of one another), in Table 1 order."""
    groups: dict[tuple, list[Arm]] = {}
    for arm in table1_order(arms):
        groups.setdefault(arm.setting, []).append(arm)
    return groups


def replicate_kind(arms: list[Arm]) -> str:
    """How the replicates of one setting differ: whole chains, or fine-tune seeds of one pre-trained model."""
    runs = {(arm.run, arm.pretrain_seeds) for arm in arms}
    finetunes = {arm.finetune_seeds for arm in arms}
    if len(runs) == 1 and len(finetunes) > 1:
        return "fine-tune seeds only"
    return "whole chain" if len(runs) > 1 else "one run"


def table1_order(arms: list[Arm]) -> list[Arm]:
    def key(arm: Arm):
        role = ROLE_ORDER.index(arm.role) if arm.role in ROLE_ORDER else len(ROLE_ORDER)
        return (role, arm.arch or "", arm.k_seed or 0, arm.merge.describe() if arm.merge else "", arm.run, arm.eval_stage)

    return sorted(arms, key=key)


def reference_k_seed(arms: list[Arm]) -> int | None:
    """The K_seed most merged arms share (the setting Table 2 and Figure 4 compare at)."""
    merged = [arm for arm in arms if arm.merge is not None and arm.k_seed]
    counts = Counter(arm.k_seed for arm in merged)
    if not counts:
        return None
    # Ties go to the split closest to K_seed = K_VL, the paper's best one.
    balance = {arm.k_seed: abs(arm.k_seed - (arm.k_vl or 0)) for arm in merged}
    return min(counts, key=lambda k: (-counts[k], balance[k], k))


def merge_settings(arms: list[Arm]) -> list[str]:
    counts = Counter(arm.merge.describe() for arm in arms if arm.merge is not None)
    return [setting for setting, _ in counts.most_common()]


@dataclass
class Series:
    """One line or bar group: label -> {x: Interval or None (a gap)}."""

    title: str
    x_label: str
    lines: dict[str, dict]


def by_k_seed(arms: list[Arm], name: str) -> Series:
    """Figure 3: a score against K_seed, before and after merging (modality-specific models)."""
    specific = [arm for arm in arms if arm.arch == "specific" and arm.k_seed is not None]
    xs = sorted({arm.k_seed for arm in specific})
    lines = {"before merging": _points(xs, [a for a in specific if a.merge is None], lambda a: a.k_seed, name)}
    for setting in merge_settings(specific):
        merged = [a for a in specific if a.merge is not None and a.merge.describe() == setting]
        if len({a.k_seed for a in merged}) > 1:  # a knob swept at one K_seed is Table 2's, not a line here
            lines[f"merged: {setting}"] = _points(xs, merged, lambda a: a.k_seed, name)
    return Series(f"{label(name)} vs K_seed", "K_seed (seed pre-training steps)", lines)


def by_knob(arms: list[Arm], name: str) -> Series:
    """Table 2: a score against each merge method's knob (α, λ, γ)."""
    k_ref = reference_k_seed(arms)
    merged = [a for a in arms if a.merge is not None and a.merge.knob and not a.merge.after_finetune
              and a.arch == "specific" and a.k_seed == k_ref]
    xs = sorted({a.merge.knob[1] for a in merged})
    lines = {}
    for method in sorted({a.merge.method for a in merged}):
        chosen = [a for a in merged if a.merge.method == method]
        knob = chosen[0].merge.knob[0]
        lines[f"{method} ({knob})"] = _points(xs, chosen, lambda a: a.merge.knob[1], name)
    return Series(f"{label(name)} vs merge knob (K_seed = {k_ref})", "α / λ / γ", lines)


def by_arch(arms: list[Arm], name: str) -> Series:
    """Figure 4: each architecture before and after merging, at the reference K_seed."""
    k_ref = reference_k_seed(arms)
    chosen = [a for a in arms if a.arch and a.arch != "agnostic" and a.k_seed == k_ref]
    archs = sorted({a.arch for a in chosen}, key=lambda arch: (arch != "specific", arch))
    if len(archs) < 2:  # one architecture compares with nothing: the figure would only repeat Table 2
        archs = []
    lines = {"before merging": _points(archs, [a for a in chosen if a.merge is None], lambda a: a.arch, name)}
    for setting in merge_settings(chosen):
        merged = [a for a in chosen if a.merge is not None and a.merge.describe() == setting]
        lines[f"merged: {setting}"] = _points(archs, merged, lambda a: a.arch, name)
    return Series(f"{label(name)} by architecture (K_seed = {k_ref})", "architecture", lines)


def _points(xs: list, arms: list[Arm], x_of, name: str) -> dict:
    """Every replicate at each x as one interval; None where there is none."""
    return {x: cell([arm for arm in arms if x_of(arm) == x], name) for x in xs}


@dataclass
class DropPoint:
    arm: Arm  # the merged arm
    drop: float  # unmerged score minus merged score
    distances: dict[str, float]
    twin: Arm | None = None  # the unmerged arm of the same replicate


def drop_points(arms: list[Arm], drop_score: str) -> list[DropPoint]:
    """Table 5: every merged arm with mergeability metrics and an unmerged twin
    (same run, same pre-trained model, same scores measured)."""
    points = []
    for merged in arms:
        if merged.merge is None or not merged.mergeability:
            continue
        twin = next((a for a in arms if a.merge is None and a.run == merged.run and a.pretrain_stage == merged.pretrain_stage
                     and score(a, drop_score) is not None), None)
        merged_score = score(merged, drop_score)
        if twin is None or merged_score is None:
            continue
        points.append(DropPoint(merged, score(twin, drop_score) - merged_score, merged.mergeability, twin))
    return points


def drop_groups(points: list[DropPoint], drop_score: str) -> dict[tuple[str, int | None], tuple[Interval, dict[str, Interval]]]:
    """Table 5 per merge setting and K_seed: the drop over replicates (paired within each) and each distance's interval."""
    grouped: dict[tuple[str, int | None], list[DropPoint]] = {}
    for point in points:
        grouped.setdefault((point.arm.merge.describe(), point.arm.k_seed), []).append(point)
    summary = {}
    for key, group in grouped.items():
        drop = contrast([(1.0, [p.twin for p in group]), (-1.0, [p.arm for p in group])], drop_score)
        distances = {d: stats.mean_interval([p.distances[d] for p in group]) for d in DISTANCES
                     if all(d in p.distances for p in group)}
        summary[key] = (drop, distances)
    return summary


def correlations(points: list[DropPoint]) -> dict[str, dict[str, stats.Correlation]]:
    """Pearson r of each distance with the drop per merge setting, every replicate a point, with
    its Fisher-z interval and permutation p (r is NaN with fewer than 3 points or a constant series)."""
    groups: dict[str, list[DropPoint]] = {}
    for point in points:
        groups.setdefault(point.arm.merge.describe(), []).append(point)
    return {
        setting: {d: stats.pearson_interval([p.distances.get(d, float("nan")) for p in group], [p.drop for p in group])
                  for d in DISTANCES}
        for setting, group in groups.items()
    }
