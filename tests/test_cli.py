"""The CLI on bad input and on plans: one-paragraph errors, no tracebacks."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO

GOOD = """
name: c
stages:
  data: {kind: data, n_train: 64, n_val: 16, shard_size: 32}
  seed: {kind: pretrain, data: {from: data}, train: {steps: 2}}
  vlpt: {kind: pretrain, model: {arch: specific}, init: {from: seed}, data: {from: data}, train: {steps: 2}}
"""


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vlcluster.cli", *args], capture_output=True, text=True, cwd=REPO, timeout=120)


@pytest.mark.parametrize(
    ("text", "overrides", "expected"),
    [
        (GOOD, ["stages.seed.train.setps=3"], "stages.seed.train.setps: unknown key"),
        (GOOD, ["stages.seed.train.steps=lots"], "stages.seed.train.steps: Input should be a valid integer"),
        (GOOD, ["stages.seed.after=[vlpt]"], "the stages form a cycle: "),
        (GOOD, ["stages.vlpt.init.from=sed"], "stages.vlpt.init.from: unknown stage 'sed'"),
        (
            GOOD.replace("data: {from: data}, train: {steps: 2}}\n  vlpt", "data: {train: 'nowhere/shard-{0..3}.tar'}, train: {steps: 2}}\n  vlpt", 1),
            [],
            "stages.seed.data.train: 4 of 4 shard files missing (first: nowhere/shard-0.tar)",
        ),
    ],
)
def test_bad_spec_exits_nonzero_with_file_and_field(write_job, tmp_path, text, overrides, expected):
    path = write_job(text)
    args = ["submit", str(path), "--run-dir", str(tmp_path / "run")]
    for override in overrides:
        args += ["--set", override]
    result = cli(*args)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr + result.stdout
    assert str(path) in result.stderr
    assert expected in result.stderr
    assert not (tmp_path / "run").exists()  # nothing was launched


def test_every_stage_kind_has_a_runner():
    from vlcluster.run import RUNNERS
    from vlcluster.jobspec.load import STAGE_KINDS

    assert set(STAGE_KINDS) == set(RUNNERS)


def test_local_backend_refuses_multi_node(write_job, tmp_path):
    result = cli("submit", str(write_job(GOOD)), "--set", "stages.seed.resources.nodes=2", "--run-dir", str(tmp_path / "r"))
    assert result.returncode == 2
    assert "stages.seed.resources.nodes is 2" in result.stderr


def test_dry_run_plans_without_running(write_job, tmp_path):
    result = cli("submit", str(write_job(GOOD)), "--dry-run", "--run-dir", str(tmp_path / "r"))
    assert result.returncode == 0
    assert "vlpt" in result.stdout and "run" in result.stdout
    assert not (tmp_path / "r").exists()


def test_plan_of_the_full_scale_seed_job():
    result = cli("plan", "jobs/seed_100k.yaml")
    assert result.returncode == 0, result.stderr
    assert "6x8" in result.stdout
    assert "6 node(s) x 8 rank(s); 8 GPU/node" in result.stdout
    assert "100000 steps, batch 1024 (21-22/rank), lr 0.0002, warm-up 2500; 9460 train shards" in result.stdout  # 4 corpora


def test_plan_of_quickstart():
    result = cli("plan", "jobs/quickstart.yaml", "--run-dir", "/nonexistent/run")
    assert result.returncode == 0, result.stderr
    for stage in ("data", "seed", "vlpt", "merge", "maa", "ft_merged", "eval_msa", "table1"):
        assert stage in result.stdout


def test_schema_prints_json():
    result = cli("schema")
    assert result.returncode == 0
    assert "stages" in json.loads(result.stdout)["properties"]
