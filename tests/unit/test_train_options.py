"""Job-file side of the training speed options: validation of
micro_batch_size, data.num_workers: auto, and which options change a stage's identity."""

from __future__ import annotations

import pytest

from vlcluster.data.loader import MAX_AUTO_WORKERS, resolve_workers
from vlcluster.graph import build_graph
from vlcluster.errors import SpecError
from vlcluster.jobspec.load import validate

STAGE = {
    "kind": "pretrain",
    "data": {"train": "shards/train-{000000..000099}.tar", "tokenizer": "tok.json"},
    "train": {"steps": 10, "batch_size": 86},
    "resources": {"procs_per_node": 4},
}


def pipeline(**train):
    stage = {**STAGE, "train": {**STAGE["train"], **train}}
    return validate({"name": "p", "stages": {"seed": stage}}, "job.yaml")


def test_micro_batches_too_small_for_itc_are_one_clear_error():
    assert pipeline(micro_batch_size=8).stages["seed"].train.micro_batch_size == 8
    with pytest.raises(SpecError) as error:
        pipeline(micro_batch_size=2)  # 86 over 4 ranks = 22/21 per rank: 11 micro-batches, some of 1 sample
    message = str(error.value)
    assert "job.yaml" in message and "micro_batch_size" in message and "raise micro_batch_size or batch_size" in message
    assert "Traceback" not in message


def test_speed_options_keep_the_stage_identity_but_micro_batches_change_it():
    plain = build_graph(pipeline()).hashes["seed"]
    assert build_graph(pipeline(compile=True, activation_checkpointing=True)).hashes["seed"] == plain
    assert build_graph(pipeline(micro_batch_size=8)).hashes["seed"] != plain  # ITC negatives per micro-batch
    assert build_graph(pipeline(precision="fp16")).hashes["seed"] != plain


def test_auto_workers_share_the_node_cpus_among_ranks():
    assert resolve_workers("auto", cpus_per_node=80, ranks_per_node=8, shards=10000, world_size=48) == 8  # 10 CPUs/rank, capped
    assert resolve_workers("auto", cpus_per_node=32, ranks_per_node=8, shards=10000, world_size=48) == 3  # 4 per rank, 1 for the rank
    assert resolve_workers("auto", cpus_per_node=2, ranks_per_node=2, shards=8, world_size=2) == 0  # decode in the rank
    assert resolve_workers("auto", cpus_per_node=64, ranks_per_node=1, shards=8, world_size=2) == 8  # workers share shards
    assert 0 <= resolve_workers("auto", None, 1, shards=1000, world_size=1) <= MAX_AUTO_WORKERS  # this machine's CPUs
    assert resolve_workers(3, cpus_per_node=2, ranks_per_node=2, shards=8, world_size=2) == 3  # a number is kept


def test_num_workers_takes_auto_or_a_count():
    stage = {**STAGE, "data": {**STAGE["data"], "num_workers": "auto"}}
    assert validate({"name": "p", "stages": {"seed": stage}}, "job.yaml").stages["seed"].data.num_workers == "auto"
    stage["data"]["num_workers"] = -1
    with pytest.raises(SpecError):
        validate({"name": "p", "stages": {"seed": stage}}, "job.yaml")
