"""Fault injection on real training runs (torchrun, 2 ranks, gloo): the newest
checkpoint is damaged the ways disks and crashes damage files, then the
stage is resubmitted. Every trial must log the damage, fall back to the
newest intact step, and finish with weights bitwise identical to an
uninterrupted run; nothing earlier (data, finished stages) is redone."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.support import REPO
from vlcluster.storage.tensorfile import load_tensors

pytestmark = pytest.mark.slow

def submit(job: Path, run_dir: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vlcluster.cli", "submit", str(job), "--run-dir", str(run_dir)],
                          capture_output=True, text=True, timeout=900, cwd=REPO)


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def zero_64k(path: Path) -> None:  # same size, 64 KiB of zeroes past the header
    data = bytearray(path.read_bytes())
    data[4096 : 4096 + 65536] = bytes(len(data[4096 : 4096 + 65536]))
    path.write_bytes(bytes(data))


def flip_bit(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))


def killed_before_commit(step_dir: Path) -> None:
    """What SIGKILL between two files of a checkpoint leaves: an uncommitted .partial directory."""
    partial = step_dir.with_name(step_dir.name + ".partial")
    step_dir.rename(partial)
    (partial / "meta.json").unlink()
    (partial / "optim.safetensors").unlink()


TRIALS = {
    "truncated model": ("model.safetensors", truncate, "model.safetensors: "),
    "64 KiB of zeroes in model": ("model.safetensors", zero_64k, "model.safetensors: sha256 mismatch"),
    "bit flip in optimizer state": ("optim.safetensors", flip_bit, "optim.safetensors: sha256 mismatch"),
    "rank 1 file missing": ("rank_1.safetensors", Path.unlink, "rank_1.safetensors: missing"),
    "killed between files": (None, killed_before_commit, None),
}


# Two trials in the default run (a truncated file, a flipped bit); every trial with -m heavy.
DEFAULT_TRIALS = ("truncated model", "bit flip in optimizer state")


@pytest.mark.parametrize(
    "trial", [trial if trial in DEFAULT_TRIALS else pytest.param(trial, marks=pytest.mark.heavy) for trial in TRIALS]
)
def test_damaged_newest_checkpoint_resumes_from_the_intact_one_bitwise(tiny_reference, tmp_path, trial):
    job, reference_dir = tiny_reference
    run_dir = tmp_path / "run"
    shutil.copytree(reference_dir, run_dir)
    seed = run_dir / "seed"
    for name in ("_SUCCESS", "model.safetensors", "model.json", "result.json"):  # as if the stage never finished
        (seed / name).unlink()
    newest = seed / "checkpoints" / "step_00000006"
    name, damage, reason = TRIALS[trial]
    damage(newest / name) if name else damage(newest)

    result = submit(job, run_dir)
    assert result.returncode == 0, result.stdout + result.stderr
    log = (seed / "logs" / "stage.log").read_text()
    if reason:
        assert f"step_00000006 is damaged ({reason}" in log and "; resuming from step_00000004" in log
        assert (seed / "checkpoints" / "step_00000006.damaged").is_dir()
    assert "resuming from checkpoint step_00000004" in log
    assert "data: skipped (done)" in result.stdout or "skip" in result.stdout

    expected = load_tensors(reference_dir / "seed" / "model.safetensors")
    recovered = load_tensors(seed / "model.safetensors")
    assert expected.keys() == recovered.keys()
    assert all(torch.equal(expected[key], recovered[key]) for key in expected)
