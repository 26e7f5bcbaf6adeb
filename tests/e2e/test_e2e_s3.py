"""End to end on object storage: jobs/quickstart.yaml (the backend variant and
SMALL overrides of test_e2e) with its shards and its run directory on a real S3-compatible server
(SeaweedFS on 127.0.0.1), credentials only in the environment."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support import REPO
from tests.support.jobs import BACKEND_SMALL as SMALL, BACKEND_STAGES as STAGES

pytestmark = pytest.mark.slow

RUN_DIR = "s3://runs/quickstart-e2e"


@pytest.fixture(scope="module")
def s3_run(s3_server, tmp_path_factory, backend_quickstart):
    cache = tmp_path_factory.mktemp("s3-cache")
    env = dict(s3_server.env)
    storage = [f"storage.endpoint_url={s3_server.endpoint}", f"storage.cache_dir={cache}"]

    def cli(*args: str, extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        inherited = dict(os.environ)  # read now: SLURM_CONF is set by a later fixture
        # Commands without a job file (status, logs, metrics, merge) keep their local copies under the test's cache too.
        local_settings = {"VLCLUSTER_STORAGE": json.dumps({"cache_dir": str(cache)})}
        return subprocess.run(
            [sys.executable, "-m", "vlcluster.cli", *args], capture_output=True, text=True, cwd=REPO, timeout=900,
            env={**inherited, **env, **local_settings, **(extra_env or {})},
        )

    def submit(*extra: str, extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        args = ["submit", backend_quickstart, "--run-dir", RUN_DIR]
        for override in [*SMALL, *storage]:
            args += ["--set", override]
        return cli(*args, *extra, extra_env=extra_env)

    started = time.perf_counter()
    first = submit()
    elapsed = time.perf_counter() - started
    assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-4000:]
    print(f"quickstart (SMALL) with shards and run dir on s3: {elapsed:.1f} s")
    return {"first": first, "submit": submit, "cli": cli, "env": env, "endpoint": s3_server.endpoint, "cache": cache}


def _fs(run):
    import s3fs

    return s3fs.S3FileSystem(
        key=run["env"]["AWS_ACCESS_KEY_ID"], secret=run["env"]["AWS_SECRET_ACCESS_KEY"],
        client_kwargs={"endpoint_url": run["endpoint"]}, skip_instance_cache=True, use_listings_cache=False,
    )


def test_quickstart_on_s3_writes_every_output_to_the_bucket(s3_run):
    result = s3_run["first"]
    for row in ("| MAA |", "| merged |"):
        assert row in result.stdout
    fs = _fs(s3_run)
    root = RUN_DIR.removeprefix("s3://")
    for stage in STAGES:
        assert fs.exists(f"{root}/{stage}/_SUCCESS"), stage
        assert fs.exists(f"{root}/{stage}/logs/stage.log"), stage
    assert fs.exists(f"{root}/data/train-000003.tar") and fs.exists(f"{root}/data/tokenizer.json")
    for stage in ("seed", "vlpt", "merge", "ft_merged"):
        assert fs.exists(f"{root}/{stage}/model.safetensors") and fs.exists(f"{root}/{stage}/model.json")
    assert fs.exists(f"{root}/table1/report.md")
    # keep=2: the two newest committed checkpoints, each with its commit marker, nothing half-written
    steps = sorted(p.rsplit("/", 1)[1] for p in fs.ls(f"{root}/vlpt/checkpoints"))
    assert steps == ["step_00000020", "step_00000024"]
    for step in steps:
        assert {p.rsplit("/", 1)[1] for p in fs.ls(f"{root}/vlpt/checkpoints/{step}")} == {
            "meta.json", "model.safetensors", "optim.safetensors",
            "rank_0.json", "rank_0.safetensors", "rank_1.json", "rank_1.safetensors",
        }


def test_tensorboard_events_reach_the_bucket(s3_run, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    fs = _fs(s3_run)
    fs.get(f"{RUN_DIR.removeprefix('s3://')}/seed/tb/", str(tmp_path / "tb"), recursive=True)
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert [event.step for event in events.Scalars("loss/itc")] == [2, 4]


def test_status_logs_and_plan_read_the_s3_run_dir(s3_run):
    endpoint = {"AWS_ENDPOINT_URL": s3_run["endpoint"]}  # no job file here: the endpoint comes from the environment
    status = s3_run["cli"]("status", RUN_DIR, extra_env=endpoint)
    assert status.returncode == 0, status.stderr
    assert status.stdout.count(" done ") == len(STAGES)
    logs = s3_run["cli"]("logs", RUN_DIR, "vlpt", extra_env=endpoint)
    assert logs.returncode == 0 and "step 24/24 (100%)" in logs.stdout
    again = s3_run["submit"]()
    assert again.returncode == 0
    assert again.stdout.count("skipped (done)") == len(STAGES)


def test_resume_from_the_newest_committed_checkpoint_on_s3(s3_run):
    """vlpt loses its done-marker and its newest checkpoint's commit marker
    (an upload cut short): the plan resumes from the one before, and the
    re-run continues from there while every other stage stays done."""
    fs = _fs(s3_run)
    root = RUN_DIR.removeprefix("s3://")
    fs.rm(f"{root}/vlpt/_SUCCESS")
    fs.rm(f"{root}/vlpt/checkpoints/step_00000024/meta.json")
    rerun = s3_run["submit"]()
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert "vlpt (pretrain, torchrun x2): resume from step 20" in rerun.stdout
    assert "resuming from checkpoint step_00000020 (step 20 of 24)" in rerun.stdout
    assert rerun.stdout.count("skipped (done)") == len(STAGES) - 1
    assert fs.exists(f"{root}/vlpt/checkpoints/step_00000024/meta.json")


def test_wrong_credentials_stop_before_anything_runs(s3_run):
    wrong = {"AWS_SECRET_ACCESS_KEY": "not-the-secret-4711"}
    result = s3_run["submit"](extra_env=wrong)
    assert result.returncode == 2
    assert "access denied; the credentials are wrong or lack permission for this bucket" in result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert "not-the-secret-4711" not in result.stdout + result.stderr
    assert s3_run["env"]["AWS_SECRET_ACCESS_KEY"] not in result.stdout + result.stderr


def test_merge_and_metrics_commands_read_and_write_s3(s3_run):
    endpoint = {"AWS_ENDPOINT_URL": s3_run["endpoint"]}
    metrics = s3_run["cli"]("metrics", f"{RUN_DIR}/vlpt", "--json", extra_env=endpoint)
    assert metrics.returncode == 0, metrics.stderr
    assert set(json.loads(metrics.stdout)["overall"]) >= {"l2", "cosine", "ssd", "tssd"}
    merged = s3_run["cli"]("merge", f"{RUN_DIR}/vlpt", "-o", "s3://runs/merged-by-cli", "--alpha", "0.5", extra_env=endpoint)
    assert merged.returncode == 0, merged.stderr
    fs = _fs(s3_run)
    assert fs.exists("runs/merged-by-cli/model.safetensors") and fs.exists("runs/merged-by-cli/model.json")


SLURM_ON_S3 = """
name: slurm-s3
stages:
  data: {kind: data, n_train: 32, n_val: 8, shard_size: 16}
  seed:
    kind: pretrain
    model: {arch: agnostic}
    data: {from: data}
    train: {steps: 2, batch_size: 8, log_every: 1}
    checkpoint: {every: 1, keep: 1}
    resources: {procs_per_node: 2}
"""


def test_slurm_jobs_get_the_storage_settings_and_write_to_s3(s3_run, slurm_cluster, write_job):
    """SLURM jobs inherit the submitting environment: the storage settings
    (VLCLUSTER_STORAGE) and the credentials; nothing secret is in the job."""
    from vlcluster.backends.slurm.jobs import job_states

    run_dir = "s3://runs/slurm-e2e"
    endpoint = {"AWS_ENDPOINT_URL": s3_run["endpoint"]}
    job = write_job(SLURM_ON_S3 + f"storage: {{endpoint_url: '{s3_run['endpoint']}', cache_dir: '{s3_run['cache']}'}}\n")
    result = s3_run["cli"]("submit", str(job), "--backend", "slurm", "--run-dir", run_dir)
    assert result.returncode == 0, result.stdout + result.stderr
    fs = _fs(s3_run)
    ids = [json.loads(fs.cat(f"runs/slurm-e2e/{stage}/state.json"))["job_id"] for stage in ("data", "seed")]
    deadline = time.monotonic() + 300
    while any(state.active for state in job_states(ids).values()) or len(job_states(ids)) < 2:
        assert time.monotonic() < deadline, job_states(ids)
        time.sleep(1)
    status = s3_run["cli"]("status", run_dir, extra_env=endpoint)
    assert status.stdout.count(" done ") == 2, status.stdout + status.stderr
    assert fs.exists("runs/slurm-e2e/seed/checkpoints/step_00000002/meta.json")
    logs = s3_run["cli"]("logs", run_dir, "seed", extra_env=endpoint)
    assert "step 2/2 (100%)" in logs.stdout
    for stage in ("data", "seed"):
        script = next(Path(p) for p in Path(json.loads(fs.cat(f"runs/slurm-e2e/{stage}/state.json"))["slurm_log"]).parent.glob("*_submission.sh"))
        assert s3_run["env"]["AWS_SECRET_ACCESS_KEY"] not in script.read_text()
