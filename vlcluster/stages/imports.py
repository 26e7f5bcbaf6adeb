"""The ``import`` stage: a real dataset -> task shards + dataset.json in the stage directory.

The module is ``imports``, not ``import``: a module named after a Python
keyword cannot be imported with an import statement.
"""

from __future__ import annotations

from vlcluster.importers.common import ImportOptions
from vlcluster.importers.registry import run_import
from vlcluster.stages.context import StageContext
from vlcluster.stages.outputs import finish_stage


def run(ctx: StageContext) -> None:
    spec = ctx.spec
    tokenizer = spec.tokenizer
    if isinstance(tokenizer, dict) or hasattr(tokenizer, "from_"):
        tokenizer = str(ctx.upstream_dir(tokenizer.from_).root / "tokenizer.json")
    options = ImportOptions(
        out=str(ctx.dir.root), shard_size=spec.shard_size, image_size=spec.image_size, tokenizer=tokenizer,
        max_bad_fraction=spec.max_bad_fraction, max_answers=spec.max_answers,
    )
    finish_stage(ctx, run_import(spec.format, spec.inputs, options))
