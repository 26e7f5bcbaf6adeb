"""Every stage kind in one table: its spec model, what runs it and how it is started.

A kind is one module, ``vlcluster/stages/<kind>.py``: its spec model (the
fields a job file gives it, the stages it reads), and its runner. Adding a
kind is that module plus one line here; the job-file model
(``jobspec/pipeline.py``) builds its union of stage specs from this table.
Nothing in this module imports torch: the submit path reads it too. Modules
are named by string and imported when first needed.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class StageKind:
    spec: str  # "module:class" of the kind's pydantic spec model (its ``kind`` field is Literal[<the key>])
    runner: str  # "module:function" the stage process calls with its StageContext
    distributed: bool = False  # started under torchrun, one process per rank
    trains: bool = False  # a training stage (train/checkpoint/init settings)
    makes_model: bool = False  # writes a checkpoint other stages may start from or merge
    gathers: bool = False  # reads many stages side by side: a pipeline sweep adds rows to it, never copies it


KINDS: dict[str, StageKind] = {
    "data": StageKind("vlcluster.stages.data:DataStage", "vlcluster.stages.data:run"),
    "import": StageKind("vlcluster.stages.imports:ImportStage", "vlcluster.stages.imports:run"),
    "pretrain": StageKind("vlcluster.stages.train:PretrainStage", "vlcluster.stages.train:run", distributed=True, trains=True, makes_model=True),
    "finetune": StageKind("vlcluster.stages.train:FinetuneStage", "vlcluster.stages.train:run", distributed=True, trains=True, makes_model=True),
    "grams": StageKind("vlcluster.stages.grams:GramsStage", "vlcluster.stages.grams:run", distributed=True),
    "merge": StageKind("vlcluster.stages.merge:MergeStage", "vlcluster.stages.merge:run", makes_model=True),
    "metrics": StageKind("vlcluster.stages.metrics:MetricsStage", "vlcluster.stages.metrics:run"),
    "eval": StageKind("vlcluster.stages.eval:EvalStage", "vlcluster.stages.eval:run"),
    "report": StageKind("vlcluster.stages.report:ReportStage", "vlcluster.stages.report:run", gathers=True),
}

STAGE_KINDS = tuple(KINDS)
TRAINING_KINDS = frozenset(kind for kind, entry in KINDS.items() if entry.trains)
DISTRIBUTED_KINDS = frozenset(kind for kind, entry in KINDS.items() if entry.distributed)
MODEL_KINDS = frozenset(kind for kind, entry in KINDS.items() if entry.makes_model)
GATHERING_KINDS = frozenset(kind for kind, entry in KINDS.items() if entry.gathers)


def named(target: str) -> Any:
    """The object a "module:name" string names, its module imported now."""
    module, name = target.split(":")
    return getattr(importlib.import_module(module), name)


def runner(kind: str) -> Callable:
    """The function that runs a stage of this kind (imported only now: a data
    stage's process never imports the trainer)."""
    return named(KINDS[kind].runner)


def spec_model(kind: str) -> type:
    """The pydantic model of a stage of this kind."""
    return named(KINDS[kind].spec)
