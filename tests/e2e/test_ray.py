"""The Ray backend against a real Ray cluster on 127.0.0.1 (one head node,
4 logical CPUs: two 2-rank training stages side by side): the shrunk
quickstart with one training rank SIGKILLed mid-stage (torchrun restarts the
ranks, they resume from the checkpoint), the dashboard's job list, status,
logs, a failed stage blocking its dependants, cancel, and a run on a private
cluster started for it."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.support import REPO
from tests.support.cli import cli
from tests.support.jobs import BACKEND_SMALL as SMALL, BACKEND_STAGES as STAGES, FAILING
from tests.support.processes import live_processes_mentioning
from tests.support.trials import RAY_TRIALS, fresh_run, ray_trial
from vlcluster.stages.rundir import read_json



@pytest.fixture(scope="module")
def ray_cluster():
    pytest.importorskip("ray.job_submission")
    from vlcluster.backends.ray.local_cluster import LocalRayCluster

    with LocalRayCluster(num_cpus=4) as cluster:
        yield cluster


def submit_args(job: str, run_dir: Path, address: str | None, *overrides: str) -> list[str]:
    args = [sys.executable, "-m", "vlcluster.cli", "submit", job, "--backend", "ray", "--run-dir", str(run_dir)]
    if address:
        args += ["--address", address]
    for override in overrides:
        args += ["--set", override]
    return args


def job_id(run_dir: Path, stage: str) -> str:
    return read_json(run_dir / stage / "state.json")["job_id"]


def training_ranks(run_dir: Path, stage: str) -> list[int]:
    """The rank processes torchrun started for a stage (not torchrun itself)."""
    pids = live_processes_mentioning(f"vlcluster.run {run_dir} {stage}")
    return [pid for pid in pids if b"torch.distributed.run" not in Path(f"/proc/{pid}/cmdline").read_bytes()]


def latest_checkpoint_step(run_dir: Path, stage: str) -> int | None:
    steps = [int(path.name.split("_")[1]) for path in (run_dir / stage / "checkpoints").glob("step_*[0-9]")
             if (path / "meta.json").is_file()]
    return max(steps) if steps else None


@pytest.fixture(scope="module")
def ray_run(ray_cluster, tmp_path_factory, backend_quickstart):
    """The shrunk quickstart on the cluster (joined by its GCS address, as
    `--address auto` resolves on a cluster node); once VL pre-training has a
    checkpoint, one of its two ranks is SIGKILLed."""
    run_dir = tmp_path_factory.mktemp("ray-quickstart")
    log_path = run_dir.parent / f"{run_dir.name}.submit.log"
    kill: dict = {}
    started = time.perf_counter()
    with open(log_path, "w") as log:
        process = subprocess.Popen(submit_args(backend_quickstart, run_dir, ray_cluster.gcs_address, *SMALL),
                                   stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
        deadline = time.monotonic() + 900
        while process.poll() is None and time.monotonic() < deadline:
            if not kill:
                step, ranks = latest_checkpoint_step(run_dir, "vlpt"), training_ranks(run_dir, "vlpt")
                if step is not None and len(ranks) == 2:
                    os.kill(ranks[1], signal.SIGKILL)
                    kill.update(pid=ranks[1], checkpoint=step, at=time.perf_counter())
            elif "resumed_after_s" not in kill and "resuming from checkpoint" in (run_dir / "vlpt" / "logs" / "stage.log").read_text():
                kill["resumed_after_s"] = time.perf_counter() - kill["at"]
            time.sleep(0.1)
        if process.poll() is None:
            process.kill()
        process.wait()
    elapsed = time.perf_counter() - started
    output = log_path.read_text()
    print(f"ray quickstart: {elapsed:.1f} s; kill: {kill}")
    assert process.returncode == 0, output
    return run_dir, output, elapsed, kill


@pytest.mark.slow
def test_quickstart_completes_on_ray(ray_run, ray_cluster):
    run_dir, output, _, _ = ray_run
    assert f"Ray dashboard: {ray_cluster.dashboard_url}" in output
    for stage in STAGES:
        assert (run_dir / stage / "_SUCCESS").is_file(), stage
        assert read_json(run_dir / stage / "state.json")["state"] == "done", stage
    assert "| merged |" in output and "run quickstart finished in" in output
    assert "over 2 ranks" in (run_dir / "seed" / "logs" / "stage.log").read_text()
    # Independent stages overlapped: MAA pre-training ran beside seed and VL pre-training.
    maa, seed = read_json(run_dir / "maa" / "state.json"), read_json(run_dir / "seed" / "state.json")
    assert maa["started"] < seed["ended"]


@pytest.mark.slow
def test_killed_rank_restarts_and_resumes_from_its_checkpoint(ray_run):
    run_dir, _, _, kill = ray_run
    assert kill, "VL pre-training was never seen running with a checkpoint"
    log = (run_dir / "vlpt" / "logs" / "stage.log").read_text()
    assert "restarting the ranks (1/3)" in log
    resumed = [int(step) for step in re.findall(r"resuming from checkpoint step_(\d+)", log)]
    assert len(resumed) == 1 and kill["checkpoint"] <= resumed[0] < 24 and resumed[0] > 0
    assert "step 24/24" in log
    assert read_json(run_dir / "vlpt" / "state.json")["worker_restarts"] == 1
    assert "resumed_after_s" in kill
    print(f"killed rank pid {kill['pid']} after checkpoint {kill['checkpoint']}; "
          f"resumed from step {resumed[0]} {kill['resumed_after_s']:.1f} s after the kill")


@pytest.fixture(scope="module")
def ray_reference(ray_cluster, tiny_reference, tmp_path_factory):
    """The kill trials' job run uninterrupted on this cluster: Ray gives a
    stage's ranks OMP_NUM_THREADS = its CPUs (2) where torchrun's default is
    1, so Ray's float sums round differently from the local reference (max
    |difference| 2.6e-5 after 6 steps); kill trials compare within a backend."""
    job, local_dir = tiny_reference
    run_dir = tmp_path_factory.mktemp("ray-reference") / "run"
    fresh_run(local_dir, run_dir)
    result = subprocess.run(submit_args(str(job), run_dir, ray_cluster.gcs_address), capture_output=True, text=True,
                            cwd=REPO, timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr
    return job, run_dir


@pytest.mark.slow
@pytest.mark.heavy
@pytest.mark.parametrize("at_step", RAY_TRIALS)
def test_ray_rank_sigkill_at_random_steps_restarts_in_place_bitwise(ray_cluster, ray_reference, tmp_path, at_step):
    outcome = ray_trial(ray_cluster, ray_reference, tmp_path, at_step)
    print(f"ray rank SIGKILL after step {outcome['killed_after_step']}: restarted in place, "
          f"resumed from {outcome['resumed_from']}, bitwise")


@pytest.mark.slow
def test_dashboard_lists_the_runs_jobs_with_metadata_and_logs(ray_run, ray_cluster):
    run_dir, _, _, _ = ray_run
    with urllib.request.urlopen(f"{ray_cluster.dashboard_url}/api/jobs/", timeout=10) as response:
        jobs = {job["submission_id"]: job for job in json.loads(response.read())}
    for stage in STAGES:
        job = jobs[job_id(run_dir, stage)]
        assert job["status"] == "SUCCEEDED"
        assert job["metadata"]["vlcluster_run"] == str(run_dir) and job["metadata"]["stage"] == stage
    with urllib.request.urlopen(f"{ray_cluster.dashboard_url}/api/jobs/{job_id(run_dir, 'vlpt')}/logs", timeout=10) as response:
        logs = json.loads(response.read())["logs"]
    assert re.search(r"step 24/24 \(100%\) .*\bloss [\d.]+ .*\| lr .* samples/s", logs)


@pytest.mark.slow
def test_status_and_logs_of_a_ray_run(ray_run, monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")
    run_dir, _, _, _ = ray_run
    status = cli("status", str(run_dir)).stdout
    vlpt = next(line for line in status.splitlines() if " vlpt " in line)
    assert f"ray {job_id(run_dir, 'vlpt')}" in vlpt and " done " in vlpt
    assert status.count(" done ") == len(STAGES)
    logs = cli("logs", str(run_dir), "vlpt")
    assert logs.returncode == 0 and "step 24/24" in logs.stdout and "resuming from checkpoint" in logs.stdout


@pytest.mark.slow
def test_failed_stage_blocks_its_dependants_on_ray(ray_cluster, write_job, tmp_path, monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")
    run_dir = tmp_path / "run"
    result = subprocess.run(submit_args(str(write_job(FAILING)), run_dir, ray_cluster.dashboard_url),
                            capture_output=True, text=True, timeout=600, cwd=REPO)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "vqa_on_pretrained: failed" in result.stdout
    assert "table: not started, upstream failed: vqa_on_pretrained" in result.stdout
    assert not (run_dir / "table" / "state.json").read_text().count("job_id")  # never submitted
    status = cli("status", str(run_dir)).stdout
    row = next(line for line in status.splitlines() if "vqa_on_pretrained" in line and "table" not in line)
    assert "failed" in row and "log" in row
    assert "upstream failed: vqa_on_pretrained" in status
    assert "no VQA head" in cli("logs", str(run_dir), "vqa_on_pretrained").stdout


@pytest.mark.slow
def test_cancel_stops_the_running_job_and_blocks_the_rest(ray_cluster, write_job, tmp_path):
    from ray.job_submission import JobSubmissionClient

    run_dir = tmp_path / "run"
    job = str(write_job(FAILING))
    with open(tmp_path / "submit.log", "w") as log:
        process = subprocess.Popen(submit_args(job, run_dir, ray_cluster.dashboard_url, "stages.seed.train.steps=500"),
                                   stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
        deadline = time.monotonic() + 300
        while read_json(run_dir / "seed" / "progress.json") is None:
            assert process.poll() is None and time.monotonic() < deadline, (tmp_path / "submit.log").read_text()
            time.sleep(0.2)
        cancelled = cli("cancel", str(run_dir))
        assert cancelled.returncode == 0 and "cancelled 1 stage(s): seed" in cancelled.stdout
        assert process.wait(timeout=120) == 1
    output = (tmp_path / "submit.log").read_text()
    assert "seed: cancelled" in output and "vqa_on_pretrained: not started, upstream failed: seed" in output
    assert JobSubmissionClient(ray_cluster.dashboard_url).get_job_status(job_id(run_dir, "seed")).value == "STOPPED"
    assert training_ranks(run_dir, "seed") == []
    status = cli("status", str(run_dir)).stdout
    assert "cancelled" in status and "blocked" in status


@pytest.mark.slow
def test_gated_merge_shows_gated_and_blocks_its_dependants_on_ray(ray_cluster, write_job, tmp_path, monkeypatch):
    from tests.support.jobs import GATED, assert_gated_status

    monkeypatch.setenv("COLUMNS", "400")
    run_dir = tmp_path / "run"
    result = subprocess.run(submit_args(str(write_job(GATED)), run_dir, ray_cluster.dashboard_url),
                            capture_output=True, text=True, timeout=600, cwd=REPO)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "after_merge: not started, upstream failed: merge" in result.stdout
    assert_gated_status(run_dir)


SWEEP = """
name: sweep
stages:
  data: {kind: data, n_train: 32, n_val: 8, shard_size: 16, sweep: {seed: [0, 1]}}
  after_all: {kind: data, n_train: 16, n_val: 8, shard_size: 16, after: [data]}
"""


@pytest.mark.slow
def test_without_address_a_private_cluster_runs_the_pipeline_and_stops(write_job, tmp_path):
    pytest.importorskip("ray.job_submission")
    run_dir = tmp_path / "run"
    result = cli("submit", str(write_job(SWEEP)), "--backend", "ray", "--run-dir", str(run_dir))
    assert result.returncode == 0, result.stdout + result.stderr
    url = re.search(r"Ray dashboard: (http://127\.0\.0\.1:\d+)", result.stdout).group(1)
    assert all((run_dir / stage / "_SUCCESS").is_file() for stage in ("data[seed=0]", "data[seed=1]", "after_all"))
    after = read_json(run_dir / "after_all" / "state.json")
    assert after["started"] > max(read_json(run_dir / f"data[seed={seed}]" / "state.json")["ended"] for seed in (0, 1))
    from vlcluster.backends.ray.local_cluster import dashboard_answers

    assert not dashboard_answers(url)  # the run's cluster is gone with it
    assert " done " in cli("status", str(run_dir)).stdout


@pytest.mark.slow
def test_a_killed_submit_takes_its_private_cluster_and_stages_along(write_job, tmp_path):
    pytest.importorskip("ray.job_submission")
    from vlcluster.backends.ray.local_cluster import dashboard_answers

    run_dir = tmp_path / "run"
    job = str(write_job(FAILING))
    with open(tmp_path / "submit.log", "w") as log:
        process = subprocess.Popen(submit_args(job, run_dir, None, "stages.seed.train.steps=500"),
                                   stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
        deadline = time.monotonic() + 300
        while not training_ranks(run_dir, "seed"):
            assert process.poll() is None and time.monotonic() < deadline, (tmp_path / "submit.log").read_text()
            time.sleep(0.2)
        url = re.search(r"Ray dashboard: (http://127\.0\.0\.1:\d+)", (tmp_path / "submit.log").read_text()).group(1)
        process.kill()
        process.wait()
    deadline = time.monotonic() + 60
    while (dashboard_answers(url) or live_processes_mentioning(str(run_dir))) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not dashboard_answers(url)
    assert live_processes_mentioning(str(run_dir)) == []
    # Nobody was left to remove the cluster's session directory.
    session = re.search(r"(/tmp/ray-[^/\s]+)/session_", (run_dir / "ray" / "head.log").read_text()).group(1)
    shutil.rmtree(session, ignore_errors=True)


def test_address_is_only_for_the_ray_backend(write_job, tmp_path):
    result = cli("submit", str(write_job(SWEEP)), "--address", "auto", "--run-dir", str(tmp_path / "run"))
    assert result.returncode == 2 and "--address is for --backend ray" in result.stderr


TWO_NODES = """
name: twonode
stages:
  data: {kind: data, n_train: 64, n_val: 16, shard_size: 32}
  seed:
    kind: pretrain
    data: {from: data}
    train: {steps: 12, batch_size: 8, log_every: 2, warmup_steps: 1}
    checkpoint: {every: 2}
    resources: {nodes: 2, procs_per_node: 1}
"""


def rank_of(pid: int) -> int:
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return int(next(item for item in environ if item.startswith(b"RANK="))[5:])


@pytest.mark.slow
def test_multi_node_stage_runs_one_torchrun_per_ray_node_and_survives_a_lost_rank(ray_cluster, write_job, tmp_path, monkeypatch):
    ray_cluster.add_node(num_cpus=2)  # a second raylet on this host: STRICT_SPREAD needs two nodes
    monkeypatch.setenv("VLCLUSTER_RAY_MASTER_ADDR", "127.0.0.1")  # keep the rendezvous on loopback
    run_dir = tmp_path / "run"
    killed = None
    with open(tmp_path / "submit.log", "w") as log:
        process = subprocess.Popen(submit_args(str(write_job(TWO_NODES)), run_dir, ray_cluster.dashboard_url),
                                   stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
        deadline = time.monotonic() + 600
        while process.poll() is None and time.monotonic() < deadline:
            ranks = training_ranks(run_dir, "seed")
            if killed is None and latest_checkpoint_step(run_dir, "seed") is not None and len(ranks) == 2:
                killed = next(pid for pid in ranks if rank_of(pid) == 1)  # the rank on the second node
                os.kill(killed, signal.SIGKILL)
            time.sleep(0.1)
        assert process.wait(timeout=10) == 0, (tmp_path / "submit.log").read_text()
    assert killed is not None and (run_dir / "seed" / "_SUCCESS").is_file()
    logs = run_dir / "seed" / "logs"
    main_log = (logs / "stage.log").read_text()
    first = re.search(r"==== .*node 0/2 on Ray node (\w+)", main_log).group(1)
    second = re.search(r"==== .*node 1/2 on Ray node (\w+)", (logs / "node_1.log").read_text()).group(1)
    assert first != second
    assert "over 2 ranks" in main_log and "--master_addr=127.0.0.1" in main_log
    assert "restarting the ranks (1/3)" in main_log
    assert 2 <= int(re.search(r"resuming from checkpoint step_(\d+)", main_log).group(1)) < 12


TORCHRUN_FAILURE = """\
E1125 14:11:01.488000 4263 torch/distributed/elastic/multiprocessing/api.py:1002] failed (exitcode: 1) local_rank: 0 (pid: 4304) of binary: python
torch.distributed.elastic.multiprocessing.errors.ChildFailedError:
Failures:
[1]:
  rank      : 1 (local_rank: 1)
  exitcode  : -9 (pid: 4305)  (SIGKILL)
  traceback : Signal 9 (SIGKILL) received by PID 4305
Root Cause (first observed failure):
[0]:
  rank      : 0 (local_rank: 0)
  exitcode  : 1 (pid: 4304)
"""


def test_a_killed_rank_is_restartable_even_when_its_peer_failed_first(tmp_path):
    """torchrun may first observe the surviving rank failing on the broken
    connection (exit 1); the SIGKILL of the lost rank is only in its summary."""
    from vlcluster.backends.ray.stage import restartable
    from vlcluster.backends.stage_process import run_once

    script = f"import sys; sys.stdout.write({TORCHRUN_FAILURE!r}); sys.exit(1)"
    with open(tmp_path / "stage.log", "w") as log:
        code, rank_codes = run_once([sys.executable, "-c", script], dict(os.environ), log)
    assert code == 1 and sorted(rank_codes) == [-9, 1, 1]
    assert restartable(rank_codes)
    assert not restartable([1, 1])


LONG_STAGE = """
name: adopted
stages:
  data: {kind: data, n_train: 64, n_val: 16, shard_size: 32}
  seed:
    kind: pretrain
    data: {from: data}
    train: {steps: 300, batch_size: 16, log_every: 20, warmup_steps: 1}
    checkpoint: {every: 20}
    resources: {procs_per_node: 1}
  score: {kind: eval, source: seed, data: {from: data}, tasks: [retrieval]}
"""


@pytest.mark.slow
def test_a_resubmit_follows_the_jobs_of_a_killed_submitter(ray_cluster, write_job, tmp_path):
    """The driving submit SIGKILLed while a stage's Ray job runs: the job goes
    on; submitting again follows it (never a second job writing the same
    checkpoints), then runs what comes after it."""
    job, run_dir = str(write_job(LONG_STAGE)), tmp_path / "run"
    with open(tmp_path / "first.log", "w") as log:
        first = subprocess.Popen(submit_args(job, run_dir, ray_cluster.dashboard_url), stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
        deadline = time.monotonic() + 300
        while latest_checkpoint_step(run_dir, "seed") is None:
            assert first.poll() is None and time.monotonic() < deadline, (tmp_path / "first.log").read_text()
            time.sleep(0.1)
        first.kill()
        first.wait()
    running = job_id(run_dir, "seed")
    second = cli(*submit_args(job, run_dir, ray_cluster.dashboard_url)[3:], timeout=600)
    assert second.returncode == 0, second.stdout + second.stderr
    assert f"following Ray job {running}, started by an earlier submit" in second.stdout
    assert job_id(run_dir, "seed") == running and (run_dir / "seed" / "_SUCCESS").is_file()
    assert (run_dir / "seed" / "logs" / "stage.log").read_text().count(" ray job on ") == 1  # never started twice
    assert "tr" in json.loads((run_dir / "score" / "result.json").read_text())


@pytest.mark.slow
@pytest.mark.heavy
def test_a_lost_ray_worker_node_restarts_the_stage_on_another_node_bitwise(ray_cluster, write_job, tmp_path, monkeypatch):
    """The whole second node of a two-node stage SIGKILLed (its raylet, workers
    and ranks, as a crashed host): the stage's driver counts its ranks as
    killed, waits for two nodes again (a new one joins, as an autoscaler would
    add it) and resumes from the checkpoint, ending with the weights of an
    uninterrupted two-node run on the same cluster."""
    from tests.support.trials import assert_bitwise, committed_steps, resumed_from

    monkeypatch.setenv("VLCLUSTER_RAY_MASTER_ADDR", "127.0.0.1")
    job = str(write_job(TWO_NODES))
    while ray_cluster.alive_nodes() < 2:
        ray_cluster.add_node(num_cpus=2)
    reference = tmp_path / "reference"
    done = cli(*submit_args(job, reference, ray_cluster.gcs_address)[3:], timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    run_dir = tmp_path / "run"
    with open(tmp_path / "submit.log", "w") as log:
        process = subprocess.Popen(submit_args(job, run_dir, ray_cluster.gcs_address), stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
        deadline = time.monotonic() + 600
        while not (latest_checkpoint_step(run_dir, "seed") and len(training_ranks(run_dir, "seed")) == 2):
            assert process.poll() is None and time.monotonic() < deadline, (tmp_path / "submit.log").read_text()
            time.sleep(0.1)
        # The worker node (not the head) that holds one of the stage's ranks: STRICT_SPREAD puts the two apart.
        lost = next(node for node in ray_cluster.nodes if node.poll() is None
                    and any(_descends(pid, node.pid) for pid in training_ranks(run_dir, "seed")))
        committed = committed_steps(run_dir)
        on_lost = [pid for pid in training_ranks(run_dir, "seed") if _descends(pid, lost.pid)]
        for pid in [lost.pid, *_descendants(lost.pid)]:  # the host is gone: every process it ran
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        ray_cluster.add_node(num_cpus=2)  # a replacement joins
        assert process.wait(timeout=600) == 0, (tmp_path / "submit.log").read_text()
    log = (run_dir / "seed" / "logs" / "stage.log").read_text()
    assert "restarting the ranks (1/3)" in log, log
    assert (resumed_from(log) or 0) >= (committed[-1] if committed else 0), log
    assert_bitwise(reference, run_dir)
    print(f"lost Ray worker node (ranks {on_lost}) after checkpoint {committed[-1] if committed else 0}: "
          f"resumed from step {resumed_from(log)} on a new node, bitwise")


def _descendants(root: int) -> list[int]:
    return [int(entry.name) for entry in Path("/proc").iterdir() if entry.name.isdigit() and _descends(int(entry.name), root)]


def _descends(pid: int, ancestor: int) -> bool:
    """``pid`` is a descendant of ``ancestor`` (by the parent links in /proc)."""
    while pid > 1:
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            return False
        if pid == ancestor:
            return True
    return False
