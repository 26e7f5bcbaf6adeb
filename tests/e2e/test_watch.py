"""Watching a run while it runs: ``status --watch`` (and ``--json``) ends when
every stage has ended, ``logs -f`` prints a stage's log as it grows and ends
with the stage; on the local backend and a private Ray cluster here, on the
real SLURM test cluster in test_slurm_caps.py."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from tests.support import REPO
from tests.support.cli import closing_line
from tests.support.watch import CHAIN, json_documents, vlcluster, watch_while_running

def test_status_watch_and_logs_follow_a_local_run_to_its_end(write_job, tmp_path):
    run_dir = tmp_path / "run"
    started = time.perf_counter()
    submit = vlcluster("submit", str(write_job(CHAIN)), "--run-dir", str(run_dir))
    docs, followed, code = watch_while_running(run_dir, submit, "second")
    assert submit.wait(timeout=60) == 0
    wall = time.perf_counter() - started
    assert not docs[0]["ended"] and docs[-1]["ended"]  # looked while running, stopped once ended
    assert [stage["state"] for stage in docs[-1]["stages"]] == ["done", "done"] and docs[-1]["counts"] == {"done": 2}
    assert code == 0
    assert followed == (run_dir / "second" / "logs" / "stage.log").read_text()  # the whole log, once
    once = subprocess.run([sys.executable, "-m", "vlcluster.cli", "status", str(run_dir), "--json"],
                          capture_output=True, text=True, cwd=REPO, timeout=60)
    assert json.loads(once.stdout)["ended"] is True
    assert_closing_line(submit.stdout.read(), wall, json.loads(once.stdout)["stages"])


def assert_closing_line(stdout: str, wall: float, stages: list[dict]) -> None:
    """The submit's last line: both stages ran, its time lies between the stages'
    times added up and the wall time measured around the submit, the slowest
    stages in order with the times `status --json` gives them."""
    verdict, seconds, rest = closing_line(stdout)
    assert verdict == "finished in" and rest.startswith("2 stages (2 ran, 0 already done); slowest: "), rest
    durations = {stage["name"]: stage["duration_s"] for stage in stages}
    assert sum(durations.values()) - 0.05 <= seconds <= wall + 0.05, (seconds, wall, durations)
    slowest = sorted(durations, key=lambda name: -durations[name])
    assert rest.endswith(", ".join(f"{name} {durations[name]:.1f} s" for name in slowest)), (rest, durations)


def test_following_a_stage_that_never_starts_ends_when_it_is_blocked(write_job, tmp_path):
    """A failed upstream blocks the followed stage: logs -f and status --watch end (exit 1), nothing hangs."""
    from vlcluster.stages.context import save_pipeline
    from vlcluster.graph import build_graph
    from vlcluster.jobspec.load import load_pipeline
    from vlcluster.stages.rundir import stage_dir

    run_dir = tmp_path / "run"
    save_pipeline(run_dir, build_graph(load_pipeline(write_job(CHAIN))))
    stage_dir(run_dir, "first").write_state(backend="local", state="failed", returncode=3, ended=time.time())
    logs = subprocess.run([sys.executable, "-m", "vlcluster.cli", "logs", str(run_dir), "second", "-f", "--interval", "0.2"],
                          capture_output=True, text=True, cwd=REPO, timeout=60)
    assert logs.returncode == 1 and logs.stdout == ""
    watch = subprocess.run([sys.executable, "-m", "vlcluster.cli", "status", str(run_dir), "--watch", "--json"],
                           capture_output=True, text=True, cwd=REPO, timeout=60)
    assert watch.returncode == 1
    assert [stage["state"] for stage in json_documents(watch.stdout)[-1]["stages"]] == ["failed", "blocked"]
    unknown = subprocess.run([sys.executable, "-m", "vlcluster.cli", "logs", str(run_dir), "third", "-f"],
                             capture_output=True, text=True, cwd=REPO, timeout=60)
    assert unknown.returncode == 2 and "no stage 'third' in this run" in unknown.stderr


@pytest.mark.slow
def test_status_watch_and_logs_follow_a_ray_run_to_its_end(write_job, tmp_path):
    pytest.importorskip("ray.job_submission")
    from vlcluster.backends.ray.local_cluster import LocalRayCluster

    run_dir = tmp_path / "run"
    with LocalRayCluster(num_cpus=2) as cluster:
        submit = vlcluster("submit", str(write_job(CHAIN)), "--backend", "ray", "--address", cluster.gcs_address,
                           "--run-dir", str(run_dir))
        docs, followed, code = watch_while_running(run_dir, submit, "second", timeout=240)
        assert submit.wait(timeout=120) == 0
    assert docs[-1]["ended"] and [stage["state"] for stage in docs[-1]["stages"]] == ["done", "done"]
    assert all(stage["job"].startswith("ray ") for stage in docs[-1]["stages"])
    assert code == 0 and followed == (run_dir / "second" / "logs" / "stage.log").read_text() and followed
