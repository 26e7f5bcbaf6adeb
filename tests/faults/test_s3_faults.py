"""Transient and permanent object-store failures on the real S3 test server
(SeaweedFS, tests/support/s3server.py) behind a proxy that fails chosen requests
(tests/support/flaky_proxy.py): transient failures are retried with backoff
and counted, a stage that met them finishes and says how many it retried,
and an outage is one error paragraph."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.support import REPO
from tests.support.cli import cli
from tests.support.flaky_proxy import FlakyProxy

DATA_JOB = """\
name: flaky
stages:
  data: {kind: data, n_train: 24, n_val: 8, shard_size: 8, image_size: 16}
"""


@pytest.fixture
def proxy(s3_server):
    with FlakyProxy(s3_server.endpoint) as flaky:
        yield flaky


@pytest.fixture
def through_proxy(s3_env, proxy, monkeypatch):
    """This process reaches the test server through the proxy, with a fresh counter."""
    from vlcluster.storage import config, retries

    monkeypatch.setattr(retries, "COUNT", retries.RetryCount())
    config.activate(s3_env.model_copy(update={"endpoint_url": proxy.endpoint}))
    return retries


@pytest.mark.parametrize(("kind", "count"), [("internal", 3), ("slowdown", 2), ("reset", 2)])
def test_transient_errors_are_retried_and_counted(through_proxy, proxy, kind, count):
    from vlcluster.storage.paths import read_json, run_path, write_json

    record = run_path(f"s3://runs/flaky-{kind}/state.json")
    write_json(record, {"before": True})
    proxy.fail_next(count, kind)
    write_json(record, {"step": 4})  # the first attempts of this PUT (and maybe its HEADs) fail
    assert proxy.total_injected == count
    assert read_json(record) == {"step": 4}
    counted = through_proxy.COUNT
    if kind == "reset":
        # aiohttp itself retries a request once on a reset kept-alive connection;
        # botocore sees (and counts) the rest.
        assert 1 <= counted.retried <= count
    else:
        assert counted.retried == count, counted  # every injected answer retried once, none lost
        assert sum(counted.failures.values()) == count
    assert counted.summary().startswith(f"storage: {counted.retried} requests retried after transient errors (")


def test_an_outage_is_one_error_paragraph_after_the_configured_attempts(through_proxy, proxy, s3_env):
    from vlcluster.storage import config
    from vlcluster.storage.errors import StorageError, storage_errors
    from vlcluster.storage.paths import run_path, write_json

    config.activate(s3_env.model_copy(update={"endpoint_url": proxy.endpoint, "max_attempts": 2}))
    proxy.fail_always("internal")
    with pytest.raises(StorageError) as info, storage_errors("s3://runs/outage/state.json"):
        write_json(run_path("s3://runs/outage/state.json"), {"x": 1})
    message = str(info.value)
    assert message.startswith("s3://runs/outage/state.json (endpoint http://127.0.0.1:")
    assert ("storage request failed: [Errno 121] We encountered an internal error. Please try again; transient failures "
            "were retried with backoff, 2 attempts per request (storage.max_attempts), and did not clear") in message
    assert "\n" not in message
    assert through_proxy.COUNT.attempts == 2 and through_proxy.COUNT.calls == 1


# The reference run read its shards from a local run directory: data.shuffle_run auto gave runs of 1 there,
# and would give 16 with the shards in the bucket. Pinned, the S3 runs take the reference's order.
SAME_ORDER_AS_LOCAL = ["--set", "stages.seed.data.shuffle_run=1"]


def _cli(args: list[str], s3_server, tmp_path) -> subprocess.CompletedProcess:
    return cli(*args, env={**s3_server.env, "PYTHONPATH": str(REPO), "VLCLUSTER_STORAGE": ""})


def _direct_fs(s3_server):
    """The test's own view of the bucket, not through the proxy."""
    import s3fs

    return s3fs.S3FileSystem(key=s3_server.env["AWS_ACCESS_KEY_ID"], secret=s3_server.env["AWS_SECRET_ACCESS_KEY"],
                             client_kwargs={"endpoint_url": s3_server.endpoint}, skip_instance_cache=True,
                             use_listings_cache=False)


def _retried(text: str) -> int:
    """The requests retried according to the summary lines in ``text``."""
    return sum(int(line.split("storage: ", 1)[1].split()[0])
               for line in text.splitlines() if "requests retried after transient errors" in line)


@pytest.mark.slow
def test_a_stage_on_a_flaky_store_finishes_and_reports_its_retries(s3_server, proxy, tmp_path, write_job):
    """Every 7th request of the submit and of the stage process fails (500,
    503 SlowDown and resets in turn): the run finishes, every shard is
    whole, and the stage log says how many requests were retried."""
    job = write_job(DATA_JOB)
    run_dir = "s3://runs/flaky-stage"
    proxy.fail_every(7, "internal")
    result = _cli(["submit", str(job), "--run-dir", run_dir, "--set", f"storage.endpoint_url={proxy.endpoint}",
                   "--set", f"storage.cache_dir={tmp_path / 'cache'}"], s3_server, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert proxy.injected["internal"] >= 3
    fs = _direct_fs(s3_server)
    assert fs.exists("runs/flaky-stage/data/_SUCCESS")
    shards = sorted(fs.glob("runs/flaky-stage/data/train-*.tar"))
    assert len(shards) == 3
    log = fs.cat_file("runs/flaky-stage/data/logs/stage.log").decode()
    retried_lines = [line for line in log.splitlines() if "requests retried after transient errors (InternalError 500 x" in line]
    assert len(retried_lines) == 1, log
    stage_retries = _retried(log)
    print(f"flaky data stage: {proxy.requests} requests, {proxy.injected['internal']} failed; retries counted: "
          f"{stage_retries} in the stage log, {_retried(result.stderr)} by the submit")
    assert stage_retries >= 1 and stage_retries + _retried(result.stderr) == proxy.injected["internal"], (log, result.stderr)


def test_an_unreachable_store_fails_submit_with_one_paragraph(s3_server, proxy, tmp_path, write_job):
    job = write_job(DATA_JOB + "storage: {max_attempts: 2}\n")
    proxy.fail_always("reset")
    result = _cli(["submit", str(job), "--run-dir", "s3://runs/outage-submit",
                   "--set", f"storage.endpoint_url={proxy.endpoint}"], s3_server, tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr and result.stderr.count("error:") == 1
    assert "cannot reach the storage endpoint" in result.stderr
    assert "2 attempts per request (storage.max_attempts)" in result.stderr


@pytest.mark.slow
@pytest.mark.heavy
def test_training_on_a_flaky_store_ends_bitwise_identical(s3_server, proxy, tmp_path, tiny_reference):
    """The two-rank training job of the kill trials with its run directory
    (shards, records, checkpoints, logs) on S3, every 5th request failing
    (500, 503 SlowDown in turn): it finishes with the weights of the
    uninterrupted local run, and the processes' summary lines account for
    every injected failure."""
    from vlcluster.storage.tensorfile import load_tensors

    import torch

    job, reference_dir = tiny_reference
    run_dir = "s3://runs/flaky-training"
    proxy.fail_every(5, "internal", "slowdown")
    result = _cli(["submit", str(job), "--run-dir", run_dir, "--set", f"storage.endpoint_url={proxy.endpoint}",
                   "--set", f"storage.cache_dir={tmp_path / 'cache'}", *SAME_ORDER_AS_LOCAL], s3_server, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    fs = _direct_fs(s3_server)
    fs.get_file("runs/flaky-training/seed/model.safetensors", str(tmp_path / "model.safetensors"))
    expected, recovered = load_tensors(reference_dir / "seed" / "model.safetensors"), load_tensors(tmp_path / "model.safetensors")
    assert expected.keys() == recovered.keys() and all(torch.equal(expected[k], recovered[k]) for k in expected)
    logs = "".join(fs.cat_file(f"runs/flaky-training/{stage}/logs/stage.log").decode() for stage in ("data", "seed"))
    counted = _retried(logs) + _retried(result.stderr)
    print(f"flaky training: {proxy.requests} requests, {proxy.total_injected} failed ({proxy.injected}), "
          f"{counted} retries counted")
    assert counted == proxy.total_injected, (logs, result.stderr)


@pytest.mark.slow
def test_an_outage_mid_epoch_fails_the_stage_and_the_resubmit_after_it_ends_bitwise(s3_server, proxy, tmp_path, tiny_reference):
    """The two-rank training job with its run directory on S3: once step 2's
    checkpoint is committed, every request fails (500) for longer than the
    retry budget (storage.max_attempts: 2, the budget scaled down from
    minutes): the stage fails with one paragraph and no traceback of ours,
    the submit waits for the store to record the cause (status: failed,
    object store unavailable), nothing half-written is taken for a
    checkpoint; after the outage the
    resubmit resumes from a committed checkpoint and ends with the weights of
    the uninterrupted local run."""
    import re
    import time

    import torch

    from vlcluster.storage.tensorfile import load_tensors

    job, reference_dir = tiny_reference
    run_dir = "s3://runs/outage-training"
    args = ["submit", str(job), "--run-dir", run_dir, "--set", f"storage.endpoint_url={proxy.endpoint}",
            "--set", f"storage.cache_dir={tmp_path / 'cache'}", "--set", "storage.max_attempts=2", *SAME_ORDER_AS_LOCAL]
    env = {**os.environ, **s3_server.env, "PYTHONPATH": str(REPO), "VLCLUSTER_STORAGE": ""}
    fs = _direct_fs(s3_server)
    with open(tmp_path / "first.log", "w") as log:
        process = subprocess.Popen([sys.executable, "-m", "vlcluster.cli", *args], stdout=log, stderr=subprocess.STDOUT,
                                   cwd=REPO, env=env)
        deadline = time.monotonic() + 300
        while not fs.exists("runs/outage-training/seed/checkpoints/step_00000002/meta.json"):
            assert process.poll() is None and time.monotonic() < deadline, (tmp_path / "first.log").read_text()
            time.sleep(0.2)
            fs.invalidate_cache()
        proxy.fail_always("internal")  # the store goes down mid-epoch
        started = time.monotonic()
        while "does not answer: writing the stage's log when it does" not in (tmp_path / "first.log").read_text():
            assert process.poll() is None and time.monotonic() < deadline, (tmp_path / "first.log").read_text()
            time.sleep(0.2)  # the rank failed; the submit waits to record why
        outage_s = time.monotonic() - started
        proxy.fail_always(None)  # and comes back
        code = process.wait(timeout=300)
    first = (tmp_path / "first.log").read_text()
    assert code != 0, first
    assert not re.search(r'File ".*/vlcluster/', first), first  # torchrun prints its own ChildFailedError, never ours
    assert "storage request failed" in first and "2 attempts per request (storage.max_attempts)" in first, first
    import json

    storage = json.dumps({"endpoint_url": proxy.endpoint, "cache_dir": str(tmp_path / "cache")})
    status = subprocess.run([sys.executable, "-m", "vlcluster.cli", "status", run_dir], capture_output=True, text=True,
                            cwd=REPO, timeout=120, env={**env, "VLCLUSTER_STORAGE": storage, "COLUMNS": "400"})
    row = next((line for line in status.stdout.splitlines() if " seed " in line), status.stdout + status.stderr)
    shown = next(state for state in ("failed", "interrupted", "running", "pending") if f" {state} " in row)
    assert shown == "failed" and "object store unavailable" in row, status.stdout + status.stderr  # the cause, recorded once it answered

    resumed = _cli(args, s3_server, tmp_path)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    found = re.findall(r"resuming from checkpoint step_(\d+)", resumed.stdout)
    assert found and int(found[-1]) >= 2, resumed.stdout
    fs.get_file("runs/outage-training/seed/model.safetensors", str(tmp_path / "model.safetensors"))
    expected, recovered = load_tensors(reference_dir / "seed" / "model.safetensors"), load_tensors(tmp_path / "model.safetensors")
    assert expected.keys() == recovered.keys() and all(torch.equal(expected[k], recovered[k]) for k in expected)
    print(f"s3 outage of {outage_s:.1f} s mid-epoch ({proxy.injected['internal']} requests failed): the stage failed "
          f"(status: {shown}: {row.split(shown, 1)[1].strip(' │')[:80]}), "
          f"the resubmit resumed from step {int(found[-1])}, bitwise")
