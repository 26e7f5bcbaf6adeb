"""The ``eval`` stage: a model's scores on held-out data, written to result.json."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from vlcluster.stages.context import StageContext

log = logging.getLogger("vlcluster.eval")


def run(ctx: StageContext) -> None:
    if ctx.spec.task is not None:
        run_task(ctx)
    else:
        run_pretraining_tasks(ctx)


def run_task(ctx: StageContext) -> None:
    """One downstream task's metric (tasks/registry.py) on a split of its dataset."""
    from vlcluster.data.quality import DataQuality, check_bad_fraction
    from vlcluster.stages.outputs import finish_stage, read_model
    from vlcluster.stages.task_data import stage_task_data
    from vlcluster.tasks.finetune import task_encoder
    from vlcluster.tasks.registry import get_task
    from vlcluster.tasks.task_eval import evaluate_task, task_model

    spec = ctx.spec
    task = get_task(spec.task)
    where = f"stages.{ctx.name}"
    data = stage_task_data(ctx, task.name)
    urls = data.shards(spec.split, f"{where}.data")
    state, config = read_model(ctx.upstream_dir(spec.source))
    model = task_model(state, config, task, data.info, where)
    quality = DataQuality()
    result = evaluate_task(model, task, data.info, task_encoder(task, data, f"{where}.data"), urls, spec.batch_size, quality)
    check_bad_fraction(quality.bad_total, quality.read, spec.data.max_bad_fraction, final=True)
    result |= {"task": task.name, "split": spec.split, "chance": task.chance(data.info)}
    result["model"] = {"stage": spec.source, "arch": config.arch}
    result["data"] = quality.summary(spec.data.max_bad_fraction)
    log.info("%s on %s: %s", spec.source, task.name, ", ".join(f"{k} {v:.2f}" for k, v in result.items() if isinstance(v, float)))
    finish_stage(ctx, result)


def run_pretraining_tasks(ctx: StageContext) -> None:
    """VQA and retrieval on the validation shards of the pre-training data."""
    from vlcluster.data.quality import DataQuality, check_bad_fraction
    from vlcluster.data.tokenizer import TextEncoder
    from vlcluster.stages.outputs import finish_stage, read_model
    from vlcluster.tasks.evaluate import evaluate, load_model

    spec = ctx.spec
    state, config = read_model(ctx.upstream_dir(spec.source))
    model = load_model(state, config)
    sources = ctx.data_sources(spec.data)
    if not sources.val:
        raise ValueError(f"stages.{ctx.name}.data: no validation shards (data.val)")
    encoder = TextEncoder(sources.tokenizer)
    answers = json.loads(Path(sources.answers).read_text()) if sources.answers else []
    quality = DataQuality()
    result = evaluate(model, encoder, answers, sources.val, spec.tasks, spec.batch_size, quality, sources.fields)
    check_bad_fraction(quality.bad_total, quality.read, spec.data.max_bad_fraction, final=True)
    result["model"] = {"stage": spec.source, "arch": config.arch}
    result["data"] = quality.summary(spec.data.max_bad_fraction)
    log.info("%s: %s", spec.source, ", ".join(f"{k} {v:.2f}" for k, v in result.items() if isinstance(v, float)))
    finish_stage(ctx, result)
