"""A full disk: one clear error, no half-written file under a final name,
no temp file left behind, earlier complete files kept.

The disk is a real 2 MiB tmpfs where this process may mount one (root, as
in CI's containers); elsewhere a file-size limit (RLIMIT_FSIZE) on the
child process makes its writes fail with EFBIG, the same path through the
code with a different errno.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LIMIT = 2 << 20


@pytest.fixture
def small_disk(tmp_path):
    """(directory, preexec_fn): a directory that holds at most 2 MiB."""
    mount = tmp_path / "disk"
    mount.mkdir()
    mounted = os.geteuid() == 0 and subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={LIMIT}", "tmpfs", str(mount)], capture_output=True
    ).returncode == 0
    if mounted:
        yield mount, None
        subprocess.run(["umount", str(mount)], check=True)
    else:
        yield mount, lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (LIMIT, LIMIT))


def run(args: list[str], preexec) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=300, preexec_fn=preexec)


def assert_only_complete_shards(directory: Path, shard_size: int) -> int:
    shards = sorted(directory.glob("*.tar"))
    for shard in shards:
        with tarfile.open(shard) as tar:  # a plain reader: every listed shard must be whole
            assert len(tar.getmembers()) == 3 * shard_size, shard
    leftovers = [p.name for p in directory.iterdir() if p.name.startswith(".")]
    assert leftovers == [], leftovers
    return len(shards)


def test_data_command_on_a_full_disk(small_disk):
    disk, preexec = small_disk
    out = disk / "data"
    result = run(["-m", "vlcluster.cli", "data", str(out), "--n-train", "4000", "--shard-size", "400"], preexec)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and result.stderr.count("error:") == 1
    assert "(ENOSPC)" in result.stderr or "(EFBIG)" in result.stderr
    assert "run the same command again" in result.stderr
    complete = assert_only_complete_shards(out, 400)
    assert 0 < complete < 10  # some shards fit, the rest did not


def test_data_stage_on_a_full_disk(small_disk, write_job):
    from vlcluster.stages.context import save_pipeline
    from vlcluster.graph import build_graph
    from vlcluster.jobspec.load import load_pipeline

    disk, preexec = small_disk
    path = write_job("name: t\nstages:\n  data: {kind: data, n_train: 4000, n_val: 10, shard_size: 400}\n")
    run_dir = disk / "run"
    save_pipeline(run_dir, build_graph(load_pipeline(path), str(path)))
    result = run(["-m", "vlcluster.run", str(run_dir), "data"], preexec)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert "[data] " in result.stdout and "run the same command again" in result.stdout
    assert f"[data] {run_dir / 'data'}/train-" in result.stdout  # names the shard it was writing
    assert_only_complete_shards(run_dir / "data", 400)
    assert not (run_dir / "data" / "_SUCCESS").exists()
    json.loads((run_dir / "pipeline.json").read_text())  # the record written before is intact


def test_checkpoint_on_a_full_disk_keeps_the_previous_one(tmp_path):
    """A checkpoint that does not fit fails with ENOSPC before its commit
    marker: the previous checkpoint stays the newest and loads intact."""
    import torch

    from vlcluster.storage.errors import disk_full
    from vlcluster.train import checkpoint as ckpt
    from vlcluster.train.dist import DistEnv

    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={LIMIT}", "tmpfs", str(mount)]).returncode:
        pytest.skip("needs a tmpfs mount (root)")
    try:
        env = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))

        def save(step: int, numel: int) -> None:
            model = {"w": torch.ones(numel)}
            optim = {"state": {"w": {"exp_avg": torch.ones(numel)}}, "param_groups": [{"lr": 0.1, "params": ["w"]}]}
            ckpt.save_checkpoint(mount, step, env, model, optim, {"spec_hash": "h", "world_size": 1},
                                 {"rng": torch.arange(3)}, {"loader": {}}, keep=2)

        save(1, 1000)
        with pytest.raises(OSError) as info:
            save(2, 400_000)  # 2 x 1.6 MB: more than the disk holds
        assert "no space left on the device (ENOSPC)" in disk_full(info.value)
        loaded = ckpt.load_intact_checkpoint(mount, "h", env)
        assert loaded.step == 1 and torch.equal(loaded.model_state["w"], torch.ones(1000))
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_a_record_that_does_not_fit_leaves_no_temp_file(small_disk):
    disk, preexec = small_disk
    if preexec is not None:
        pytest.skip("needs the tmpfs (the file-size limit applies to child processes only)")
    from vlcluster.storage.errors import disk_full
    from vlcluster.storage.paths import write_bytes

    write_bytes(disk / "state.json", b"{}")
    with pytest.raises(OSError) as info:
        write_bytes(disk / "state.json", b"x" * (LIMIT + 1))
    assert str(disk / "state.json") in disk_full(info.value)
    assert sorted(p.name for p in disk.iterdir()) == ["state.json"] and (disk / "state.json").read_bytes() == b"{}"


def test_submit_on_a_full_disk_ends_failed_with_the_reason(small_disk, write_job):
    """The data stage fills the disk: submit reports it in one paragraph,
    ``status`` says failed (not interrupted) with the reason, and no temp
    file is left in the run directory."""
    disk, preexec = small_disk
    if preexec is not None:
        pytest.skip("needs the tmpfs: the submit itself must meet the full disk")
    job = write_job("name: t\nstages:\n  data: {kind: data, n_train: 4000, n_val: 10, shard_size: 400}\n")
    run_dir = disk / "run"
    result = run(["-m", "vlcluster.cli", "submit", str(job), "--run-dir", str(run_dir)], None)
    assert result.returncode in (1, 2), result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    status = run(["-m", "vlcluster.cli", "status", str(run_dir)], None)
    assert status.returncode == 0, status.stderr
    row = next(line for line in status.stdout.splitlines() if " data " in line)
    assert " failed " in row and "interrupted" not in row, status.stdout
    assert "disk full" in status.stdout and "(ENOSPC)" in status.stdout, status.stdout  # the cause, not only the code
    leftovers = [str(p.relative_to(run_dir)) for p in run_dir.rglob(".*") if p.name != ".lock"]  # .lock: the run's lock file
    assert leftovers == [], leftovers


def test_a_record_rewrites_itself_in_place_when_the_disk_is_full(small_disk):
    """The record of a stage that failed for lack of space must still say
    failed: on a full disk a record no larger than the blocks it holds is
    rewritten in place; a larger one fails and the old one stays whole."""
    disk, preexec = small_disk
    if preexec is not None:
        pytest.skip("needs the tmpfs (the file-size limit applies to child processes only)")
    from vlcluster.stages.rundir import read_json
    from vlcluster.storage.paths import write_json

    state = disk / "state.json"
    write_json(state, {"state": "running", "pid": 123})
    with open(disk / "filler", "wb", buffering=0) as filler:  # fill every remaining block
        with pytest.raises(OSError):
            while True:
                filler.write(b"\0" * 4096)
    with pytest.raises(OSError):
        (disk / "probe").write_bytes(b"x" * 4096)  # the disk is full
    (disk / "probe").unlink(missing_ok=True)
    write_json(state, {"state": "failed", "pid": 123, "returncode": 1, "ended": 1.5})
    assert read_json(state) == {"state": "failed", "pid": 123, "returncode": 1, "ended": 1.5}
    with pytest.raises(OSError):
        write_json(state, {"state": "failed", "log": "x" * 8192})
    assert read_json(state)["state"] == "failed"
    assert sorted(p.name for p in disk.iterdir()) == ["filler", "state.json"]
