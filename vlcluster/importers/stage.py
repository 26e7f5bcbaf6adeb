"""The ``import`` stage and ``vlcluster import``: a real dataset -> task shards + dataset.json."""

from __future__ import annotations

import logging
import time

from vlcluster.importers.common import ImportOptions
from vlcluster.importers.registry import FORMATS

log = logging.getLogger("vlcluster.import")


def run_import(fmt: str, inputs: dict, options: ImportOptions) -> dict:
    spec = FORMATS[fmt]
    arguments = {i.name: ([inputs[i.name]] if isinstance(inputs[i.name], str) else list(inputs[i.name])) if i.many else inputs[i.name]
                 for i in spec.inputs if i.name in inputs}
    started = time.perf_counter()
    record = spec.run(options, **arguments)
    return {**record, "seconds": time.perf_counter() - started}


def run_import_stage(ctx) -> None:
    from vlcluster.stages.outputs import finish_stage

    spec = ctx.spec
    tokenizer = spec.tokenizer
    if isinstance(tokenizer, dict) or hasattr(tokenizer, "from_"):
        tokenizer = str(ctx.upstream_dir(tokenizer.from_).root / "tokenizer.json")
    options = ImportOptions(
        out=str(ctx.dir.root), shard_size=spec.shard_size, image_size=spec.image_size, tokenizer=tokenizer,
        max_bad_fraction=spec.max_bad_fraction, max_answers=spec.max_answers,
    )
    finish_stage(ctx, run_import(spec.format, spec.inputs, options))
