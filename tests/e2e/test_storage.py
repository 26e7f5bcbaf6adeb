"""Object storage: the storage section and its secrets rule, redaction,
shard lists from prefixes and globs, run-directory records and checkpoints on
a real S3-compatible server (SeaweedFS on 127.0.0.1, tests/support/s3server.py), the
shard cache, and the CLI's errors for missing data and wrong credentials."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.support import REPO
from tests.support.cli import cli

GOOD_DATA = """\
name: s3job
stages:
  data: {kind: data, n_train: 8, n_val: 4, shard_size: 4}
"""

TRAIN_FROM = """\
name: s3job
stages:
  seed:
    kind: pretrain
    model: {arch: agnostic}
    data: {train: '%s', tokenizer: %s}
    train: {steps: 2, batch_size: 4}
"""


# ---- the storage section (no server) ---------------------------------------


def test_storage_section_becomes_s3fs_options():
    from vlcluster.storage.config import StorageSpec, s3_options

    spec = StorageSpec(endpoint_url="http://127.0.0.1:9000", region="eu-west-1", profile="training")
    assert s3_options(spec) == {
        "use_listings_cache": False,
        "config_kwargs": {"retries": {"total_max_attempts": 5, "mode": "standard"}},
        "client_kwargs": {"endpoint_url": "http://127.0.0.1:9000", "region_name": "eu-west-1"},
        "profile": "training",
    }
    assert s3_options(StorageSpec(anon=True))["anon"] is True
    with pytest.raises(ValueError, match="cannot be combined"):
        StorageSpec(anon=True, profile="training")


@pytest.mark.parametrize(
    ("storage", "field"),
    [
        ("{endpoint_url: 'http://127.0.0.1:9000', aws_secret_access_key: 'S3CR3T-VALUE-123'}", "storage.aws_secret_access_key"),
        ("{key: 'S3CR3T-VALUE-123'}", "storage.key"),
        ("{session_token: 'S3CR3T-VALUE-123'}", "storage.session_token"),
        ("{endpoint_url: 'http://admin:S3CR3T-VALUE-123@127.0.0.1:9000'}", "storage.endpoint_url"),
    ],
)
def test_credentials_in_the_job_file_are_refused_without_echoing_them(write_job, tmp_path, storage, field):
    job = write_job(GOOD_DATA + f"storage: {storage}\n")
    for command in (["plan", str(job)], ["submit", str(job), "--run-dir", str(tmp_path / "run")]):
        result = cli(*command)
        assert result.returncode == 2, result.stdout + result.stderr
        assert f"{field}: looks like a credential" in result.stderr
        assert "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY" in result.stderr
        assert "S3CR3T-VALUE-123" not in result.stdout + result.stderr
        assert "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()


def test_credential_in_a_shard_url_is_refused(write_job):
    job = write_job(TRAIN_FROM % ("https://user:S3CR3T-VALUE-123@example.org/shard-{0..3}.tar", "tok.json"))
    result = cli("plan", str(job))
    assert result.returncode == 2
    assert "stages.seed.data.train: looks like a credential" in result.stderr
    assert "S3CR3T-VALUE-123" not in result.stdout + result.stderr


def test_redact_hides_userinfo_and_credential_values(monkeypatch):
    from vlcluster.storage.errors import redact

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "abcd-secret-efgh")
    text = redact("GET http://bob:hunter2@10.0.0.1:9000/b failed; signed with abcd-secret-efgh")
    assert "hunter2" not in text and "bob" not in text and "abcd-secret-efgh" not in text
    assert "http://***@10.0.0.1:9000/b" in text and "<AWS_SECRET_ACCESS_KEY>" in text


def test_only_storage_client_failures_are_explained_as_storage_errors():
    from vlcluster.storage.errors import explain

    def raise_local():
        open("/proc/version", "w")  # a local PermissionError (or OSError), not the object store's

    try:
        raise_local()
    except OSError as exc:
        assert explain(exc, "s3://bucket/run") is None
    assert explain(FileNotFoundError("s3://bucket/x"), "s3://bucket/x") is None


def test_rendered_jobs_and_plan_carry_no_credentials(write_job, tmp_path):
    secret = {"AWS_ACCESS_KEY_ID": "AKIATESTKEYID000", "AWS_SECRET_ACCESS_KEY": "S3CR3T-VALUE-123", "AWS_SESSION_TOKEN": "T0KEN-VALUE-456"}
    job = write_job(GOOD_DATA + "storage: {endpoint_url: 'http://127.0.0.1:9000', region: us-east-1}\nrun_dir: s3://runs/x\n")
    outputs = [
        cli("plan", str(job), "--run-dir", str(tmp_path / "run"), env=secret),
        cli("render", str(job), "--backend", "k8s", env=secret),
        cli("submit", str(job), "--run-dir", str(tmp_path / "run"), "--backend", "slurm", "--dry-run", env=secret),
    ]
    for result in outputs:
        assert result.returncode == 0, result.stdout + result.stderr
        for value in secret.values():
            assert value not in result.stdout + result.stderr
    assert "http://127.0.0.1:9000" in outputs[1].stdout  # the non-secret settings are rendered
    assert "--run-dir s3://runs/x" in outputs[1].stdout  # pods reach an object-store run dir directly


def test_settings_reach_child_processes(monkeypatch):
    from vlcluster.storage import config

    monkeypatch.setattr(config, "_active", None)
    monkeypatch.setenv(config.ENV, "")  # restored (removed) after the test, whatever activate() sets
    config.activate(config.StorageSpec(endpoint_url="http://127.0.0.1:9", cache_dir="/tmp/c"))
    child = subprocess.run(
        [sys.executable, "-c", "import fsspec.config, json; from vlcluster.storage.config import active; "
         "s = active(); print(json.dumps([s.endpoint_url, s.cache_dir, fsspec.config.conf['s3']]))"],
        capture_output=True, text=True, check=True, env=dict(os.environ),
    )
    endpoint, cache_dir, conf = json.loads(child.stdout)
    assert (endpoint, cache_dir) == ("http://127.0.0.1:9", "/tmp/c")
    assert conf["client_kwargs"]["endpoint_url"] == "http://127.0.0.1:9"
    monkeypatch.setattr(config, "_active", None)


# ---- against the S3 server -------------------------------------------------


@pytest.fixture(scope="module")
def s3_dataset(s3_server):
    """Synthetic shards written straight to s3://data/ds/ (the data stage's writer)."""
    env = {**os.environ, **s3_server.env, "AWS_ENDPOINT_URL": s3_server.endpoint}
    subprocess.run(
        [sys.executable, "-m", "vlcluster.cli", "data", "s3://data/ds/", "--n-train", "12", "--n-val", "4", "--shard-size", "4"],
        check=True, capture_output=True, env=env, cwd=REPO, timeout=120,
    )
    return "s3://data/ds"


def test_shard_lists_from_prefix_glob_and_braces(s3_env, s3_dataset):
    from vlcluster.storage.shardlist import expand as expand_urls

    train = [f"{s3_dataset}/train-{i:06d}.tar" for i in range(3)]
    assert expand_urls(f"{s3_dataset}/") == train + [f"{s3_dataset}/val-000000.tar"]
    assert expand_urls(f"{s3_dataset}/train-*.tar") == train
    assert expand_urls(f"{s3_dataset}/train-{{000000..000002}}.tar") == train
    assert expand_urls([f"{s3_dataset}/val-*.tar", f"{s3_dataset}/train-00000[01].tar"]) == [
        f"{s3_dataset}/val-000000.tar", *train[:2]
    ]
    with pytest.raises(FileNotFoundError, match="no shard files match"):
        expand_urls(f"{s3_dataset}/nothing-here/")


def test_training_reads_listed_s3_shards(s3_env, s3_dataset):
    from vlcluster.data.loader import TrainLoader
    from vlcluster.storage.shardlist import expand as expand_urls

    # Two data-loader worker processes, each reading its items of the canonical order from S3.
    loader = TrainLoader(expand_urls(f"{s3_dataset}/train-*.tar"), 0, 1, seed=0, shuffle_buffer=4, batch_size=4, num_workers=2)
    batches = [loader.next_batch() for _ in range(2)]
    loader.close()
    keys = [key for batch in batches for key in batch["key"]]
    assert all(batch["image"].shape[0] == 4 for batch in batches) and len(set(keys)) == 8  # 12 samples in 3 shards
    assert loader.quality.bad_total == 0


def test_missing_shards_bucket_and_prefix_are_spec_errors(write_job, tmp_path, s3_server, s3_dataset):
    env = {**s3_server.env, "AWS_ENDPOINT_URL": s3_server.endpoint}
    cases = {
        f"{s3_dataset}/train-{{000000..000009}}.tar": "stages.seed.data.train: 7 of 10 shard files missing (first: s3://data/ds/train-000003.tar)",
        "s3://no-such-bucket/train-{0..3}.tar": "stages.seed.data.train: bucket 'no-such-bucket' of s3://no-such-bucket/train-{0..3}.tar does not exist",
        f"{s3_dataset}/nothing-here/": "stages.seed.data.train: s3://data/ds/nothing-here/: no shard files match",
    }
    for pattern, expected in cases.items():
        job = write_job(TRAIN_FROM % (pattern, f"{s3_dataset}/tokenizer.json"))
        result = cli("submit", str(job), "--run-dir", str(tmp_path / "run"), env=env)
        assert result.returncode == 2, result.stdout + result.stderr
        assert f"{job}: " in result.stderr and expected in result.stderr
        assert "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()


def test_run_dir_in_a_missing_bucket_is_refused(write_job, s3_server):
    env = {**s3_server.env, "AWS_ENDPOINT_URL": s3_server.endpoint}
    result = cli("submit", str(write_job(GOOD_DATA)), "--run-dir", "s3://no-such-bucket/runs/x", env=env)
    assert result.returncode == 2
    assert "run_dir s3://no-such-bucket/runs/x: bucket 'no-such-bucket'" in result.stderr
    assert "never creates buckets" in result.stderr


def test_wrong_credentials_are_one_clear_error(write_job, tmp_path, s3_server, s3_dataset):
    wrong = {**s3_server.env, "AWS_SECRET_ACCESS_KEY": "wrong-secret-value-987", "AWS_ENDPOINT_URL": s3_server.endpoint}
    run_on_s3 = ("submit", str(write_job(GOOD_DATA)), "--run-dir", "s3://runs/wrong-credentials")
    shards_on_s3 = ("submit", str(write_job(TRAIN_FROM % (f"{s3_dataset}/train-*.tar", "tok.json"), "train.yaml")),
                    "--run-dir", str(tmp_path / "run"))
    for command in (run_on_s3, shards_on_s3):
        result = cli(*command, env=wrong)
        assert result.returncode == 2, result.stdout + result.stderr
        assert "access denied; the credentials are wrong or lack permission" in result.stderr
        assert "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY from the environment" in result.stderr
        assert "Traceback" not in result.stderr and "botocore" not in result.stderr
        assert "wrong-secret-value-987" not in result.stdout + result.stderr
    status = cli("status", "s3://runs/wrong-credentials", env=wrong)
    assert status.returncode == 2 and "access denied" in status.stderr and "Traceback" not in status.stderr


def test_records_and_done_marker_on_s3(s3_env):
    from vlcluster.stages.rundir import read_json, stage_dir, write_json_atomic

    stage = stage_dir("s3://runs/records", "seed")
    assert str(stage.success_file) == "s3://runs/records/seed/_SUCCESS"
    assert stage.done_hash() is None and stage.read_state() == {}
    stage.write_state(state="running", pid=1)
    stage.write_state(state="done")
    assert stage.read_state() == {"state": "done", "pid": 1}
    stage.mark_done("abc123")
    assert stage.done_hash() == "abc123"
    write_json_atomic(stage.result_file, {"x": 1})
    assert read_json(stage.result_file) == {"x": 1}


def _save(root, step: int, value: float):
    from vlcluster.train.checkpoint import save_checkpoint
    from vlcluster.train.dist import DistEnv

    env = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    model = {"w": torch.full((4,), value)}
    optim = {"state": {"w": {"exp_avg": torch.full((4,), value)}}, "param_groups": [{"lr": 0.1, "params": ["w"]}]}
    return save_checkpoint(root, step, env, model, optim, {"spec_hash": "h1"}, {"rng": torch.arange(3)}, {"loader": {"epoch": 0, "offset": step}}, keep=2)


def test_checkpoints_on_s3_commit_last_and_ignore_partial_uploads(s3_env):
    from vlcluster.storage.paths import run_path, upload_file
    from vlcluster.train.checkpoint import complete_checkpoints, discard_foreign, latest_checkpoint, load_checkpoint

    root = run_path("s3://runs/ckpt/seed/checkpoints")
    for step in (1, 2, 3):
        _save(root, step, float(step))
    assert [c.step for c in complete_checkpoints(root)] == [2, 3]  # keep=2 pruned step 1 on s3 too
    # An upload cut short: step 4's tensors are there, its meta.json (the commit marker) is not.
    upload_file(REPO / "pyproject.toml", root / "step_00000004" / "model.safetensors")
    latest = latest_checkpoint(root, "h1")
    assert latest.step == 3
    loaded = load_checkpoint(latest, rank=0)
    assert torch.equal(loaded.model_state["w"], torch.full((4,), 3.0))
    assert loaded.rank_info == {"loader": {"epoch": 0, "offset": 3}}
    assert torch.equal(loaded.optim_state["state"]["w"]["exp_avg"], torch.full((4,), 3.0))
    assert discard_foreign(root, "h1") == []
    assert not (root / "step_00000004").exists()  # the partial upload was garbage-collected


def test_rewriting_a_step_uncommits_it_first(s3_env):
    """A step saved again (a resumed run reaching it once more) is never
    readable as a mix of old and new files."""
    from vlcluster.storage.paths import run_path
    from vlcluster.train.checkpoint import latest_checkpoint, load_checkpoint

    root = run_path("s3://runs/ckpt-rewrite/checkpoints")
    _save(root, 5, 1.0)
    _save(root, 5, 2.0)
    loaded = load_checkpoint(latest_checkpoint(root, "h1"), rank=0)
    assert torch.equal(loaded.model_state["w"], torch.full((4,), 2.0))


def test_damaged_checkpoint_on_s3_is_detected_after_download_and_skipped(s3_env, caplog, tmp_path):
    """The digests in meta.json are checked on the downloaded copy: an object
    replaced by one of the same size but other bytes is caught, and the
    resume falls back to the previous step."""
    import logging

    from vlcluster.storage.paths import fetched, run_path, upload_file
    from vlcluster.train.checkpoint import complete_checkpoints, load_intact_checkpoint
    from vlcluster.train.dist import DistEnv

    root = run_path("s3://runs/ckpt-damaged/checkpoints")
    _save(root, 1, 1.0)
    _save(root, 2, 2.0)
    target = root / "step_00000002" / "model.safetensors"
    with fetched(target) as local:
        data = bytearray(local.read_bytes())
    data[-1] ^= 0x40  # same size, one bit
    damaged = tmp_path / "damaged.safetensors"
    damaged.write_bytes(bytes(data))
    upload_file(damaged, target)
    env = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    with caplog.at_level(logging.WARNING):
        loaded = load_intact_checkpoint(root, "h1", env)
    assert loaded.step == 1 and torch.equal(loaded.model_state["w"], torch.full((4,), 1.0))
    assert "step_00000002 is damaged (model.safetensors: sha256 mismatch); resuming from step_00000001" in caplog.text
    assert [c.step for c in complete_checkpoints(root)] == [1]  # uncommitted: out of every listing


def _count_gets(fs) -> dict[str, int]:
    """GetObject requests and bytes of ``fs``'s client, counted by botocore's event hooks."""
    counts = {"requests": 0, "bytes": 0}

    def after_get(http_response, parsed, **_):
        counts["requests"] += 1
        counts["bytes"] += int(parsed.get("ContentLength") or 0)

    fs.s3.meta.events.register("after-call.s3.GetObject", after_get)
    return counts


def test_shard_cache_makes_the_second_epoch_download_nothing(s3_env, s3_dataset, tmp_path):
    import fsspec

    from vlcluster.storage.shardlist import expand as expand_urls, open_input as open_url
    from vlcluster.storage import config

    config.activate(config.StorageSpec(endpoint_url=s3_env.endpoint_url, cache_dir=str(tmp_path / "cache")))
    fs = fsspec.filesystem("s3")  # the instance every vlcluster read uses (same options)
    fs.connect()
    counts = _count_gets(fs)
    urls = expand_urls(f"{s3_dataset}/train-*.tar")

    def epoch() -> bytes:
        data = b""
        for url in urls:
            with open_url(url) as stream:
                data += stream.read()
        return data

    first = epoch()
    after_first = dict(counts)
    second = epoch()
    assert first == second
    assert after_first["requests"] >= len(urls) and after_first["bytes"] >= len(first)
    assert counts == after_first  # epoch 2: no GetObject at all, only HEADs to check the ETags
    assert len(list((tmp_path / "cache" / "shards").iterdir())) >= len(urls)


def test_ranks_sharing_a_cache_never_read_a_partial_copy(s3_env, tmp_path):
    """Four processes fetch the same 8 MiB object into one cache at once (as
    the ranks of a stage do with its init model); each must see it whole."""
    import hashlib

    import fsspec

    payload = os.urandom(8 << 20)
    fsspec.filesystem("s3").pipe_file("runs/cache-race/model.safetensors", payload)
    script = (
        "import hashlib, sys; from vlcluster.storage.paths import local_copy; "
        "print(hashlib.sha256(local_copy('s3://runs/cache-race/model.safetensors').read_bytes()).hexdigest())"
    )
    procs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=dict(os.environ)) for _ in range(4)]
    digests = {proc.communicate(timeout=120)[0].strip() for proc in procs}
    assert digests == {hashlib.sha256(payload).hexdigest()}
    # a rewritten object is a new version: fetched again, not served stale
    fsspec.filesystem("s3").pipe_file("runs/cache-race/model.safetensors", b"v2")
    from vlcluster.storage.paths import local_copy

    assert local_copy("s3://runs/cache-race/model.safetensors").read_bytes() == b"v2"


def test_a_node_fetches_each_shard_once_and_keeps_its_cache_under_the_limit(s3_env, s3_server, tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    import fsspec

    from tests.support.countingproxy import CountingProxy
    from vlcluster.storage import config
    from vlcluster.storage.shardlist import open_input

    urls = [f"s3://data/cache-limit/{index}.tar" for index in range(3)]
    for index, url in enumerate(urls):
        fsspec.filesystem("s3").pipe_file(url, bytes([index]) * (1 << 20))
    cache = tmp_path / "limited"
    with CountingProxy(int(s3_server.endpoint.rsplit(":", 1)[1])) as proxy:
        config.activate(config.StorageSpec(endpoint_url=proxy.endpoint, cache_dir=str(cache), cache_limit_gb=0.0025))
        fsspec.filesystem("s3").clear_instance_cache()

        def read(url: str) -> bytes:
            with open_input(url) as stream:
                return stream.read()

        with ThreadPoolExecutor(4) as pool:  # four ranks of a node open the same shard at once
            assert set(pool.map(read, [urls[0]] * 4)) == {bytes([0]) * (1 << 20)}
        assert (1 << 20) < proxy.counts()[1] < 1.2 * (1 << 20)  # one download, the others waited for it
        assert read(urls[1]) == bytes([1]) * (1 << 20) and read(urls[2]) == bytes([2]) * (1 << 20)
        copies = sorted(path.name.split("-", 1)[1] for path in (cache / "shards").iterdir() if path.is_file())
        assert copies == ["1.tar", "2.tar"]  # 3 MiB > 2.5 GB/1000: the least recently used copy went
        proxy.reset()
        assert read(urls[2]) == bytes([2]) * (1 << 20) and proxy.counts()[1] < 4096  # a HEAD, no download


def test_a_growing_log_is_mirrored_to_s3(s3_env, tmp_path):
    from vlcluster.storage.paths import Mirror, run_path

    local, dest = tmp_path / "stage.log", run_path("s3://runs/mirror/seed/logs/stage.log")
    mirror = Mirror(local, dest, every_s=0.0)
    local.write_text("step 1\n")
    mirror.maybe_sync()
    assert dest.read_text() == "step 1\n"
    with open(local, "a") as log:
        log.write("step 2\n")
    mirror.sync()
    assert dest.read_text() == "step 1\nstep 2\n"
    assert not Mirror(local, local).active  # a local run dir's log is the file itself
