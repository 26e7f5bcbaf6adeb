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

from vlcluster.errors import EXIT_FAILED, EXIT_OK, GATE_CLOSED
from vlcluster.stages.context import load_context
from vlcluster.stages.kinds import runner

log = logging.getLogger("vlcluster.run")


def die_with_parent() -> None:
    """On the local backend a stage must not outlive the submitting process
    (a killed `vlcluster submit` would otherwise leave ranks writing
    checkpoints behind the next submit's back)."""
    from vlcluster.backends import stage_process

    if os.environ.get(stage_process.DIE_WITH_PARENT_ENV) == "1":
        stage_process.die_with_parent(signal.SIGKILL)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vlcluster.run")
    parser.add_argument("run_dir")
    parser.add_argument("stage")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format=f"[{args.stage}] %(message)s", stream=sys.stdout)
    die_with_parent()
    ctx = load_context(args.run_dir, args.stage)
    run_stage = runner(ctx.spec.kind)  # stages/kinds.py: one table of kinds and their runners
    from vlcluster.data.quality import BadDataError
    from vlcluster.failure import note_failure, said_in_one_paragraph
    from vlcluster.metrics.gate import GateClosed

    from vlcluster.tracking import stage_tracking

    try:
        with stage_tracking(ctx):  # W&B / MLflow when the job file has `tracking:` (rank 0)
            run_stage(ctx)
    except GateClosed as exc:
        log.error("%s; stopping here so no fine-tuning is spent on it", exc)
        return GATE_CLOSED
    except BadDataError as exc:  # the message says what to do; a traceback would bury it
        note_failure(ctx.dir, exc)
        log.error("%s", exc)
        return EXIT_FAILED
    except Exception as exc:
        # the record for `status` first: on a full disk it may fit once the stage's temp files are gone
        named = note_failure(ctx.dir, exc, str(ctx.run_dir))
        if said_in_one_paragraph(named):  # a full disk, a store that stayed down: the paragraph says what to do
            log.error("%s", named[1])
            return EXIT_FAILED
        raise
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
