"""`vlcluster report RUN_DIR... -o OUT`: the paper's tables and figures from
run directories. The run directories are made by the real spec loader and
graph (pipeline.json as a submit writes it); the eval and metrics results
are written by the test, so every number in the report can be checked."""

from __future__ import annotations

import json
import statistics
import textwrap
from pathlib import Path

import pytest

from vlcluster.cli import main
from vlcluster.stages.context import save_pipeline
from vlcluster.graph import build_graph
from vlcluster.jobspec.load import load_pipeline

# K_seed + K_VL = 8, with a merging baseline (K_seed = 0), two methods with
# knobs, a shared-weight architecture, metrics on every merged source.
STUDY = """
name: {name}
stages:
  data: {{kind: data, n_train: 64, n_val: 16, shard_size: 32}}
  seed: {{kind: pretrain, model: {{arch: agnostic}}, data: {{from: data}}, train: {{steps: {k_seed}, batch_size: 8}}}}
  vlpt: {{kind: pretrain, model: {{arch: specific}}, init: {{from: seed}}, data: {{from: data}}, train: {{steps: {k_vl}, batch_size: 8}}}}
  attn: {{kind: pretrain, model: {{arch: custom_attn}}, init: {{from: seed}}, data: {{from: data}}, train: {{steps: {k_vl}, batch_size: 8}}}}
  maa: {{kind: pretrain, model: {{arch: agnostic}}, data: {{from: data}}, train: {{steps: 8, batch_size: 8}}}}
  baseline: {{kind: pretrain, model: {{arch: specific}}, data: {{from: data}}, train: {{steps: 8, batch_size: 8}}}}
  metrics_vlpt: {{kind: metrics, source: vlpt}}
  metrics_baseline: {{kind: metrics, source: baseline}}
  interp: {{kind: merge, source: vlpt, method: interpolation, alpha: 0.5, sweep: {{alpha: [0.0, 0.5, 1.0]}}}}
  arith: {{kind: merge, source: vlpt, method: arithmetic, lam: 0.5, seed: seed, sweep: {{lam: [0.5, 1.0]}}}}
  merge_attn: {{kind: merge, source: attn, method: interpolation, alpha: 0.5}}
  merge_baseline: {{kind: merge, source: baseline, method: interpolation, alpha: 0.5}}
  eval_msa: {{kind: eval, source: vlpt, data: {{from: data}}, tasks: [retrieval]}}
  eval_attn: {{kind: eval, source: attn, data: {{from: data}}, tasks: [retrieval]}}
  eval_maa: {{kind: eval, source: maa, data: {{from: data}}, tasks: [retrieval]}}
  eval_baseline_unmerged: {{kind: eval, source: baseline, data: {{from: data}}, tasks: [retrieval]}}
  eval_interp: {{kind: eval, source: "interp[alpha=0.5]", data: {{from: data}}, tasks: [retrieval]}}
  eval_interp0: {{kind: eval, source: "interp[alpha=0.0]", data: {{from: data}}, tasks: [retrieval]}}
  eval_arith: {{kind: eval, source: "arith[lam=0.5]", data: {{from: data}}, tasks: [retrieval]}}
  eval_arith1: {{kind: eval, source: "arith[lam=1.0]", data: {{from: data}}, tasks: [retrieval]}}
  eval_merge_attn: {{kind: eval, source: merge_attn, data: {{from: data}}, tasks: [retrieval]}}
  eval_baseline: {{kind: eval, source: merge_baseline, data: {{from: data}}, tasks: [retrieval]}}
"""


def make_run(root: Path, name: str, k_seed: int, scores: dict[str, float], distances: dict[str, dict], study: str = STUDY) -> Path:
    job = root / f"{name}.yaml"
    job.write_text(textwrap.dedent(study.format(name=name, k_seed=k_seed, k_vl=8 - k_seed)))
    run_dir = root / name
    save_pipeline(run_dir, build_graph(load_pipeline(str(job), []), str(job)))
    for stage, score in scores.items():  # "eval_interp1" (alpha=1.0) is deliberately never finished
        result = {"tr": score, "ir": score - 10, "tr_r1": score / 2, "ir_r1": score / 3, "retrieval_pairs": 16}
        write(run_dir / stage / "result.json", result)
    for stage, overall in distances.items():
        write(run_dir / stage / "result.json", {"overall": overall, "per_layer": {}})
    return run_dir


def write(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload))


@pytest.fixture
def runs(tmp_path):
    runs = []
    for k_seed, msa, merged, l2 in ((2, 80.0, 70.0, 9.0), (4, 82.0, 78.0, 6.0), (6, 81.0, 80.0, 3.0)):
        scores = {"eval_msa": msa, "eval_interp": merged, "eval_interp0": merged - 12, "eval_arith": merged - 1, "eval_arith1": merged - 9,
                  "eval_attn": msa - 3, "eval_merge_attn": merged - 2, "eval_maa": 79.0,
                  "eval_baseline": 60.0, "eval_baseline_unmerged": 81.0}
        distances = {"metrics_vlpt": {"l2": l2, "cosine": l2 / 30, "ssd": 0.1, "tssd": l2 / 100},
                     "metrics_baseline": {"l2": 12.0, "cosine": 0.4, "ssd": 0.2, "tssd": 0.1}}
        runs.append(make_run(tmp_path, f"kseed{k_seed}", k_seed, scores, distances))
    return runs


def test_report_writes_the_papers_tables_and_figures(runs, tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["report", *map(str, runs), "-o", str(out)]) == 0
    report = (out / "report.md").read_text()
    for heading in ("Table 1", "Table 2", "Figure 3", "Figure 4", "Table 5"):
        assert f"## {heading}" in report
    # Roles and lineage come from the references, not from stage names.
    assert "| MAA | agnostic | – | 8 |" not in report  # MAA: K_seed is its own steps, no K_VL
    assert "| MAA | agnostic | 8 | – |" in report
    assert "| merging baseline | specific | 0 | 8 | interpolation alpha=0.5 |" in report
    assert "| MSA | specific | 4 | 4 | – | kseed4 / eval_msa |" in report
    assert "| merged | custom_attn | 4 | 4 | interpolation alpha=0.5 |" in report
    for name in ("merge_knobs", "k_seed", "architectures", "mergeability"):
        png = (out / f"{name}.png").read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert "wrote" in capsys.readouterr().out


def test_gaps_stay_gaps_and_pearson_matches_the_points(runs, tmp_path):
    out = tmp_path / "report"
    assert main(["report", *map(str, runs), "-o", str(out)]) == 0
    report = (out / "report.md").read_text()
    # Interpolation at alpha = 1.0 was merged but never evaluated, arithmetic at
    # lam = 1.0 was: the interpolation cell of that row is a gap, not a number.
    knob_rows = [line for line in report.splitlines() if line.startswith("| 1.00 |")]
    assert "| α / λ / γ | arithmetic (lam) | interpolation (alpha) |" in report
    assert knob_rows and all(row.split("|")[3].strip() == "–" for row in knob_rows)
    assert all(row.split("|")[2].strip() != "–" for row in knob_rows)
    # Table 5, interpolation alpha=0.5: points (L2, drop) over the three K_seed runs
    # plus the merging baseline (L2 12, drop 81 - 60 = 21, its retrieval means).
    l2 = [9.0, 6.0, 3.0, 12.0, 12.0, 12.0]
    drop = [10.0, 4.0, 1.0, 21.0, 21.0, 21.0]
    expected = statistics.correlation(l2, drop)
    pearson_row = next(line for line in report.splitlines() if line.startswith("| Pearson r (interpolation alpha=0.5)"))
    assert f"{expected:.2f}" in pearson_row


def test_report_of_a_run_without_results_says_so(runs, tmp_path):
    empty = make_run(tmp_path, "empty", 4, {}, {})
    out = tmp_path / "report"
    assert main(["report", str(empty), "-o", str(out)]) == 0
    assert "nothing to report" in (out / "report.md").read_text()
    assert not list(out.glob("*.png"))


def test_report_on_a_directory_that_is_not_a_run_is_one_clear_error(tmp_path, capsys):
    (tmp_path / "pipeline.json").write_text("[1, 2]")
    assert main(["report", str(tmp_path), "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "pipeline.json" in err and "Traceback" not in err


# ---- replicates, intervals and verdicts ------------------------------------------------

# Run-to-run noise of three replicates: both arms of a replicate share it (one pre-training
# run), and the custom-attention arm has noise of its own on top.
SHARED_NOISE = (0.0, 6.0, -5.0)
OWN_NOISE = (2.0, -2.0, 0.5)


def replicated_runs(root: Path, effect: float) -> list[Path]:
    """Three replicates at K_seed = 4 (one run each); MSA beats custom attention by ``effect``."""
    runs = []
    for rep, (shared, own) in enumerate(zip(SHARED_NOISE, OWN_NOISE)):
        msa = 80.0 + shared
        scores = {"eval_msa": msa, "eval_attn": msa - effect + own, "eval_interp": msa - 3, "eval_maa": 79.0 + own,
                  "eval_baseline": 60.0 + shared, "eval_baseline_unmerged": 81.0 + shared}
        runs.append(make_run(root, f"rep{rep}", 4, scores, {}))
    return runs


def verdict_of(report: str, finding: str) -> str:
    row = next(line for line in report.splitlines() if line.startswith(f"| {finding} |"))
    return row.split("|")[3].strip()


@pytest.mark.parametrize(("effect", "verdict"), [(0.5, "**inconclusive at 95%**"), (10.0, "**supported**"), (-10.0, "**contradicted**")])
def test_a_finding_flips_when_its_effect_outgrows_its_spread(tmp_path, effect, verdict):
    from vlcluster.study.stats import paired_interval

    out = tmp_path / "report"
    assert main(["report", *map(str, replicated_runs(tmp_path, effect)), "-o", str(out)]) == 0
    report = (out / "report.md").read_text()
    assert verdict_of(report, "(c)") == verdict
    # The numbers it rests on: MSA - custom attention within each replicate (retrieval = mean of TR and IR).
    msa = [80.0 + shared for shared in SHARED_NOISE]
    attn = [m - effect + own for m, own in zip(msa, OWN_NOISE)]
    interval = paired_interval(msa, attn)
    assert f"MSA − custom_attn = {interval.estimate:.2f} [{interval.low:.2f}, {interval.high:.2f}] (paired replicates, n = 3)" in report


def test_replicates_share_a_row_with_their_t_interval(tmp_path):
    from vlcluster.study.stats import mean_interval

    out = tmp_path / "report"
    assert main(["report", *map(str, replicated_runs(tmp_path, 10.0)), "-o", str(out)]) == 0
    report = (out / "report.md").read_text()
    row = next(line for line in report.splitlines() if line.startswith("| MSA | specific | 4 | 4 |"))
    tr = mean_interval([80.0 + shared for shared in SHARED_NOISE])
    assert "| 3 (whole chain) |" in row and f"{tr.estimate:.2f} ± {(tr.high - tr.low) / 2:.2f} |" in row
    # (a): drop at K_seed = 0 (81 - 60) minus drop at K_seed = 4 (3) in every replicate: the shared noise cancels.
    assert verdict_of(report, "(a)") == "**supported**"
    assert "drop at K_seed = 0 − drop at K_seed = 4 = 18.00 [18.00, 18.00] (paired replicates, n = 3)" in report


def test_one_run_with_per_item_results_gets_a_bootstrap_labelled_as_such(tmp_path):
    from vlcluster.study.stats import bootstrap_interval, mean_difference

    run = make_run(tmp_path, "single", 4, {"eval_baseline": 60.0, "eval_baseline_unmerged": 81.0}, {})
    # 64 images scored one by one (retrieval = mean of TR and IR per image); MSA is better on most.
    msa_items = [70.0 + (i % 7) * 3 for i in range(64)]
    attn_items = [value - 4 + (i % 5 - 2) * 2 for i, value in enumerate(msa_items)]  # 4 lower, give or take 4
    for stage, items in (("eval_msa", msa_items), ("eval_attn", attn_items)):
        mean = sum(items) / len(items)
        write(run / stage / "result.json", {"tr": mean + 5, "ir": mean - 5, "items": {"retrieval": items}})
    out = tmp_path / "report"
    assert main(["report", str(run), "-o", str(out)]) == 0
    report = (out / "report.md").read_text()
    assert verdict_of(report, "(c)") == "**supported** (item bootstrap of one run: narrower than replicates)"
    msa_row = next(line for line in report.splitlines() if line.startswith("| MSA | specific | 4 |"))
    alone = bootstrap_interval([msa_items])
    assert f"| {sum(msa_items) / 64:.2f} ± {(alone.high - alone.low) / 2:.2f} ᵇ |" in msa_row  # retrieval, marked
    assert "ᵇ marks a single run's bootstrap over evaluation items" in report
    expected = bootstrap_interval([msa_items, attn_items], mean_difference)
    assert f"MSA − custom_attn = {expected.estimate:.2f} [{expected.low:.2f}, {expected.high:.2f}] (items (bootstrap), n = 64)" in report


def test_one_k_seed_with_metrics_draws_table5_without_a_series(tmp_path):
    """A run at one K_seed (jobs/merge_methods.yaml): every merge setting has one distance, so
    Table 5's figure has no series to draw; the report is still written, figure included."""
    run = make_run(tmp_path, "one", 4, {"eval_msa": 80.0, "eval_interp": 75.0},
                   {"metrics_vlpt": {"l2": 6.0, "cosine": 0.2, "ssd": 0.1, "tssd": 0.06}})
    out = tmp_path / "report"
    assert main(["report", str(run), "-o", str(out)]) == 0
    assert (out / "mergeability.png").stat().st_size > 0


def test_recall_details_are_named_and_ordered_by_k():
    from vlcluster.study.lineage import Arm
    from vlcluster.study.views import label, score_names

    scores = {name: 1.0 for name in ("tr", "ir", "tr_r1", "tr_r5", "tr_r10", "ir_r1", "ir_r10", "ir_r5", "vqa_acc")}
    arm = Arm("run", "eval", scores, None, None, None, None, None)
    assert [label(name) for name in score_names([arm])] == [
        "VQA acc", "TR (mean R@1/5/10)", "IR (mean R@1/5/10)", "retrieval (mean of TR and IR)",
        "IR R@1", "IR R@5", "IR R@10", "TR R@1", "TR R@5", "TR R@10"]


def test_one_architecture_draws_no_architecture_figure(tmp_path):
    """Figure 4 compares architectures: with only the fully specific one there
    is nothing to compare, so it says so instead of drawing Table 2 again."""
    one = "\n".join(line for line in STUDY.splitlines() if "attn" not in line)
    run = make_run(tmp_path, "one", 4, {"eval_msa": 80.0, "eval_interp": 70.0}, {}, study=one)
    out = tmp_path / "report"
    assert main(["report", str(run), "-o", str(out)]) == 0
    report = (out / "report.md").read_text()
    assert "Fewer than two modality-specific architectures" in report and not (out / "architectures.png").exists()
    assert (out / "k_seed.png").exists()
