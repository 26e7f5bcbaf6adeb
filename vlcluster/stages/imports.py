"""The ``import`` stage: a real dataset -> task shards + dataset.json in the stage directory.

The module is ``imports``, not ``import``: a module named after a Python
keyword cannot be imported with an import statement.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import Field, model_validator

from vlcluster.importers.registry import FORMATS as IMPORT_FORMATS, check_inputs
from vlcluster.jobspec.models import StageBase, StageRef
from vlcluster.jobspec.references import Reference
from vlcluster.stages.outputs import finish_stage

if TYPE_CHECKING:
    from vlcluster.stages.context import StageContext


class ImportStage(StageBase):
    """A downstream dataset in its real on-disk format -> task shards + dataset.json
    (``vlcluster import`` does the same from the command line)."""

    kind: Literal["import"]
    format: Literal[tuple(IMPORT_FORMATS)]
    inputs: dict[str, str | list[str]] = Field(description="the format's inputs, e.g. {questions: [...], annotations: [...], images: DIR}")
    tokenizer: str | StageRef | None = Field(
        None, description="tokenizer.json shipped with the data (a path, or {from: STAGE} for a data stage's); "
        "default: a word-level one built from the texts. Fine-tuning needs the pre-training tokenizer"
    )
    image_size: int | None = Field(None, gt=0, description="resize images (square) while importing; default: keep the files")
    shard_size: int = Field(1000, gt=0)
    max_answers: int = Field(3129, gt=0, description="vqa2: size of the answer vocabulary")
    max_bad_fraction: float = Field(0.05, ge=0, le=1, description="fail when more of the entries are bad")

    @model_validator(mode="after")
    def _inputs_fit_format(self) -> ImportStage:
        problems = check_inputs(self.format, self.inputs)
        if problems:
            raise ValueError("inputs: " + "; ".join(problems))
        return self

    def references(self) -> list[Reference]:
        tokenizer = self.tokenizer
        return [] if tokenizer is None or isinstance(tokenizer, str) else [Reference("tokenizer.from", tokenizer.from_, frozenset({"data"}))]



def run(ctx: StageContext) -> None:
    from vlcluster.importers.common import ImportOptions
    from vlcluster.importers.registry import run_import

    spec = ctx.spec
    tokenizer = spec.tokenizer
    if isinstance(tokenizer, dict) or hasattr(tokenizer, "from_"):
        tokenizer = str(ctx.upstream_dir(tokenizer.from_).root / "tokenizer.json")
    options = ImportOptions(
        out=str(ctx.dir.root), shard_size=spec.shard_size, image_size=spec.image_size, tokenizer=tokenizer,
        max_bad_fraction=spec.max_bad_fraction, max_answers=spec.max_answers,
    )
    finish_stage(ctx, run_import(spec.format, spec.inputs, options))
