"""Real corpora end to end through the CLI and torchrun: a weighted mixture of
two img2dataset-layout sources killed and resumed exactly; and the recipe
(seed -> VL -> merge -> retrieval eval) on shards written by img2dataset
itself (jpg, png and webp; a val set with 5 captions per image) with a BERT
WordPiece tokenizer.json."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.support.keys import recorded, run, submit_then_kill
from tests.support.realdata import bert_wordpiece_tokenizer, scene, write_img2dataset_shards

pytestmark = pytest.mark.slow

STEPS = 8
MIXTURE_JOB = """
name: mixture
stages:
  train:
    kind: pretrain
    model: {{size: tiny, arch: agnostic, image_size: 16}}
    data:
      train:
        - {{shards: "{data}/jpg/{{00000..00003}}.tar", weight: 3}}
        - {{shards: "{data}/png/{{00010..00011}}.tar", weight: 1}}
      tokenizer: {data}/tokenizer.json
      shuffle_buffer: 8
    train: {{steps: {steps}, batch_size: 16, log_every: 2, warmup_steps: 2}}
    checkpoint: {{every: 2, keep: 2}}
    resources: {{procs_per_node: 2}}
"""


@pytest.fixture(scope="module")
def mixture_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("mixture")
    write_img2dataset_shards(root / "jpg", [scene(i, 1) for i in range(32)], per_shard=8, encode_format="jpg")
    png = [scene(500 + i, 5) for i in range(16)]
    write_img2dataset_shards(root / "png", png, per_shard=8, encode_format="png", first_shard=10)
    bert_wordpiece_tokenizer(root / "tokenizer.json", [scene(i, 5)[1] for i in list(range(32)) + list(range(500, 516))])
    return root


def test_a_mixture_killed_and_resumed_trains_on_the_same_samples(mixture_data, tmp_path) -> None:
    job_file = tmp_path / "mixture.yaml"
    job_file.write_text(MIXTURE_JOB.format(data=mixture_data, steps=STEPS))
    reference_run = tmp_path / "reference"
    run(str(job_file), reference_run, tmp_path / "keys-reference")
    keys = [key for rank in (0, 1) for _, batch in recorded(tmp_path / "keys-reference", rank) for key in batch]
    from_png = sum(key.startswith("0001") for key in keys) / len(keys)
    print(f"mixture 3:1 over {len(keys)} samples: {1 - from_png:.3f} from the first source")
    assert 0 < from_png < 0.5

    kill_after = random.randint(3, STEPS - 2)
    run_dir = tmp_path / "run"
    submit_then_kill(str(job_file), run_dir, tmp_path / "keys-first", kill_after, tmp_path / "first.log")
    output = run(str(job_file), run_dir, tmp_path / "keys-resumed")
    resumed_from = int(output.split("resuming from checkpoint step_")[1][:8])
    for rank in (0, 1):
        expected = recorded(tmp_path / "keys-reference", rank)
        first = recorded(tmp_path / "keys-first", rank)
        second = recorded(tmp_path / "keys-resumed", rank)
        assert [keys for step, keys in first if step <= resumed_from] + [keys for _, keys in second] == [keys for _, keys in expected]
    reference = load_file(str(reference_run / "train" / "model.safetensors"))
    resumed = load_file(str(run_dir / "train" / "model.safetensors"))
    assert all(torch.equal(reference[key], resumed[key]) for key in reference)


# ------------------------------------------- the recipe on img2dataset's own shards

IMG2DATASET = "img2dataset==1.47.0"
PIPELINE_JOB = """
name: realdata
x-data: &data
  train: ["{shards}/jpg/*.tar", "{shards}/png/*.tar", "{shards}/webp/*.tar"]
  val: "{shards}/val/*.tar"
  tokenizer: {shards}/tokenizer.json
  shuffle_buffer: 8
x-train: &train {{steps: 7, batch_size: 8, log_every: 2, warmup_steps: 1}}  # 56 samples: every one of the 48 read
stages:
  seed:
    kind: pretrain
    model: {{size: tiny, arch: agnostic, image_size: 32}}
    data: *data
    train: *train
  vlpt:
    kind: pretrain
    model: {{size: tiny, arch: specific, image_size: 32}}
    init: {{from: seed}}
    data: *data
    train: *train
  merge: {{kind: merge, source: vlpt, method: interpolation, alpha: 0.5}}
  eval: {{kind: eval, source: merge, data: *data, tasks: [retrieval], batch_size: 8}}
"""


@pytest.fixture(scope="session")
def img2dataset(request) -> str:
    """The img2dataset command: $VLCLUSTER_IMG2DATASET, or installed once into its own
    venv under pytest's cache (~3 min on 2 busy cores; its dependencies clash with ours)."""
    given = os.environ.get("VLCLUSTER_IMG2DATASET")
    if given:
        return given
    venv = request.config.cache.mkdir("img2dataset-1.47.0")
    command = venv / "bin" / "img2dataset"
    if not command.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        install = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", IMG2DATASET], capture_output=True, text=True)
        if install.returncode != 0:
            pytest.skip(f"cannot install {IMG2DATASET} (no package index?): {install.stderr[-500:]}")
    return str(command)


class ImageServer:
    """``python3 -m http.server`` on 127.0.0.1 serving a folder, as img2dataset's image source."""

    def __init__(self, folder: Path) -> None:
        from vlcluster.ports import free_ports

        self.port = free_ports(1)[0]
        self.process = subprocess.Popen(
            [sys.executable, "-m", "http.server", str(self.port), "--bind", "127.0.0.1", "--directory", str(folder)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        import urllib.request

        deadline = time.monotonic() + 20
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.port}/", timeout=1).close()
                return
            except OSError:
                assert time.monotonic() < deadline, "the image server did not start"
                time.sleep(0.1)

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.port}/{name}"

    def close(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)


SPLITS = {"jpg": (0, 16, 1), "png": (100, 16, 1), "webp": (200, 16, 1), "val": (900, 12, 5)}  # first scene, images, captions


@pytest.fixture(scope="module")
def img2dataset_shards(tmp_path_factory, img2dataset) -> Path:
    root = tmp_path_factory.mktemp("img2dataset-real")
    images = root / "images"
    images.mkdir()
    server = ImageServer(images)
    try:
        processes = []
        for split, (first, count, captions) in SPLITS.items():
            rows = []
            for index in range(first, first + count):
                image, text = scene(index, captions)
                image.save(images / f"{index}.png")
                rows.append({"url": server.url(f"{index}.png"), "caption": text})
            rows.append({"url": server.url("missing.png"), "caption": "a failed download, left out of the shards"})
            (root / f"{split}.json").write_text(json.dumps(rows))
            encode = "png" if split == "png" else "webp" if split == "webp" else "jpg"
            processes.append(subprocess.Popen(
                [img2dataset, "--url_list", str(root / f"{split}.json"), "--input_format", "json",
                 "--url_col", "url", "--caption_col", "caption", "--output_format", "webdataset",
                 "--output_folder", str(root / "shards" / split), "--processes_count", "1", "--thread_count", "4",
                 "--image_size", "32", "--resize_mode", "center_crop", "--encode_format", encode,
                 *(["--encode_quality", "9"] if encode == "png" else []),
                 "--number_sample_per_shard", "6", "--enable_wandb", "False"],
                env={**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            ))
        for process in processes:
            output, _ = process.communicate(timeout=600)
            assert process.returncode == 0, output
    finally:
        server.close()
    captions = [scene(i, c)[1] for first, count, c in SPLITS.values() for i in range(first, first + count)]
    bert_wordpiece_tokenizer(root / "shards" / "tokenizer.json", captions)
    return root / "shards"


@pytest.fixture(scope="module")
def layout_shards(tmp_path_factory) -> Path:
    """The same splits in img2dataset's exact layout, written by tests/support/realdata.py (no tool, no network)."""
    root = tmp_path_factory.mktemp("img2dataset-layout") / "shards"
    for split, (first, count, captions) in SPLITS.items():
        encode = "png" if split == "png" else "webp" if split == "webp" else "jpg"
        samples = [scene(index, captions) for index in range(first, first + count)]
        write_img2dataset_shards(root / split, samples, per_shard=6, encode_format=encode)
    captions = [scene(i, c)[1] for first, count, c in SPLITS.values() for i in range(first, first + count)]
    bert_wordpiece_tokenizer(root / "tokenizer.json", captions)
    return root


@pytest.mark.heavy  # installs and runs img2dataset itself; the layout variant below runs by default
def test_recipe_on_img2dataset_shards_with_a_wordpiece_tokenizer(img2dataset_shards, tmp_path) -> None:
    shards = img2dataset_shards
    for split in SPLITS:
        tars = sorted((shards / split).glob("*.tar"))
        assert tars and all(t.with_suffix(".parquet").exists() and (t.parent / f"{t.stem}_stats.json").exists() for t in tars)
        indexed = subprocess.run([sys.executable, "-m", "vlcluster.cli", "index", str(shards / split) + "/", "-o",
                                  str(tmp_path / f"{split}.vlindex")], capture_output=True, text=True, timeout=120)
        assert indexed.returncode == 0 and "warning" not in indexed.stderr, indexed.stderr  # the tool's own counts agree
    run_recipe(shards, tmp_path)


def test_recipe_on_img2dataset_layout_shards_with_a_wordpiece_tokenizer(layout_shards, tmp_path) -> None:
    run_recipe(layout_shards, tmp_path)


def run_recipe(shards: Path, tmp_path: Path) -> None:
    """seed -> VL -> merge -> retrieval eval on jpg, png and webp shards and a 5-captions-per-image val set."""
    job = tmp_path / "realdata.yaml"
    job.write_text(PIPELINE_JOB.format(shards=shards))
    run_dir = tmp_path / "run"
    process = subprocess.run(
        [sys.executable, "-m", "vlcluster.cli", "submit", str(job), "--run-dir", str(run_dir)],
        capture_output=True, text=True, timeout=900,
    )
    assert process.returncode == 0, process.stdout + process.stderr
    for stage in ("seed", "vlpt"):
        data = json.loads((run_dir / stage / "result.json").read_text())["data"]
        assert data["bad_samples"] == 0 and data["samples_read"] == 7 * 8
    result = json.loads((run_dir / "eval" / "result.json").read_text())
    print("retrieval on img2dataset val (12 images x 5 captions):", {k: round(v, 1) for k, v in result.items() if k[:2] in ("tr", "ir")})
    assert result["data"]["bad_samples"] == 0 and result["data"]["samples_read"] == 12
    assert result["retrieval_pairs"] == 12 and result["retrieval_captions"] == 60
    assert all(0 <= result[key] <= 100 for key in ("tr_r1", "tr_r5", "tr_r10", "tr", "ir_r1", "ir_r5", "ir_r10", "ir"))
