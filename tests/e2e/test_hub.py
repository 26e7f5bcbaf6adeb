"""``hf://`` Hub references for ``init.checkpoint`` and ``data.tokenizer``,
read from a cache laid out as huggingface_hub lays it (blobs, snapshots of
symlinks, refs) with ``HF_HUB_OFFLINE=1``: resolved and pinned to their commit
once at submit, read from the cache by the stage's ranks."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.beit import saved_beit
from vlcluster.hub import HubRef
from vlcluster.errors import SpecError

REPO = Path(__file__).resolve().parents[2]
BEIT_COMMIT = "0123456789abcdef0123456789abcdef01234567"
TOKENIZER_COMMIT = "89abcdef0123456789abcdef0123456789abcdef"

HUB_JOB = """
name: hub_init
stages:
  seed:
    kind: pretrain
    model: {{arch: specific, size: tiny, dim: 64, depth: 2, heads: 4, patch_size: 8, image_size: 32, layer_scale: 0.1}}
    init: {{checkpoint: "{checkpoint}", format: beit}}
    data: {{train: "{data}/train-000000.tar", val: "{data}/val-000000.tar", tokenizer: "{tokenizer}"}}
    train: {{steps: 1, batch_size: 8, log_every: 1}}
"""


def cache_model(cache: Path, repo_id: str, commit: str, files: dict[str, bytes]) -> None:
    """huggingface_hub's cache layout: blobs/<sha256>, snapshots/<commit>/<file> -> ../../blobs/<sha256>, refs/main."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "blobs").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name, content in files.items():
        digest = hashlib.sha256(content).hexdigest()
        (repo / "blobs" / digest).write_bytes(content)
        (snapshot / name).symlink_to(Path("..") / ".." / "blobs" / digest)


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory) -> tuple[Path, Path]:
    """(HF_HUB_CACHE with a random-weight BEiT and a tokenizer, the shards the job reads)."""
    root = tmp_path_factory.mktemp("hub")
    beit = root / "beit"
    saved_beit(beit)
    data = root / "data"
    made = subprocess.run([sys.executable, "-m", "vlcluster.cli", "data", str(data), "--n-train", "16", "--n-val", "8",
                           "--shard-size", "16", "--image-size", "32"], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert made.returncode == 0, made.stderr
    cache = root / "cache"
    cache_model(cache, "test-org/beit-tiny", BEIT_COMMIT, {name: (beit / name).read_bytes() for name in ("config.json", "model.safetensors")})
    cache_model(cache, "bert-base-uncased", TOKENIZER_COMMIT, {"tokenizer.json": (data / "tokenizer.json").read_bytes()})
    return cache, data


def submit_offline(cache: Path, job: Path, run_dir: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "vlcluster.cli", "submit", str(job), "--run-dir", str(run_dir)],
                          capture_output=True, text=True, timeout=600, cwd=REPO, env=env)


def test_pretraining_inits_from_hub_ids_offline_and_records_the_commit(hub_cache, tmp_path):
    cache, data = hub_cache
    job = tmp_path / "job.yaml"
    job.write_text(HUB_JOB.format(checkpoint="hf://test-org/beit-tiny", tokenizer="hf://bert-base-uncased", data=data))
    result = submit_offline(cache, job, tmp_path / "run")
    assert result.returncode == 0, result.stdout + result.stderr
    record = json.loads((tmp_path / "run" / "pipeline.json").read_text())
    seed = record["pipeline"]["stages"]["seed"]
    assert seed["init"]["checkpoint"] == f"hf://test-org/beit-tiny@{BEIT_COMMIT}"
    assert seed["data"]["tokenizer"] == f"hf://bert-base-uncased@{TOKENIZER_COMMIT}"
    log = (tmp_path / "run" / "seed" / "logs").glob("*") if (tmp_path / "run" / "seed" / "logs").is_dir() else []
    assert "initialised from checkpoint" in result.stdout + "".join(p.read_text() for p in log)

    # the same job pinned by hand to the same commit: the same stage hash (the commit is what is hashed)
    pinned = tmp_path / "pinned.yaml"
    pinned.write_text(HUB_JOB.format(checkpoint=f"hf://test-org/beit-tiny@{BEIT_COMMIT}", tokenizer=f"hf://bert-base-uncased@{TOKENIZER_COMMIT}", data=data))
    again = submit_offline(cache, pinned, tmp_path / "run")
    assert again.returncode == 0 and json.loads((tmp_path / "run" / "pipeline.json").read_text())["hashes"] == record["hashes"]


def test_a_missing_hub_id_is_one_paragraph(hub_cache, tmp_path):
    cache, data = hub_cache
    job = tmp_path / "job.yaml"
    job.write_text(HUB_JOB.format(checkpoint="hf://test-org/no-such-model", tokenizer="hf://bert-base-uncased", data=data))
    result = submit_offline(cache, job, tmp_path / "run")
    err = " ".join(result.stderr.split())
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "stages.seed.init.checkpoint: hf://test-org/no-such-model: not in the Hugging Face cache" in err and "HF_HUB_OFFLINE" in err
    assert not (tmp_path / "run" / "pipeline.json").exists()


@pytest.mark.parametrize("value", ["hf://", "hf://org/name@", "hf://a/b/c", "hf://org/na me"])
def test_malformed_hub_references(value):
    with pytest.raises(SpecError, match="not a Hub reference"):
        HubRef.parse(value, "stages.x.init.checkpoint")
    assert str(HubRef.parse("hf://org/name@v1.0", "f")) == "hf://org/name@v1.0"
