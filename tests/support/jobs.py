"""Job files and overrides the tests share: the quickstart shrunk to seconds
per stage (and its backend variant), small pipelines that fail or stop at a
closed gate, and the two-rank training stage of the fault trials."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from tests.support import REPO
from tests.support.cli import cli

QUICKSTART = str(REPO / "jobs" / "quickstart.yaml")
# Every stage of jobs/quickstart.yaml.
STAGES = ("data", "seed", "vlpt", "merge", "maa", "baseline", "merge_baseline", "ft_merged", "ft_msa", "ft_maa",
          "ft_baseline", "eval_merged", "eval_msa", "eval_maa", "eval_baseline", "table1")
TRAINING_STAGES = ("seed", "vlpt", "maa", "baseline", "ft_merged", "ft_msa", "ft_maa", "ft_baseline")


# The quickstart shrunk to seconds per stage; every stage and code path stays.
# Its training stages run on two ranks here (the job itself gives each stage
# one rank with every core as threads, the faster choice on a small CPU node),
# so the suite goes through torchrun, gloo and FSDP2 across ranks.
SMALL = [
    *(f"stages.{stage}.resources.procs_per_node=2" for stage in TRAINING_STAGES),
    "stages.data.n_train=640",
    "stages.data.shard_size=160",
    "stages.data.n_val=40",
    *(f"stages.{stage}.train.batch_size=16" for stage in TRAINING_STAGES),
    *(f"stages.{stage}.train.log_every=2" for stage in TRAINING_STAGES),
    *(f"stages.{stage}.train.warmup_steps=2" for stage in TRAINING_STAGES),
    "stages.seed.train.steps=4",
    "stages.maa.train.steps=8",
    "stages.baseline.train.steps=8",
    "stages.vlpt.train.steps=24",
    "stages.vlpt.checkpoint.every=4",
    *(f"stages.{stage}.train.steps=3" for stage in ("ft_merged", "ft_msa", "ft_maa", "ft_baseline")),
]


# The backend tests (SLURM, Ray, s3) run the quickstart without the merging-
# baseline and MSA arms: every stage kind still runs (seed -> vlpt -> merge ->
# fine-tune -> eval -> report, and MAA beside them); the two arms only add time.
BACKEND_DROPPED = ("baseline", "merge_baseline", "ft_baseline", "eval_baseline", "ft_msa", "eval_msa")
BACKEND_STAGES = tuple(stage for stage in STAGES if stage not in BACKEND_DROPPED)
BACKEND_SMALL = [override for override in SMALL if override.split(".")[1] not in BACKEND_DROPPED]


def write_backend_quickstart(directory: Path) -> str:
    """jobs/quickstart.yaml without the BACKEND_DROPPED arms, as a job file in `directory`."""
    spec = yaml.safe_load(Path(QUICKSTART).read_text())
    spec = {key: value for key, value in spec.items() if not key.startswith("x-")}  # anchors, now resolved
    for stage in BACKEND_DROPPED:
        del spec["stages"][stage]
    spec["stages"]["table1"]["rows"] = {"MAA": "eval_maa", "merged": "eval_merged"}
    path = directory / "quickstart.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return str(path)


FAILING = """
name: failing
stages:
  data: {kind: data, n_train: 64, n_val: 16, shard_size: 32}
  seed:
    kind: pretrain
    data: {from: data}
    train: {steps: 2, batch_size: 8}
    resources: {procs_per_node: 2}
  vqa_on_pretrained: {kind: eval, source: seed, data: {from: data}, tasks: [vqa]}
  table: {kind: report, rows: {seed: vqa_on_pretrained}}
"""


GOOD = """
name: c
stages:
  data: {kind: data, n_train: 64, n_val: 16, shard_size: 32}
  seed: {kind: pretrain, data: {from: data}, train: {steps: 2}}
  vlpt: {kind: pretrain, model: {arch: specific}, init: {from: seed}, data: {from: data}, train: {steps: 2}}
"""


# A merge whose gate always closes (SSD of two differently trained experts is
# above 0), and a stage after it: the smallest pipeline that shows `gated`.
GATED = """
name: gated
stages:
  data: {kind: data, n_train: 32, n_val: 8, shard_size: 16}
  vlpt:
    kind: pretrain
    model: {arch: specific}
    data: {from: data}
    train: {steps: 2, batch_size: 4, log_every: 1}
  merge: {kind: merge, source: vlpt, gate: {metric: ssd, max: 0.0}}
  after_merge: {kind: data, n_train: 16, n_val: 8, shard_size: 16, after: [merge]}
"""


def assert_gated_status(run_dir) -> None:
    """`vlcluster status` shows the closed gate and what it blocked (one line per stage)."""
    status = cli("status", str(run_dir), env={"COLUMNS": "400"}).stdout
    rows = {line.split("│")[1].strip(): line for line in status.splitlines() if line.count("│") > 3}
    assert " done " in rows["vlpt"], status
    assert " gated " in rows["merge"] and "mergeability gate closed: ssd" in rows["merge"], status
    assert " blocked " in rows["after_merge"] and "upstream gated: merge" in rows["after_merge"], status
    assert not (run_dir / "after_merge" / "_SUCCESS").exists()
    progress = json.loads((run_dir / "vlpt" / "progress.json").read_text())  # the trainer's record, any backend
    assert (progress["step"], progress["steps"]) == (2, 2) and progress["samples_per_s"] > 0


# A two-rank training stage small enough for fault trials: 6 steps, a
# checkpoint every 2 (tests/faults/, test_slurm.py, test_ray.py).
TINY_TRAINING_JOB = """
name: faults
stages:
  data: {kind: data, n_train: 64, n_val: 16, shard_size: 32, image_size: 16}
  seed:
    kind: pretrain
    model: {image_size: 16}
    data: {from: data}
    train: {steps: 6, batch_size: 8, log_every: 1}
    checkpoint: {every: 2, keep: 3}
    resources: {procs_per_node: 2}
"""
