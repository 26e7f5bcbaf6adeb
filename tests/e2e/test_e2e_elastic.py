"""Elastic exact resume end to end: a pre-training stage on 2 torchrun ranks x
2 data-loader workers is SIGKILLed mid-epoch and resumed on another number of
ranks and workers; the per-step key record (VLCLUSTER_RECORD_KEYS) shows every
sample of the epoch exactly once, in the canonical steps the loader computes
without any training. The same with shards and run directory on a real S3
server (SeaweedFS on 127.0.0.1, shards read without a local cache).

Default run: the S3 case, resumed on 3 ranks x 1 worker. Heavy: the local
killed run resumed on 3 x 1, 1 x 0 and 4 x 2 (one killed run, copied)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support import REPO
from vlcluster.data.loader import OBJECT_STORE_RUN, TrainLoader

pytestmark = pytest.mark.slow

SHARDS, PER_SHARD, BATCH, STEPS, SHUFFLE = 8, 12, 12, 12, 16
EPOCH_STEPS = SHARDS * PER_SHARD // BATCH  # 8: the run covers one and a half epochs
KILL_AFTER = 5  # steps recorded before the kill: mid-epoch, after the checkpoint of step 4
JOB = """
name: elastic
stages:
  train:
    kind: pretrain
    model: {{size: tiny, arch: agnostic}}
    data:
      train: "{shards}/train-{{000000..000007}}.tar"
      tokenizer: {data}/tokenizer.json
      answers: {data}/answers.json
      shuffle_buffer: {shuffle}
      num_workers: 2
    train: {{steps: {steps}, batch_size: {batch}, log_every: 2, warmup_steps: 2, seed: 0}}
    checkpoint: {{every: 2, keep: 2}}
    resources: {{procs_per_node: 2}}
"""


@pytest.fixture(scope="module")
def data_dir(synthetic_data) -> Path:
    return synthetic_data.clean(n_train=SHARDS * PER_SHARD, n_val=12, shard_size=PER_SHARD, image_size=32, seed=0).dir


def canonical_steps(urls: list[str], shuffle_run: int = 1) -> list[list[str]]:
    """The keys of every step as the canonical order gives them (one in-process reader, nothing trained)."""
    loader = TrainLoader(urls, 0, 1, seed=0, shuffle_buffer=SHUFFLE, batch_size=BATCH, shuffle_run=shuffle_run)
    try:
        return [loader.next_batch()["key"] for _ in range(STEPS)]
    finally:
        loader.close()


def submit(job_file: Path, run_dir: str, keys_dir: Path, overrides: list[str], env: dict, **popen) -> subprocess.Popen:
    args = [arg for override in overrides for arg in ("--set", override)]
    command = [sys.executable, "-m", "vlcluster.cli", "submit", str(job_file), "--run-dir", run_dir, *args]
    env = {**os.environ, **env, "VLCLUSTER_RECORD_KEYS": str(keys_dir)}
    return subprocess.Popen(command, cwd=REPO, env=env, text=True, **popen)


def recorded(keys_dir: Path) -> dict[int, list[str]]:
    """Step -> the keys every rank trained on in it, in rank order (the last run of a step wins)."""
    per_rank: dict[int, dict[int, list[str]]] = {}
    for path in sorted(keys_dir.glob("keys_rank*.txt"), key=lambda p: int(p.stem.removeprefix("keys_rank"))):
        rank = int(path.stem.removeprefix("keys_rank"))
        for line in path.read_text().splitlines():
            step, *keys = line.split()
            per_rank.setdefault(int(step), {})[rank] = keys
    return {step: [key for rank in sorted(ranks) for key in ranks[rank]] for step, ranks in per_rank.items()}


def kill_mid_epoch(job_file: Path, run_dir: str, keys_dir: Path, overrides: list[str], env: dict, log: Path) -> None:
    with open(log, "w") as out:
        process = submit(job_file, run_dir, keys_dir, overrides, env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 600
        while len(recorded(keys_dir)) < KILL_AFTER:
            assert process.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "training did not reach the kill step"
            time.sleep(0.05)
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def resume(job_file: Path, run_dir: str, keys_dir: Path, overrides: list[str], env: dict) -> str:
    process = submit(job_file, run_dir, keys_dir, overrides, env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    output, _ = process.communicate(timeout=900)
    assert process.returncode == 0, output
    return output


def check_exactly_once(expected: list[list[str]], killed: Path, resumed: Path, output: str, ranks: int) -> int:
    """The killed run up to its checkpoint, then the resumed run: the canonical steps; each epoch every sample once."""
    resumed_from = int(output.split("resuming from checkpoint step_")[1][:8])
    assert 2 <= resumed_from < KILL_AFTER + 2
    assert f"resuming on {ranks} ranks from a checkpoint of 2" in output
    first, second = recorded(killed), recorded(resumed)
    assert sorted(second) == list(range(resumed_from + 1, STEPS + 1))
    trained = [first[step] for step in range(1, resumed_from + 1)] + [second[step] for step in sorted(second)]
    assert trained == expected  # step by step, on both topologies
    epoch = [key for keys in trained[:EPOCH_STEPS] for key in keys]
    assert len(epoch) == len(set(epoch)) == SHARDS * PER_SHARD  # every sample of the epoch exactly once
    rest = [key for keys in trained[EPOCH_STEPS:] for key in keys]
    assert len(rest) == len(set(rest)) == (STEPS - EPOCH_STEPS) * BATCH  # and nothing twice in the next one
    return resumed_from


def topology(ranks: int, workers: int) -> list[str]:
    return [f"stages.train.resources.procs_per_node={ranks}", f"stages.train.data.num_workers={workers}"]


# ---------------------------------------------------------------- local, heavy


@pytest.fixture(scope="module")
def killed_local(tmp_path_factory, data_dir):
    root = tmp_path_factory.mktemp("elastic-local")
    job_file = root / "job.yaml"
    job_file.write_text(JOB.format(shards=data_dir, data=data_dir, shuffle=SHUFFLE, steps=STEPS, batch=BATCH))
    kill_mid_epoch(job_file, str(root / "run"), root / "keys-killed", [], {}, root / "killed.log")
    urls = [str(data_dir / f"train-{index:06d}.tar") for index in range(SHARDS)]
    return root, job_file, canonical_steps(urls)


@pytest.mark.heavy
@pytest.mark.parametrize("ranks, workers", [(3, 1), (1, 0), (4, 2)])
def test_killed_2x2_run_resumes_exactly_on_another_topology(killed_local, tmp_path, ranks, workers):
    root, job_file, expected = killed_local
    run_dir = tmp_path / "run"
    shutil.copytree(root / "run", run_dir)  # every topology resumes the same killed run
    started = time.perf_counter()
    output = resume(job_file, str(run_dir), tmp_path / "keys", topology(ranks, workers), {})
    print(f"resume on {ranks} x {workers}: {time.perf_counter() - started:.1f} s")
    assert f"over {ranks} ranks, {workers} data-loader workers each" in output
    check_exactly_once(expected, root / "keys-killed", tmp_path / "keys", output, ranks)


# ---------------------------------------------------------------- s3, default run


def test_killed_2x2_run_on_s3_resumes_exactly_on_3_ranks_x_1_worker(s3_server, data_dir, tmp_path):
    import s3fs

    fs = s3fs.S3FileSystem(
        key=s3_server.env["AWS_ACCESS_KEY_ID"], secret=s3_server.env["AWS_SECRET_ACCESS_KEY"],
        client_kwargs={"endpoint_url": s3_server.endpoint}, skip_instance_cache=True,
    )
    urls = []
    for index in range(SHARDS):
        name = f"train-{index:06d}.tar"
        fs.put_file(str(data_dir / name), f"data/elastic/{name}")
        urls.append(str(data_dir / name))
    job_file = tmp_path / "job.yaml"
    job_file.write_text(JOB.format(shards="s3://data/elastic", data=data_dir, shuffle=SHUFFLE, steps=STEPS, batch=BATCH))
    storage = [f"storage.endpoint_url={s3_server.endpoint}"]  # no cache_dir: shards are read (and skipped) on the server
    run_dir = "s3://runs/elastic"
    started = time.perf_counter()
    kill_mid_epoch(job_file, run_dir, tmp_path / "keys-killed", storage, s3_server.env, tmp_path / "killed.log")
    killed = time.perf_counter() - started
    output = resume(job_file, run_dir, tmp_path / "keys", storage + topology(3, 1), s3_server.env)
    print(f"s3: killed run {killed:.1f} s, resume on 3 x 1 {time.perf_counter() - started - killed:.1f} s")
    assert "over 3 ranks, 1 data-loader workers each" in output
    # data.shuffle_run is auto: runs of 16 on the object store (the local copies give the same order)
    check_exactly_once(canonical_steps(urls, OBJECT_STORE_RUN), tmp_path / "keys-killed", tmp_path / "keys", output, 3)
