"""Real corpora end to end through the CLI and torchrun: a weighted mixture of
two img2dataset-layout sources killed and resumed exactly; and the recipe
(seed -> VL -> merge -> retrieval eval) on shards written by img2dataset
itself (jpg, png and webp; a val set with 5 captions per image) with a BERT
WordPiece tokenizer.json."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.realdata import bert_wordpiece_tokenizer, write_img2dataset_shards
from tests.test_e2e import live_processes_mentioning
from tests.test_e2e_loader import recorded, run, submit
from tests.test_realdata import scene

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
    with open(tmp_path / "first.log", "w") as log:
        process = submit(str(job_file), run_dir, tmp_path / "keys-first", stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 300
        while len(recorded(tmp_path / "keys-first", 0)) < kill_after:
            assert process.poll() is None, (tmp_path / "first.log").read_text()
            assert time.monotonic() < deadline, "training did not reach the kill step"
            time.sleep(0.05)
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    deadline = time.monotonic() + 20
    while live_processes_mentioning(str(run_dir)) and time.monotonic() < deadline:
        time.sleep(0.2)
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
