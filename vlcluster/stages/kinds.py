"""Every stage kind in one table: what runs it and how it is started.

A new kind is its spec model (a member of the ``Stage`` union in
``models.py``, checked against this table at import) plus one line here.
Nothing in this module imports torch: the submit path reads it too.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class StageKind:
    runner: str  # "module:function" the stage process calls with its StageContext
    distributed: bool = False  # started under torchrun, one process per rank
    trains: bool = False  # a training stage (train/checkpoint/init settings)
    makes_model: bool = False  # writes a checkpoint other stages may start from or merge
    gathers: bool = False  # reads many stages side by side: a pipeline sweep adds rows to it, never copies it


KINDS: dict[str, StageKind] = {
    "data": StageKind("vlcluster.stages.data:run"),
    "import": StageKind("vlcluster.stages.imports:run"),
    "pretrain": StageKind("vlcluster.stages.train:run", distributed=True, trains=True, makes_model=True),
    "finetune": StageKind("vlcluster.stages.train:run", distributed=True, trains=True, makes_model=True),
    "grams": StageKind("vlcluster.stages.grams:run", distributed=True),
    "merge": StageKind("vlcluster.stages.merge:run", makes_model=True),
    "metrics": StageKind("vlcluster.stages.metrics:run"),
    "eval": StageKind("vlcluster.stages.eval:run"),
    "report": StageKind("vlcluster.stages.report:run", gathers=True),
}

STAGE_KINDS = tuple(KINDS)
TRAINING_KINDS = frozenset(kind for kind, entry in KINDS.items() if entry.trains)
DISTRIBUTED_KINDS = frozenset(kind for kind, entry in KINDS.items() if entry.distributed)
MODEL_KINDS = frozenset(kind for kind, entry in KINDS.items() if entry.makes_model)
GATHERING_KINDS = frozenset(kind for kind, entry in KINDS.items() if entry.gathers)


def runner(kind: str) -> Callable:
    """The function that runs a stage of this kind (imported only now: a data
    stage's process never imports the trainer)."""
    module, function = KINDS[kind].runner.split(":")
    return getattr(importlib.import_module(module), function)
