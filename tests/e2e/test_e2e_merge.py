"""End to end: jobs/merge_methods.yaml at its smallest, with VLMo's relative
position bias (the job's default positions are covered by the quickstart's
e2e tests) — grams under 2 gloo ranks, metrics, every merge method, retrieval
eval of every merged model, and the mergeability gate stopping a pipeline."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from tests.support import REPO
from tests.support.cli import cli, closing_line
from tests.support.jobs import GATED, assert_gated_status

pytestmark = pytest.mark.slow

JOB = str(REPO / "jobs" / "merge_methods.yaml")
METHOD_STAGES = ("interpolation", "part_alpha", "arithmetic", "regmean", "ties", "dare")
SMALL = [
    "stages.data.n_train=640", "stages.data.shard_size=160", "stages.data.n_val=40",
    *(f"stages.{stage}.train.{key}" for stage in ("seed", "vlpt") for key in ("batch_size=16", "warmup_steps=2", "log_every=2")),
    "stages.seed.train.steps=4", "stages.vlpt.train.steps=8",
    "stages.grams.batches=2", "stages.grams.batch_size=16",
    "stages.seed.model.position=relative", "stages.vlpt.model.position=relative",
]


def submit(run_dir, *overrides: str):
    args = ["submit", JOB, "--run-dir", str(run_dir)]
    for override in (*SMALL, *overrides):
        args += ["--set", override]
    return cli(*args)


@pytest.fixture(scope="module")
def merged_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("merge_methods")
    result = submit(run_dir)
    assert result.returncode == 0, result.stdout + result.stderr
    return run_dir, result


def test_every_method_merges_to_an_agnostic_checkpoint_that_evaluates(merged_run):
    run_dir, result = merged_run
    trained = load_file(str(run_dir / "vlpt" / "model.safetensors"))
    tables = sorted(key for key in trained if key.startswith("position_bias."))
    assert tables == ["position_bias.cross", "position_bias.image", "position_bias.text"]
    for stage in METHOD_STAGES:
        weights = load_file(str(run_dir / stage / "model.safetensors"))
        assert all(".shared." in key for key in weights if key.startswith("layers."))
        for key in tables:  # one table for every expert: every method keeps it as trained
            assert torch.equal(weights[key], trained[key]), (stage, key)
        record = json.loads((run_dir / stage / "model.json").read_text())
        assert record["config"]["arch"] == "agnostic" and record["config"]["position"] == "relative"
        assert len(record["provenance"]["inputs"]["source"]["sha256"]) == 64
        evaluated = json.loads((run_dir / f"eval_{stage}" / "result.json").read_text())
        assert evaluated["model"]["arch"] == "agnostic" and "tr" in evaluated
    assert "| RegMean g=.9 |" in result.stdout


def test_grams_ran_on_two_ranks_and_metrics_were_logged(merged_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, result = merged_run
    grams = json.loads((run_dir / "grams" / "result.json").read_text())
    assert grams["ranks"] == 2 and grams["grams"] == 36  # 4 linears x (2 experts x 3 layers + 3 experts x 1 layer)
    metrics = json.loads((run_dir / "metrics" / "result.json").read_text())
    assert set(metrics["layers"]) == {"0", "1", "2", "3"} and metrics["overall"]["l2"] > 0
    events = EventAccumulator(str(run_dir / "metrics" / "tb"))
    events.Reload()
    assert {"mergeability/tssd", "mergeability_per_layer/ssd"} <= set(events.Tags()["scalars"])
    assert [event.step for event in events.Scalars("mergeability_per_layer/ssd")] == [0, 1, 2, 3]


def test_gate_stops_the_pipeline_before_anything_downstream(merged_run):
    run_dir, _ = merged_run
    closed = submit(run_dir, "stages.interpolation.gate.metric=ssd", "stages.interpolation.gate.max=0.0")
    assert closed.returncode == 1
    assert "mergeability gate closed: ssd" in closed.stdout
    assert "eval_interpolation: not started, upstream failed: interpolation" in closed.stdout
    status = cli("status", str(run_dir)).stdout
    row = next(line for line in status.splitlines() if " interpolation " in line)
    assert "gated" in row


def test_gated_merge_shows_gated_and_blocks_its_dependants_on_local(write_job, tmp_path, monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")
    run_dir = tmp_path / "run"
    result = cli("submit", str(write_job(GATED)), "--run-dir", str(run_dir))
    assert result.returncode == 1, result.stdout + result.stderr
    assert "after_merge: not started, upstream failed: merge" in result.stdout
    verdict, _, rest = closing_line(result.stdout)
    assert (verdict, rest.split("; slowest")[0]) == ("failed after", "stage merge gated; 4 stages (3 ran, 0 already done, 1 not started)")
    assert_gated_status(run_dir)
