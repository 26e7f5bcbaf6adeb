"""The paper's findings (a)-(d) and its footnote, each judged from the intervals.

A finding is *supported* when the 95 % interval of its measure lies on the
side the paper claims, *contradicted* when it lies on the other side, and
*inconclusive at 95 %* when it holds zero or there is no interval (one run
without per-item results), and *not measured* when the runs lack its arms. A measure is a difference computed within each
replicate (``views.contrast``) or a correlation over every replicate's point.
With one replicate the interval is a bootstrap over evaluation items: it
ignores run-to-run spread, and the verdict says so.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

from vlcluster.sizes import CUSTOM_PARTS
from vlcluster.study import views
from vlcluster.study.lineage import Arm
from vlcluster.study.stats import Correlation, Interval, pearson_interval

SUPPORTED, CONTRADICTED, INCONCLUSIVE = "supported", "contradicted", "inconclusive at 95%"
NOT_MEASURED = "not measured"  # the runs have none of the arms the finding compares
# The shared-weight architectures finding (c) compares the fully specific one with:
# those that keep some parts, not all, modality-specific (custom_attn, custom_ffn, custom_ln).
VARIANTS = tuple(arch for arch, custom in CUSTOM_PARTS.items() if custom and custom != CUSTOM_PARTS["specific"])
Measure = Interval | Correlation | None


@dataclass
class Verdict:
    finding: str  # "(a)" ... "(d)", "footnote"
    claim: str
    verdict: str
    decisive: dict[str, Measure]  # the measures the verdict is computed from
    context: dict[str, Measure] = field(default_factory=dict)  # numbers shown beside it, not judged

    @property
    def item_level_only(self) -> bool:
        return any(isinstance(m, Interval) and m.basis == "items (bootstrap)" for m in self.decisive.values())


def judge(measures: list[Measure], claimed_sign: int = 1) -> str:
    """Supported when every measure is on the claimed side of zero, contradicted when any is on the other."""
    present = [m for m in measures if m is not None]
    if not present:
        return NOT_MEASURED

    def side(m: Interval | Correlation) -> int:
        if isinstance(m, Correlation):
            if math.isnan(m.low):
                return 0
            return 1 if m.low > 0 and m.p_value < 0.05 else -1 if m.high < 0 and m.p_value < 0.05 else 0
        return 1 if m.above(0) else -1 if m.below(0) else 0

    sides = [side(m) * claimed_sign for m in present]
    if any(s < 0 for s in sides):
        return CONTRADICTED
    return SUPPORTED if len(present) == len(measures) and all(s > 0 for s in sides) else INCONCLUSIVE


class Findings:
    """Selects the arms each finding compares, at the reference K_seed (the one most merges share)."""

    def __init__(self, arms: list[Arm], drop_score: str):
        self.arms, self.score = arms, drop_score
        self.k_ref = views.reference_k_seed(arms) or self.common_k_seed()
        self.setting = self.primary_setting()

    def common_k_seed(self) -> int | None:
        """Without seeded merges: the K_seed most unmerged modality-specific arms share."""
        counts = Counter(a.k_seed for a in self.arms if a.arch == "specific" and a.merge is None and a.k_seed)
        return max(counts, key=lambda k: (counts[k], -k), default=None)

    def primary_setting(self) -> str | None:
        """The merge applied at every K_seed (Figure 3's), not a knob swept at one K_seed only."""
        by_setting: dict[str, set] = {}
        for arm in self.merged():
            by_setting.setdefault(arm.merge.describe(), set()).add(arm.k_seed)
        return max(by_setting, key=lambda s: (len(by_setting[s]), 0 in by_setting[s]), default=None)

    def unmerged(self, arch: str = "specific", k_seed: int | None = None) -> list[Arm]:
        k_seed = self.k_ref if k_seed is None else k_seed
        return [a for a in self.arms if a.merge is None and a.arch == arch and a.k_seed == k_seed]

    def merged(self, k_seed: int | None = None, setting: str | None = None, after_finetune: bool = False) -> list[Arm]:
        return [a for a in self.arms if a.merge is not None and a.arch == "specific" and a.merge.after_finetune == after_finetune
                and (k_seed is None or a.k_seed == k_seed) and (setting is None or a.merge.describe() == setting)]

    def knob(self, method: str, value: float) -> list[Arm]:
        return [a for a in self.merged(self.k_ref) if a.merge.method == method and a.merge.knob and a.merge.knob[1] == value]

    def difference(self, first: list[Arm], second: list[Arm]) -> Interval | None:
        return views.contrast([(1.0, first), (-1.0, second)], self.score) if first and second else None

    # ---- the findings ----------------------------------------------------------

    def verdicts(self) -> list[Verdict]:
        return [self.seeding(), self.interpolation(), self.architecture(), self.distances(), self.finetuned_merge()]

    def seeding(self) -> Verdict:
        k, s = self.k_ref, self.setting
        terms = [(1.0, self.unmerged(k_seed=0)), (-1.0, self.merged(0, s)), (-1.0, self.unmerged()), (1.0, self.merged(k, s))]
        drop_gap = views.contrast(terms, self.score) if all(arms for _, arms in terms) else None
        context = {f"merged, K_seed = {x}": views.cell(self.merged(x, s), self.score)
                   for x in sorted({a.k_seed for a in self.merged(setting=s)})}
        context[f"seeded merge (K_seed = {k}) − merging baseline"] = self.difference(self.merged(k, s), self.merged(0, s))
        claim = f"the merging baseline (K_seed = 0) drops more than seeded merging (K_seed = {k}), merge {s}"
        return Verdict("(a)", claim, judge([drop_gap]), {"drop at K_seed = 0 − drop at K_seed = " + str(k): drop_gap}, context)

    def interpolation(self) -> Verdict:
        decisive = {f"α = 0.5 − α = {end:g}": self.difference(self.knob("interpolation", 0.5), self.knob("interpolation", end))
                    for end in (1.0, 0.0)}
        context = {f"α = 0.75 − α = {end:g}": self.difference(self.knob("interpolation", 0.75), self.knob("interpolation", end))
                   for end in (1.0, 0.0)}
        gammas = sorted({a.merge.knob[1] for a in self.merged(self.k_ref) if a.merge.method == "regmean" and a.merge.knob})
        context |= {f"α = 0.5 − RegMean γ = {g:g}": self.difference(self.knob("interpolation", 0.5), self.knob("regmean", g))
                    for g in gammas}
        claim = f"interpolation at α = 0.5 beats α = 0 and α = 1 after merging (K_seed = {self.k_ref})"
        return Verdict("(b)", claim, judge(list(decisive.values())), decisive, context)

    def architecture(self) -> Verdict:
        msa = self.unmerged()
        variants = [arch for arch in VARIANTS if self.unmerged(arch)]
        decisive = {f"MSA − {arch}": self.difference(msa, self.unmerged(arch)) for arch in variants}
        maa = [a for a in self.arms if a.merge is None and a.arch == "agnostic"]
        context = {"MSA − MAA": self.difference(msa, maa)}
        claim = f"the fully modality-specific architecture is best before merging (K_seed = {self.k_ref})"
        return Verdict("(c)", claim, judge(list(decisive.values())), decisive or {"MSA − shared-weight variants": None}, context)

    def distances(self) -> Verdict:
        points = [p for p in views.drop_points(self.arms, self.score) if p.arm.merge.describe() == self.setting]
        found = views.correlations(points).get(self.setting, {})
        decisive = {"Pearson r (TSSD, drop)": found.get("tssd")}
        context: dict[str, Measure] = {f"Pearson r ({d}, drop)": found.get(d) for d in views.DISTANCES if d != "tssd"}
        for d in views.DISTANCES:
            pairs = [(p.arm.k_seed, p.distances[d]) for p in points if d in p.distances and p.arm.k_seed is not None]
            if len(pairs) >= 3:
                context[f"Pearson r (K_seed, {d})"] = pearson_interval(*zip(*pairs))
        claim = f"TSSD correlates positively with the merge drop (merge {self.setting}, every replicate a point)"
        return Verdict("(d)", claim, judge(list(decisive.values())), decisive, context)

    def finetuned_merge(self) -> Verdict:
        after = self.merged(self.k_ref, after_finetune=True)
        setting = after[0].merge.describe().replace(" (fine-tuned, then merged)", "") if after else self.setting
        gap = self.difference(self.merged(self.k_ref, setting), after)
        claim = f"merging first and fine-tuning after beats merging a fine-tuned model (K_seed = {self.k_ref})"
        return Verdict("footnote", claim, judge([gap]), {"merge, then fine-tune − fine-tune, then merge": gap})


def verdicts(arms: list[Arm], drop_score: str) -> list[Verdict]:
    return Findings(arms, drop_score).verdicts()


def describe(measure: Measure) -> str:
    return "no arms to compare" if measure is None else measure.describe()


def section(found: list[Verdict], drop_score: str) -> list[str]:
    """The report's verdict section: a table, then the numbers each verdict rests on."""
    lines = ["## The paper's findings: verdicts at 95 %", "",
             f"Computed from the intervals ({views.label(drop_score)}; differences within replicates): "
             "supported when the interval lies on the side the paper claims, contradicted when on the other, "
             "else inconclusive.", "",
             "| finding | claim | verdict |", "|---|---|---|"]
    for v in found:
        note = " (item bootstrap of one run: narrower than replicates)" if v.item_level_only and v.verdict in (SUPPORTED, CONTRADICTED) else ""
        lines.append(f"| {v.finding} | {v.claim} | **{v.verdict}**{note} |")
    lines.append("")
    for v in found:
        lines.append(f"**{v.finding}** rests on: " + "; ".join(f"{name} = {describe(m)}" for name, m in v.decisive.items()))
        if v.context:
            lines.append("Beside it: " + "; ".join(f"{name} = {describe(m)}" for name, m in v.context.items()))
        lines.append("")
    return lines
