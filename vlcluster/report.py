"""Paper-style tables from the ``result.json`` of eval stages."""

from __future__ import annotations

import logging

from vlcluster.context import StageContext
from vlcluster.outputs import finish_stage, read_result

log = logging.getLogger("vlcluster.report")

COLUMNS = (("VQA acc", "vqa_acc"), ("TR", "tr"), ("IR", "ir"))


def format_table(title: str, rows: dict[str, dict]) -> str:
    """A Markdown table, one row per model, one column per metric."""
    header = "| model | " + " | ".join(name for name, _ in COLUMNS) + " |"
    rule = "|---|" + "---:|" * len(COLUMNS)
    lines = [f"### {title}", "", header, rule]
    for label, result in rows.items():
        cells = [f"{result[key]:.2f}" if isinstance(result.get(key), (int, float)) else "–" for _, key in COLUMNS]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def collect(ctx: StageContext) -> dict[str, dict]:
    rows = {}
    for label, stage in ctx.spec.rows.items():
        result = read_result(ctx.upstream_dir(stage))
        if result is None:
            raise FileNotFoundError(f"stages.{ctx.name}.rows.{label}: stage {stage!r} has no result.json")
        rows[label] = result
    return rows


def run_report_stage(ctx: StageContext) -> None:
    rows = collect(ctx)
    table = format_table(ctx.spec.title, rows)
    (ctx.dir.root / "report.md").write_text(table + "\n")
    log.info("\n%s", table)
    finish_stage(ctx, {"rows": {label: {key: r.get(key) for _, key in COLUMNS} for label, r in rows.items()}, "table": table})
