"""The ``report`` stage: paper-style tables from the ``result.json`` of eval stages."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Literal

from pydantic import Field

from vlcluster.jobspec.models import StageBase, Strict
from vlcluster.jobspec.references import Reference
from vlcluster.metrics.correlation import DROP_SCORES
from vlcluster.stages.outputs import finish_stage, read_result
from vlcluster.study.views import label as score_label
from vlcluster.tasks.registry import HEADLINE_SCORES

if TYPE_CHECKING:
    from vlcluster.stages.context import StageContext

log = logging.getLogger("vlcluster.report")


class MergeabilityPoint(Strict):
    """One model for the metric/merge-drop correlation."""

    metrics: str = Field(description="metrics stage of the modality-specific model")
    merged: str = Field(description="eval stage of the merged (then fine-tuned) model")
    unmerged: str = Field(description="eval stage of the unmerged (fine-tuned) model")


class ReportStage(StageBase):
    kind: Literal["report"]
    rows: dict[str, str | list[str]] = Field(description="row label -> eval stage (or several, one per task, joined in one row)")
    title: str = "Results"
    mergeability: dict[str, MergeabilityPoint] = Field(
        default_factory=dict, description="label -> point; adds Pearson r of each metric with the merge drop"
    )
    drop_score: Literal[tuple(DROP_SCORES)] = "retrieval"

    def references(self) -> list[Reference]:
        evals = frozenset({"eval"})
        refs = [Reference(f"rows.{label}", target, evals)
                for label, targets in self.rows.items() for target in ([targets] if isinstance(targets, str) else targets)]
        for label, point in self.mergeability.items():
            refs += [Reference(f"mergeability.{label}.{role}", getattr(point, role), frozenset({"metrics"} if role == "metrics" else evals))
                     for role in ("metrics", "merged", "unmerged")]
        return refs

# TR/IR are the paper's mean of R@1/5/10; R@1 alone is shown too, since the
# mean saturates first on easy retrieval sets.
COLUMNS = (("VQA acc", "vqa_acc"), ("TR", "tr"), ("TR R@1", "tr_r1"), ("IR", "ir"), ("IR R@1", "ir_r1"))
# Downstream-task columns, shown only when some row has them: every other task's
# headline scores (the task registry's), each followed by the details shown beside it.
DETAILS = {"top1": ("top5",)}
TASK_COLUMNS = tuple(
    (score_label(score), score)
    for headline in HEADLINE_SCORES if headline not in {key for _, key in COLUMNS}
    for score in (headline, *DETAILS.get(headline, ()))
)


def columns(rows: dict[str, dict]) -> tuple[tuple[str, str], ...]:
    return COLUMNS + tuple(c for c in TASK_COLUMNS if any(isinstance(r.get(c[1]), (int, float)) for r in rows.values()))


def format_table(title: str, rows: dict[str, dict]) -> str:
    """A Markdown table, one row per model, one column per metric."""
    shown = columns(rows)
    header = "| model | " + " | ".join(name for name, _ in shown) + " |"
    rule = "|---|" + "---:|" * len(shown)
    lines = [f"### {title}", "", header, rule]
    for label, result in rows.items():
        cells = [f"{result[key]:.2f}" if isinstance(result.get(key), (int, float)) else "–" for _, key in shown]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def collect(ctx: StageContext) -> dict[str, dict]:
    """One result per row; a row of several eval stages (one per task) joins their metrics."""
    rows = {}
    for label, stages in ctx.spec.rows.items():
        rows[label] = {}
        for stage in [stages] if isinstance(stages, str) else stages:
            rows[label] |= stage_result(ctx, f"rows.{label}", stage)
    return rows


def stage_result(ctx: StageContext, field: str, stage: str) -> dict:
    result = read_result(ctx.upstream_dir(stage))
    if result is None:
        raise FileNotFoundError(f"stages.{ctx.name}.{field}: stage {stage!r} has no result.json")
    return result


def mergeability(ctx: StageContext) -> tuple[str, dict[str, float]] | None:
    """Pearson r between each metric and the merge drop over the spec's points."""
    from vlcluster.metrics.correlation import correlation_table, point

    if not ctx.spec.mergeability:
        return None
    points = {
        label: point(*(stage_result(ctx, f"mergeability.{label}.{role}", getattr(spec, role)) for role in ("metrics", "merged", "unmerged")), ctx.spec.drop_score)
        for label, spec in ctx.spec.mergeability.items()
    }
    return correlation_table(points, ctx.spec.drop_score)


def run(ctx: StageContext) -> None:
    from vlcluster.study import write_study_report

    rows = collect(ctx)
    table = format_table(ctx.spec.title, rows)
    correlation = mergeability(ctx)
    if correlation:
        table += "\n\n" + correlation[0]
    study = write_study_report([ctx.run_dir], ctx.dir.root / "study", ctx.spec.drop_score, f"{ctx.spec.title}: the whole run")
    table += f"\n\nThe paper's tables and figures over every finished eval stage of this run: study/report.md ({len(study.figures)} figures)."
    (ctx.dir.root / "report.md").write_text(table + "\n")
    log.info("\n%s", table)
    result = {"rows": {label: {key: r.get(key) for _, key in columns(rows)} for label, r in rows.items()}, "table": table}
    if correlation:
        result["pearson"] = correlation[1]
    finish_stage(ctx, result)
