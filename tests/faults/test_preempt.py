"""The training loop's stop hook without a cluster: SIGTERM to a running
training stage (what SLURM sends on requeue or preemption) makes every rank
save a checkpoint at the next step and exit, and the next submit resumes
from that step."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from tests.support import REPO
from tests.support.cli import cli
from tests.support.jobs import FAILING
from vlcluster.stages.rundir import read_json

pytestmark = pytest.mark.slow

# The e2e failure pipeline's seed stage, made long enough to be stopped mid-run.
JOB = FAILING
LONG = ["stages.seed.train.steps=400", "stages.seed.train.log_every=1", "stages.seed.checkpoint.every=1000"]


def test_sigterm_saves_a_checkpoint_at_the_next_step_and_the_next_submit_resumes(write_job, tmp_path, monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")  # plan's table unwrapped
    run_dir = tmp_path / "run"
    job = str(write_job(JOB))
    log = run_dir / "seed" / "logs" / "stage.log"
    overrides = [arg for override in LONG for arg in ("--set", override)]
    submit = subprocess.Popen([sys.executable, "-m", "vlcluster.cli", "submit", job, "--run-dir", str(run_dir), *overrides],
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
    assert f"resume from step {step}" in cli("plan", job, "--run-dir", str(run_dir), *overrides).stdout
