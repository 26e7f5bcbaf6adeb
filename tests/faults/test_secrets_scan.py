"""Fake credentials planted everywhere a user might keep them (environment
variables, an AWS credentials file and profile) must appear in no artefact
of plan, dry-run, render or a real run: stdout/stderr, logs, state records,
pipeline.json, result.json, checkpoints, TensorBoard events, manifests."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.support import REPO

pytestmark = pytest.mark.slow

FAKES = {
    "AWS_ACCESS_KEY_ID": "AKIAFAKEPLANTED0001",
    "AWS_SECRET_ACCESS_KEY": "fake-planted-secret-0002",
    "AWS_SESSION_TOKEN": "fake-planted-session-0003",
    "HF_TOKEN": "hf_fakeplantedtoken0004",
    "WANDB_API_KEY": "fake-planted-wandb-0005",
    "DATABASE_URL": "postgres://admin:fake-planted-pw-0006@db:5432/x",
}
PROFILE_SECRET = "fake-planted-profile-0007"
JOB = """
name: secrets
stages:
  data: {kind: data, n_train: 32, n_val: 16, shard_size: 16, image_size: 16}
  seed:
    kind: pretrain
    model: {image_size: 16}
    data: {from: data}
    train: {steps: 2, batch_size: 8, log_every: 1}
    checkpoint: {every: 1, keep: 2}
"""


def test_no_planted_credential_reaches_any_artefact(tmp_path):
    home = tmp_path / "home"
    (home / ".aws").mkdir(parents=True)
    (home / ".aws" / "credentials").write_text(
        f"[default]\naws_access_key_id = AKIAPROFILEKEY\naws_secret_access_key = {PROFILE_SECRET}\n"
    )
    env = {**os.environ, **FAKES, "HOME": str(home), "PYTHONPATH": str(REPO)}
    job = tmp_path / "job.yaml"
    job.write_text(JOB)
    run_dir, out = tmp_path / "run", tmp_path / "manifests"
    commands = [
        ["plan", str(job), "--run-dir", str(run_dir)],
        ["submit", str(job), "--run-dir", str(run_dir), "--dry-run"],
        ["submit", str(job), "--run-dir", str(run_dir), "--backend", "slurm", "--dry-run"],
        ["render", str(job), "--backend", "k8s", "-o", str(out)],
        ["submit", str(job), "--run-dir", str(run_dir)],
        ["status", str(run_dir)],
        ["logs", str(run_dir), "seed"],
    ]
    texts: dict[str, bytes] = {}
    for args in commands:
        result = subprocess.run([sys.executable, "-m", "vlcluster.cli", *args], capture_output=True, env=env, cwd=tmp_path, timeout=900)
        texts[" ".join(args[:2])] = result.stdout + result.stderr
        if args[0] == "submit" and "--dry-run" not in args:
            assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()
    files = [p for root in (run_dir, out) for p in root.rglob("*") if p.is_file()]
    texts.update({str(p): p.read_bytes() for p in files})
    kinds = {p.suffix or p.name for p in files}
    assert {".json", ".log", ".safetensors", ".yaml", ".tar", "_SUCCESS"} <= kinds, kinds
    assert any("tfevents" in p.name for p in files)
    secrets = [value.encode() for value in FAKES.values()] + [PROFILE_SECRET.encode(), b"fake-planted-pw-0006"]
    leaks = [(where, secret) for where, data in texts.items() for secret in secrets if secret in data]
    print(f"scanned {len(texts)} artefacts ({len(files)} files), {len(leaks)} leaks")
    assert leaks == []
