"""End to end through the real CLI: jobs/quickstart.yaml at its smallest,
real torchrun ranks (2, gloo, FSDP2), SIGKILL and resume, skipping finished
stages, failure propagation."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.support import REPO
from tests.support.cli import cli, closing_line
from tests.support.jobs import FAILING, QUICKSTART, SMALL, STAGES
from tests.support.processes import live_processes_mentioning
from vlcluster.backends.stage_process import threads_per_rank

pytestmark = pytest.mark.slow


def submit_small(run_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    args = ["submit", QUICKSTART, "--run-dir", str(run_dir)]
    for override in SMALL:
        args += ["--set", override]
    return cli(*args, *extra)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("quickstart")
    started = time.perf_counter()
    result = submit_small(run_dir)
    assert result.returncode == 0, result.stdout + result.stderr
    return run_dir, result, time.perf_counter() - started


def test_quickstart_runs_every_stage_and_prints_table1(finished_run):
    run_dir, result, wall = finished_run
    for row in ("| MAA |", "| MSA |", "| merging baseline |", "| merged |"):
        assert row in result.stdout
    assert "VQA acc | TR | TR R@1 | IR | IR R@1" in result.stdout
    for stage in ("data", "seed", "vlpt", "merge", "maa", "baseline", "merge_baseline", "ft_merged", "ft_msa",
                  "ft_maa", "ft_baseline", "eval_merged", "eval_baseline", "table1"):
        assert (run_dir / stage / "_SUCCESS").is_file(), stage
    assert "initialised from stage 'seed' (agnostic -> specific)" in result.stdout
    verdict, seconds, rest = closing_line(result.stdout)  # the run's time, within the wall time measured around it
    assert verdict == "finished in" and seconds <= wall + 0.5, (seconds, wall)
    assert rest.startswith(f"{len(STAGES)} stages ({len(STAGES)} ran, 0 already done); slowest: "), rest
    records = {stage: json.loads((run_dir / stage / "state.json").read_text()) for stage in STAGES}
    took = {stage: record["ended"] - record["started"] for stage, record in records.items()}
    assert sum(took.values()) - 1 <= seconds  # the stages ran one after another
    first, second = sorted(took, key=lambda stage: -took[stage])[:2]
    assert rest.split("slowest: ")[1].startswith(f"{first} "), (rest, took)
    assert f", {second} " in rest.split("slowest: ")[1], (rest, took)


def test_training_ran_on_two_ranks_and_logged_tensorboard(finished_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, result, _ = finished_run
    assert "over 2 ranks" in result.stdout
    assert f"{threads_per_rank(2)} CPU threads per rank" in result.stdout  # the node's cores split between its ranks
    events = EventAccumulator(str(run_dir / "seed" / "tb"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"loss/itc", "loss/itm", "loss/mlm", "loss/loss", "lr", "throughput/samples_per_s"} <= tags
    assert [event.step for event in events.Scalars("loss/itc")] == [2, 4]


def test_vl_pretraining_starts_from_seed_weights_in_every_expert(finished_run):
    run_dir, _, _ = finished_run
    seed = load_file(str(run_dir / "seed" / "model.safetensors"))
    vlpt = load_file(str(run_dir / "vlpt" / "model.safetensors"))
    assert "layers.3.attn.vl.qkv.weight" in vlpt and "layers.0.attn.shared.qkv.weight" in seed
    # After training the experts have moved away from the seed and from each other.
    assert not torch.equal(vlpt["layers.0.ffn.v.fc1.weight"], vlpt["layers.0.ffn.l.fc1.weight"])


def test_merged_checkpoint_is_agnostic(finished_run):
    run_dir, _, _ = finished_run
    merged = load_file(str(run_dir / "merge" / "model.safetensors"))
    layer_keys = [key for key in merged if key.startswith("layers.")]
    assert layer_keys and all(".shared." in key for key in layer_keys)


def test_resubmit_skips_every_stage_in_seconds(finished_run):
    run_dir, _, _ = finished_run
    started = time.perf_counter()
    again = submit_small(run_dir)
    elapsed = time.perf_counter() - started
    assert again.returncode == 0, again.stderr
    assert again.stdout.count("skipped (done)") == len(STAGES)
    verdict, seconds, rest = closing_line(again.stdout)
    assert verdict == "finished in" and seconds <= elapsed and rest == f"{len(STAGES)} stages (0 ran, {len(STAGES)} already done)"
    assert "| merged |" in again.stdout
    assert elapsed < 15, f"resubmit took {elapsed:.1f} s"


def test_status_and_logs(finished_run):
    run_dir, _, _ = finished_run
    status = cli("status", str(run_dir))
    assert status.returncode == 0
    assert status.stdout.count("done") >= 12
    logs = cli("logs", str(run_dir), "vlpt")
    assert logs.returncode == 0 and "step 24/24" in logs.stdout
    missing = cli("logs", str(run_dir), "nope")  # a stage the run does not have: named, with the stages it has
    assert missing.returncode == 2 and "no stage 'nope' in this run" in missing.stderr and "vlpt" in missing.stderr


def wait_for_checkpoint(run_dir: Path, stage: str, process: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    checkpoints = run_dir / stage / "checkpoints"
    while time.monotonic() < deadline:
        if checkpoints.is_dir() and any((entry / "meta.json").is_file() for entry in checkpoints.iterdir()):
            return
        assert process.poll() is None, "submit ended before a checkpoint of the stage was written"
        time.sleep(0.1)
    raise AssertionError(f"no {stage} checkpoint within {timeout} s")


# vlpt and every stage that depends on it: what the kill-and-resume test reruns.
VLPT_AND_DOWNSTREAM = ("vlpt", "merge", "ft_merged", "ft_msa", "eval_merged", "eval_msa", "table1")


def test_sigkill_during_vl_pretraining_then_resume_matches_uninterrupted_run(finished_run, tmp_path):
    run_dir = tmp_path / "killed"
    # The stages vlpt does not feed are copied from the finished run (outputs are
    # located by run dir and stage name, so the copies count as done): the test
    # spends its time on the killed stage and what follows it.
    for stage in set(STAGES) - set(VLPT_AND_DOWNSTREAM):
        shutil.copytree(finished_run[0] / stage, run_dir / stage)
    args = [sys.executable, "-m", "vlcluster.cli", "submit", QUICKSTART, "--run-dir", str(run_dir)]
    for override in SMALL:
        args += ["--set", override]
    with open(tmp_path / "first.log", "w") as log:
        process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True)
        wait_for_checkpoint(run_dir, "vlpt", process, timeout=300)
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    deadline = time.monotonic() + 20
    while live_processes_mentioning(str(run_dir)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert live_processes_mentioning(str(run_dir)) == [], "stage processes outlived the killed submit"
    assert not (run_dir / "vlpt" / "_SUCCESS").exists()
    status = cli("status", str(run_dir), env={"COLUMNS": "400"}).stdout  # one line per stage
    vlpt_row = next(line for line in status.splitlines() if " vlpt " in line)
    assert "interrupted" in vlpt_row and "checkpoint at step" in vlpt_row

    resumed = submit_small(run_dir)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert resumed.stdout.count("skipped (done)") == len(STAGES) - len(VLPT_AND_DOWNSTREAM)
    assert "resuming from checkpoint step_" in resumed.stdout
    resumed_from = int(resumed.stdout.split("resuming from checkpoint step_")[1][:8])
    assert 4 <= resumed_from < 24

    # Model, optimizer, RNG and data position all came back: the resumed
    # stage ends with exactly the weights of the uninterrupted run.
    reference = load_file(str(finished_run[0] / "vlpt" / "model.safetensors"))
    recovered = load_file(str(run_dir / "vlpt" / "model.safetensors"))
    assert reference.keys() == recovered.keys()
    for key in reference:
        assert torch.equal(reference[key], recovered[key]), key


def test_failed_stage_blocks_its_dependants(write_job, tmp_path):
    run_dir = tmp_path / "run"
    result = cli("submit", str(write_job(FAILING)), "--run-dir", str(run_dir))
    assert result.returncode == 1
    assert "vqa_on_pretrained: failed" in result.stdout
    assert "table: not started, upstream failed: vqa_on_pretrained" in result.stdout
    assert not (run_dir / "table" / "report.md").exists()
    verdict, _, rest = closing_line(result.stdout)
    assert verdict == "failed after", result.stdout
    assert rest.startswith("stage vqa_on_pretrained failed; 4 stages (3 ran, 0 already done, 1 not started); slowest: "), rest
    status = cli("status", str(run_dir)).stdout
    assert "failed" in status and "blocked" in status
    assert "no VQA head" in cli("logs", str(run_dir), "vqa_on_pretrained").stdout


MERGING_BASELINE = """
name: baseline
stages:
  data: {kind: data, n_train: 64, n_val: 16, shard_size: 32}
  specific:
    kind: pretrain
    model: {arch: specific}
    data: {from: data}
    train: {steps: 1, batch_size: 8, lr: 1.0e-9, warmup_steps: 0}
    resources: {procs_per_node: 1}
"""


def test_merging_baseline_experts_start_together(write_job, tmp_path):
    """K_seed = 0: a modality-specific model trained from scratch has V and L
    experts that start from one initialisation, so after one step at a tiny
    learning rate they are still (almost) the same weights."""
    run_dir = tmp_path / "run"
    result = cli("submit", str(write_job(MERGING_BASELINE)), "--run-dir", str(run_dir))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{threads_per_rank(1)} CPU threads per rank" in result.stdout  # one rank: every core
    metrics = cli("metrics", str(run_dir / "specific"), "--json")
    assert metrics.returncode == 0, metrics.stderr
    overall = json.loads(metrics.stdout)["overall"]
    print(f"V-L distances after 1 step at lr 1e-9: {overall}")
    assert overall["l2"] < 1e-3 and overall["cosine"] < 1e-6


EVAL_CHECKPOINTS = """
name: evalckpt
stages:
  data: {kind: data, n_train: 64, n_val: 16, shard_size: 32}
  seed:
    kind: pretrain
    data: {from: data}
    train: {steps: 2, batch_size: 8, warmup_steps: 0}
    checkpoint: {every: 1, keep: 2}
    resources: {procs_per_node: 1}
  eval_stage: {kind: eval, source: seed, data: {from: data}, tasks: [retrieval]}
  eval_last: {kind: eval, source: seed, step: 2, data: {from: data}, tasks: [retrieval]}
  eval_first: {kind: eval, source: seed, step: 1, data: {from: data}, tasks: [retrieval]}
"""


def test_eval_stage_reads_training_checkpoints_as_it_reads_a_stage(write_job, tmp_path):
    """`step:` evaluates a training stage's checkpoint, `model_file:` any model
    file made before the run: the last checkpoint scores exactly as the stage's
    output (the same weights), an earlier one as another model."""
    run_dir = tmp_path / "run"
    result = cli("submit", str(write_job(EVAL_CHECKPOINTS)), "--run-dir", str(run_dir))
    assert result.returncode == 0, result.stdout + result.stderr
    scores = {name: json.loads((run_dir / name / "result.json").read_text()) for name in ("eval_stage", "eval_last", "eval_first")}
    keys = [key for key, value in scores["eval_stage"].items() if isinstance(value, float)]
    assert "tr_r1" in keys
    assert [scores["eval_last"][key] for key in keys] == [scores["eval_stage"][key] for key in keys]
    assert scores["eval_last"]["model"] == {"stage": "seed", "step": 2, "arch": "agnostic"}
    assert scores["eval_first"]["items"] != scores["eval_stage"]["items"]  # per-item results of another model

    outside = EVAL_CHECKPOINTS.replace("name: evalckpt", "name: outside").replace(  # files made before this run
        "eval_last: {kind: eval, source: seed, step: 2,", f"eval_last: {{kind: eval, model_file: {run_dir}/seed/checkpoints/step_00000002,").replace(
        "eval_first: {kind: eval, source: seed, step: 1,", f"eval_first: {{kind: eval, model_file: {run_dir}/seed/checkpoints/step_00000001/model.safetensors,")
    second = tmp_path / "second"
    shutil.copytree(run_dir / "data", second / "data")
    shutil.copytree(run_dir / "seed", second / "seed")
    result = cli("submit", str(write_job(outside)), "--run-dir", str(second))
    assert result.returncode == 0, result.stdout + result.stderr
    again = {name: json.loads((second / name / "result.json").read_text()) for name in ("eval_last", "eval_first")}
    for name in again:
        assert again[name]["items"] == scores[name]["items"], name
    assert again["eval_first"]["model"]["model_file"].endswith("step_00000001/model.safetensors")

    gone = cli("submit", str(write_job(EVAL_CHECKPOINTS.replace("step: 1,", "step: 7,"))), "--run-dir", str(run_dir))
    assert gone.returncode == 1 and "keeps no checkpoint at step 7" in gone.stdout + gone.stderr
    elsewhere = str(write_job(outside.replace(str(run_dir), str(tmp_path / "elsewhere"))))
    missing = cli("submit", elsewhere, "--run-dir", str(tmp_path / "third"))  # refused before anything runs
    assert missing.returncode == 2 and "stages.eval_last.model_file" in missing.stderr, missing.stdout + missing.stderr
    assert "stages.eval_first.model_file" in missing.stderr and not (tmp_path / "third" / "data").exists()
