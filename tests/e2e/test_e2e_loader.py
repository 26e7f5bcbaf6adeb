"""The training loader end to end: 2 torchrun ranks x 2 data-loader workers
on shards with damaged samples; SIGKILL at a random step and resume; the
bad-data limit."""

from __future__ import annotations

import json
import random
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.support.cli import cli
from tests.support.damage import EXPECTED_BAD
from tests.support.keys import recorded, run, submit, submit_then_kill

pytestmark = pytest.mark.slow

STEPS = 16
JOB = """
name: loader
stages:
  train:
    kind: pretrain
    model: {{size: tiny, arch: agnostic}}
    data:
      train: "{data}/train-{{000000..000007}}.tar"
      tokenizer: {data}/tokenizer.json
      answers: {data}/answers.json
      shuffle_buffer: 16
      num_workers: 2
      max_bad_fraction: {max_bad}
    train: {{steps: {steps}, batch_size: 16, log_every: 2, warmup_steps: 2}}
    checkpoint: {{every: 3, keep: 2}}
    resources: {{procs_per_node: 2}}
"""


@pytest.fixture(scope="module")
def data_dir(synthetic_data) -> Path:
    return synthetic_data.damaged(n_train=160, n_val=16, shard_size=20, image_size=32, seed=0).dir


def job(tmp_path: Path, data_dir: Path, max_bad: float) -> str:
    path = tmp_path / f"loader-{max_bad}.yaml"
    path.write_text(JOB.format(data=data_dir, max_bad=max_bad, steps=STEPS))
    return str(path)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_dir):
    root = tmp_path_factory.mktemp("reference")
    output = run(job(root, data_dir, 0.05), root / "run", root / "keys")
    return root, output


def test_uninterrupted_run_reports_bad_samples(reference, data_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    root, output = reference
    assert "over 2 ranks, 2 data-loader workers each" in output
    assert "skipped a bad sample (bad_image)" in output
    for rank in (0, 1):
        steps = recorded(root / "keys", rank)
        assert [step for step, _ in steps] == list(range(1, STEPS + 1))
        assert all(len(keys) <= 8 for _, keys in steps)  # a bad sample is dropped from its step
    result = json.loads((root / "run" / "train" / "result.json").read_text())["data"]
    shards = sorted(str(p) for p in data_dir.glob("train-*.tar"))
    assert set(result["bad_by_shard"]) == {shards[index] for index in EXPECTED_BAD}
    for index, reasons in EXPECTED_BAD.items():
        assert set(result["bad_by_shard"][shards[index]]) == set(reasons)
    trained = sum(len(keys) for rank in (0, 1) for _, keys in recorded(root / "keys", rank))
    assert result["samples_read"] == STEPS * 16 == trained + result["bad_samples"]  # every position of every step
    assert 0 < result["bad_fraction"] <= result["max_bad_fraction"] == 0.05
    events = EventAccumulator(str(root / "run" / "train" / "tb"))
    events.Reload()
    assert events.Scalars("data/bad_samples")[-1].value == result["bad_samples"]
    assert events.Scalars("data/bad_fraction")[-1].value == pytest.approx(result["bad_fraction"])


def test_sigkill_at_a_random_step_then_resume_sees_the_same_samples(reference, data_dir, tmp_path):
    ref_root, _ = reference
    kill_after = random.randint(4, STEPS - 2)
    print(f"killing after step {kill_after}")
    job_file, run_dir = job(tmp_path, data_dir, 0.05), tmp_path / "run"
    left = submit_then_kill(job_file, run_dir, tmp_path / "keys-first", kill_after, tmp_path / "first.log")
    assert left == [], "ranks or data-loader workers outlived the kill"

    output = run(job_file, run_dir, tmp_path / "keys-resumed")
    resumed_from = int(output.split("resuming from checkpoint step_")[1][:8])
    assert 3 <= resumed_from <= kill_after
    for rank in (0, 1):
        expected = recorded(ref_root / "keys", rank)
        first = recorded(tmp_path / "keys-first", rank)
        second = recorded(tmp_path / "keys-resumed", rank)
        assert [step for step, _ in second] == list(range(resumed_from + 1, STEPS + 1))
        # What the killed run trained on up to its checkpoint, then the resumed run: the uninterrupted sequence.
        assert [keys for step, keys in first if step <= resumed_from] + [keys for _, keys in second] == [keys for _, keys in expected]
        # Steps run after the checkpoint and lost with the kill saw the same samples as their re-run.
        assert all(keys == expected[step - 1][1] for step, keys in first)

    result = json.loads((run_dir / "train" / "result.json").read_text())["data"]
    assert result == json.loads((ref_root / "run" / "train" / "result.json").read_text())["data"]
    reference_weights = load_file(str(ref_root / "run" / "train" / "model.safetensors"))
    resumed_weights = load_file(str(run_dir / "train" / "model.safetensors"))
    assert all(torch.equal(reference_weights[key], resumed_weights[key]) for key in reference_weights)


def test_more_bad_samples_than_allowed_fails_the_stage(data_dir, tmp_path):
    job_file, run_dir = job(tmp_path, data_dir, 0.02), tmp_path / "run"
    process = submit(job_file, run_dir, tmp_path / "keys", stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    output, _ = process.communicate(timeout=600)
    assert process.returncode == 1
    assert "train: failed" in output
    log = cli("logs", str(run_dir), "train").stdout
    assert "samples read were bad" in log and "data.max_bad_fraction = 0.02" in log
    assert "resumes from the last checkpoint" in log  # the remedy, not only the symptom
    assert not (run_dir / "train" / "_SUCCESS").exists()
    status = cli("status", str(run_dir)).stdout
    assert "bad data over the limit" in status, status  # the cause, not only the exit code
    failure = json.loads((run_dir / "train" / "state.json").read_text())["failure"]
    assert failure["cause"] == "bad data over the limit" and "samples read were bad" in failure["message"]
