"""Stage entry point: ``python -m vlcluster.run RUN_DIR STAGE``.

Every backend starts stages this way (training stages under torchrun). The
stage writes its own done-marker on success, so "done" means the same thing
whichever backend ran it.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Callable

from vlcluster.context import StageContext, load_context

log = logging.getLogger("vlcluster.run")

GATE_CLOSED = 3  # exit status of a merge stage stopped by its mergeability gate


def _run_data(ctx: StageContext) -> None:
    from vlcluster.data.stage import run_data_stage

    run_data_stage(ctx)


def _run_import(ctx: StageContext) -> None:
    from vlcluster.importers.stage import run_import_stage

    run_import_stage(ctx)


def _run_training(ctx: StageContext) -> None:
    from vlcluster.train.loop import run_training

    run_training(ctx)


def _run_merge(ctx: StageContext) -> None:
    from vlcluster.merge.apply import run_merge_stage

    run_merge_stage(ctx)


def _run_grams(ctx: StageContext) -> None:
    from vlcluster.merge.grams import run_grams_stage

    run_grams_stage(ctx)


def _run_metrics(ctx: StageContext) -> None:
    from vlcluster.metrics.stage import run_metrics_stage

    run_metrics_stage(ctx)


def _run_eval(ctx: StageContext) -> None:
    if ctx.spec.task is not None:
        from vlcluster.tasks.task_eval import run_task_eval_stage

        run_task_eval_stage(ctx)
        return
    from vlcluster.tasks.evaluate import run_eval_stage

    run_eval_stage(ctx)


def _run_report(ctx: StageContext) -> None:
    from vlcluster.report import run_report_stage

    run_report_stage(ctx)


RUNNERS: dict[str, Callable[[StageContext], None]] = {
    "data": _run_data,
    "import": _run_import,
    "pretrain": _run_training,
    "finetune": _run_training,
    "grams": _run_grams,
    "merge": _run_merge,
    "metrics": _run_metrics,
    "eval": _run_eval,
    "report": _run_report,
}


def die_with_parent() -> None:
    """On the local backend a stage must not outlive the submitting process
    (a killed `vlcluster submit` would otherwise leave ranks writing
    checkpoints behind the next submit's back)."""
    if os.environ.get("VLCLUSTER_DIE_WITH_PARENT") != "1" or not sys.platform.startswith("linux"):
        return
    import ctypes

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vlcluster.run")
    parser.add_argument("run_dir")
    parser.add_argument("stage")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format=f"[{args.stage}] %(message)s", stream=sys.stdout)
    die_with_parent()
    ctx = load_context(args.run_dir, args.stage)
    runner = RUNNERS.get(ctx.spec.kind)
    if runner is None:
        log.error("stage kind %r has no runner yet", ctx.spec.kind)
        return 2
    from vlcluster.data.quality import BadDataError
    from vlcluster.metrics.gate import GateClosed

    try:
        runner(ctx)
    except GateClosed as exc:
        log.error("%s; stopping here so no fine-tuning is spent on it", exc)
        return GATE_CLOSED
    except BadDataError as exc:  # the message says what to do; a traceback would bury it
        log.error("%s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
