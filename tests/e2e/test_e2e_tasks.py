"""End to end through the real CLI and torchrun: every importer's output (tiny files in
the official formats) is fine-tuned and evaluated by task stages, next to a synthetic
task fine-tuned at a higher resolution than pre-training, and one report joins them."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from tests.support import task_formats
from tests.support import REPO
from vlcluster.stages.outputs import read_result
from vlcluster.stages.rundir import stage_dir

pytestmark = pytest.mark.slow

TASK_OF = {"vqa2": "vqa", "karpathy": "retrieval", "nlvr2": "nlvr2", "imagefolder": "classification", "ade20k": "segmentation"}


def job(tmp_path) -> str:
    vqa = task_formats.write_vqa2(tmp_path / "vqa")
    coco = task_formats.write_karpathy(tmp_path / "coco")
    nlvr2 = task_formats.write_nlvr2(tmp_path / "nlvr2")
    folder = task_formats.write_imagefolder(tmp_path / "imagenet")
    ade = task_formats.write_ade20k(tmp_path / "ade")
    (tq, ta), (vq, va) = vqa["files"]["train2014"], vqa["files"]["val2014"]
    inputs = {
        "vqa2": {"questions": [str(tq), str(vq)], "annotations": [str(ta), str(va)], "images": str(vqa["images"])},
        "karpathy": {"split_json": str(coco["split_json"]), "images": str(coco["images"])},
        "nlvr2": {"jsonl": [str(p) for p in nlvr2["jsonl"]], "images": str(nlvr2["images"])},
        "imagefolder": {"root": str(folder["root"]), "class_index": str(folder["class_index"])},
        "ade20k": {"root": str(ade["root"])},
    }
    stages = ""
    for fmt, task in TASK_OF.items():
        stages += textwrap.dedent(f"""
          in_{fmt}:
            kind: import
            format: {fmt}
            inputs: {json.dumps(inputs[fmt])}
            tokenizer: {{from: data}}
            image_size: 32
            max_answers: 4
            max_bad_fraction: 0.5
          ft_{fmt}: {{kind: finetune, task: {task}, init: {{from: seed}}, data: {{from: in_{fmt}}}, train: *ft, resources: *one}}
          eval_{fmt}: {{kind: eval, tasks: [{task}], source: ft_{fmt}, data: {{from: in_{fmt}}}}}
        """)
    text = textwrap.dedent("""
        name: tasks_e2e
        x-one: &one {nodes: 1, procs_per_node: 1}
        x-ft: &ft {steps: 3, batch_size: 2, warmup_steps: 1, log_every: 1}
        stages:
          data: {kind: data, n_train: 256, n_val: 32, shard_size: 128, tasks: [nlvr2], task_n_train: 64, task_n_val: 32}
          seed:
            kind: pretrain
            data: {from: data}
            train: {steps: 3, batch_size: 8, log_every: 1}
            resources: *one
          ft_nlvr2_48px:
            kind: finetune
            task: nlvr2
            model: {image_size: 48}
            init: {from: seed}
            data: {from: data}
            train: {steps: 3, batch_size: 4, log_every: 1}
            resources: *one
          eval_nlvr2_48px: {kind: eval, tasks: [nlvr2], source: ft_nlvr2_48px, data: {from: data}}
    """) + textwrap.indent(stages, "  ") + textwrap.indent(textwrap.dedent("""
        table:
          kind: report
          rows:
            imported: [eval_vqa2, eval_karpathy, eval_nlvr2, eval_imagefolder, eval_ade20k]
            synthetic: [eval_nlvr2_48px]
    """), "  ")
    path = tmp_path / "tasks_e2e.yaml"
    path.write_text(text)
    return str(path)


def test_every_importer_feeds_a_fine_tune_and_an_eval(tmp_path):
    run_dir = tmp_path / "run"
    result = subprocess.run([sys.executable, "-m", "vlcluster.cli", "submit", job(tmp_path), "--run-dir", str(run_dir)],
                            capture_output=True, text=True, timeout=1500, cwd=REPO)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    metric = {"vqa": "vqa_acc", "retrieval": "tr", "nlvr2": "nlvr2_acc", "classification": "top1", "segmentation": "miou"}
    for fmt, task in TASK_OF.items():
        evaluated = read_result(stage_dir(run_dir, f"eval_{fmt}"))
        assert evaluated["task"] == task and 0 <= evaluated[metric[task]] <= 100, evaluated
        assert evaluated["data"]["bad_samples"] == 0 and evaluated["data"]["samples_read"] > 0
        imported = read_result(stage_dir(run_dir, f"in_{fmt}"))
        assert imported["bad"], f"{fmt}: the planted bad entries were not reported"
    high = read_result(stage_dir(run_dir, "eval_nlvr2_48px"))
    assert high["examples"] == 32
    config = json.loads((stage_dir(run_dir, "ft_nlvr2_48px").root / "model.json").read_text())["config"]
    assert config["image_size"] == 48
    table = (stage_dir(run_dir, "table").root / "report.md").read_text()
    assert "NLVR2 acc" in table and "mIoU" in table and "top-1" in table
