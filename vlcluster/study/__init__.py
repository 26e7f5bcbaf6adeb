"""A study report over one or more run directories: the paper's tables and
figures from every ``result.json`` (``vlcluster report RUN_DIR... -o OUT`` and
the ``report`` stage)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from vlcluster.study import figures, tables, verdicts, views
from vlcluster.study.lineage import Arm, LineageError, collect_arms

__all__ = ["LineageError", "StudyReport", "write_study_report"]


@dataclass
class StudyReport:
    markdown: str
    summary: str
    figures: list[Path] = field(default_factory=list)
    pearson: dict[str, dict[str, float]] = field(default_factory=dict)
    verdicts: list[verdicts.Verdict] = field(default_factory=list)


def write_study_report(run_dirs: list, out: Path, drop_score: str = "retrieval", title: str = "Study report") -> StudyReport:
    """Write ``report.md`` and the PNG figures into ``out`` (a local or s3 path)."""
    arms = collect_arms(run_dirs)
    out.mkdir(parents=True, exist_ok=True)
    report = StudyReport(markdown="", summary="")
    sections = [f"# {title}", "", "Runs: " + ", ".join(f"`{run}`" for run in run_dirs), ""]
    if not arms:
        sections.append("No finished eval stage in these runs yet: nothing to report.")
    else:
        report.verdicts = verdicts.verdicts(arms, drop_score)
        sections += verdicts.section(report.verdicts, drop_score)
        sections += _table1(arms) + _series_sections(arms, out, report) + _drops(arms, drop_score, out, report)
    report.markdown = "\n".join(sections) + "\n"
    (out / "report.md").write_text(report.markdown)
    report.summary = _summary(arms, report, out)
    return report


def _table1(arms: list[Arm]) -> list[str]:
    return ["## Table 1: every evaluated model", "",
            "Roles follow the paper: MAA (modality-agnostic from scratch), MSA (modality-specific, not merged), "
            "merging baseline (merged with K_seed = 0), merged. Replicates (the same setting with other seeds) "
            "share a row.", "", tables.INTERVAL_NOTE, "", tables.arms_table(arms), ""]


def _figure(report: StudyReport, path: Path) -> str:
    report.figures.append(path)
    return f"![{path.stem}]({path.name})"


def _series_sections(arms: list[Arm], out: Path, report: StudyReport) -> list[str]:
    lines: list[str] = []
    for heading, empty, view, draw, title, filename in SERIES_SECTIONS:
        panels = [view(arms, name) for name in views.plotted_scores(arms)]
        lines += _series_section(heading, empty, panels, draw, title, out / filename, report)
    return lines


def _series_section(heading: str, empty: str, panels: list[views.Series], draw, title: str, path: Path, report: StudyReport) -> list[str]:
    """A view per plotted score: its table, then one figure of all of them (nothing drawn without data)."""
    lines = [heading, ""]
    if not any(points for series in panels for points in series.lines.values()):
        return lines + [empty, ""]
    for series in panels:
        lines += [f"**{series.title}**", "", tables.series_table(series), ""]
    return lines + [_figure(report, draw(panels, title, path)), ""]


# The paper's per-score views: heading, what an empty view says, the view, how it is drawn, figure title and file.
SERIES_SECTIONS = (
    ("## Table 2: merging methods and their knobs",
     "No merged modality-specific models with a method knob (α, λ, γ) in these runs.",
     views.by_knob, figures.line_figure, "Merge knob sweeps (Table 2)", "merge_knobs.png"),
    ("## Figure 3: seed pre-training length (K_seed) before and after merging",
     "No modality-specific models with a known K_seed in these runs.",
     views.by_k_seed, figures.line_figure, "Merging against K_seed (Figure 3)", "k_seed.png"),
    ("## Figure 4: architectures before and after merging",
     "Fewer than two modality-specific architectures (fully specific, shared-weight variants) at a common K_seed "
     "in these runs: nothing to compare.",
     views.by_arch, figures.bar_figure, "Architectures before and after merging (Figure 4)", "architectures.png"),
)


def _drops(arms: list[Arm], drop_score: str, out: Path, report: StudyReport) -> list[str]:
    points = views.drop_points(arms, drop_score)
    lines = ["## Table 5: mergeability metrics against the merge drop", ""]
    if not points:
        return lines + ["No merged model with both a metrics stage on its source and an unmerged twin in these runs.", ""]
    found = views.correlations(points)
    report.pearson = {setting: {d: c.r for d, c in r.items()} for setting, r in found.items()}
    lines += [f"Drop = unmerged minus merged {views.label(drop_score)}; every replicate is a point. Pearson r per merge "
              "setting with its 95 % Fisher-z interval (4 points or more) and a two-sided permutation p-value.", "",
              tables.drop_table(points, found, drop_score), ""]
    path = figures.drop_figure(points, report.pearson, drop_score, out / "mergeability.png")
    return lines + [_figure(report, path), ""]


def _summary(arms: list[Arm], report: StudyReport, out: Path) -> str:
    lines = [tables.arms_table(arms) if arms else "no finished eval stages"]
    defined = {setting: r for setting, r in report.pearson.items() if not all(math.isnan(v) for v in r.values())}
    for setting, r in defined.items():
        lines.append(f"Pearson r with the merge drop ({setting}): " + ", ".join(f"{d} {v:.3f}" for d, v in r.items()))
    if len(defined) < len(report.pearson):  # one point (e.g. a knob swept at one K_seed) has no r
        lines.append(f"Pearson r undefined for {len(report.pearson) - len(defined)} merge setting(s) with fewer than three points")
    lines += [f"finding {v.finding}: {v.verdict}" for v in report.verdicts]
    lines.append(f"wrote {out / 'report.md'}" + "".join(f", {path.name}" for path in report.figures))
    return "\n".join(lines)
