"""The training loop's stop hook without a cluster: SIGTERM to a running
training stage (what SLURM sends on requeue or preemption) makes every rank
save a checkpoint at the next step and exit, and the next submit resumes
from that step."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from tests.conftest import REPO
from tests.test_e2e import cli
from vlcluster.rundir import read_json

pytestmark = pytest.mark.slow

JOB = """
name: stop
stages:
  data: {kind: data, n_train: 64, n_val: 16, shard_size: 32}
  seed:
    kind: pretrain
    data: {from: data}
    train: {steps: 400, batch_size: 8, log_every: 1}
    checkpoint: {every: 1000}
    resources: {procs_per_node: 2}
"""


def test_sigterm_saves_a_checkpoint_at_the_next_step_and_the_next_submit_resumes(write_job, tmp_path):
    run_dir = tmp_path / "run"
    job = str(write_job(JOB))
    log = run_dir / "seed" / "logs" / "stage.log"
    submit = subprocess.Popen([sys.executable, "-m", "vlcluster.cli", "submit", job, "--run-dir", str(run_dir)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO)
    deadline = time.monotonic() + 180
    while not (log.is_file() and "step 3/400" in log.read_text()):
        assert submit.poll() is None and time.monotonic() < deadline, "training never reached step 3"
        time.sleep(0.2)
    torchrun = read_json(run_dir / "seed" / "state.json")["pid"]
    subprocess.run(["kill", "-TERM", str(torchrun)], check=True)  # torchrun forwards it to both ranks
    assert submit.wait(timeout=120) == 1  # the local backend reports the stage as not done
    text = log.read_text()
    step = int(text.split("stop requested: checkpoint at step ")[1].split()[0])
    assert 3 <= step < 400 and (run_dir / "seed" / "checkpoints" / f"step_{step:08d}" / "meta.json").is_file()
    assert f"resume from step {step}" in cli("plan", job, "--run-dir", str(run_dir)).stdout
