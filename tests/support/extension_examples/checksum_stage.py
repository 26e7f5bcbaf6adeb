"""The ``checksum`` stage: a digest of another stage's model file, in its result.json.

A stage kind is one module like this one under ``vlcluster/stages/``: its
spec model (the fields a job file gives it), the stages it reads
(``references``: the graph makes them dependencies and checks their kinds),
and its runner. One line in ``vlcluster/stages/kinds.py`` names the model and
the runner; the job-file model, ``vlcluster schema``, ``plan``, the backends
and ``status`` take the kind from there. The plan path imports this module
for its spec, so anything heavy is imported inside ``run``.
"""

from __future__ import annotations

import hashlib
import logging
from typing import TYPE_CHECKING, Literal

from pydantic import Field

from vlcluster.jobspec.models import StageBase
from vlcluster.jobspec.references import Reference, model_reference
from vlcluster.stages.outputs import finish_stage

if TYPE_CHECKING:
    from vlcluster.stages.context import StageContext

log = logging.getLogger("vlcluster.checksum")

CHUNK_BYTES = 1 << 20


class ChecksumStage(StageBase):
    """The digest of another stage's ``model.safetensors``."""

    kind: Literal["checksum"]
    source: str = Field(description="stage whose model file is summed (a stage that writes a model)")
    algorithm: Literal["sha256", "blake2b"] = Field("sha256", description="the hashlib algorithm")

    def references(self) -> list[Reference]:
        return model_reference("source", self.source)


def run(ctx: StageContext) -> None:
    from vlcluster.storage.paths import local_copy

    spec = ctx.spec
    weights = local_copy(ctx.upstream_dir(spec.source).model_weights)
    digest, size = hashlib.new(spec.algorithm), 0
    with open(weights, "rb") as file:
        while chunk := file.read(CHUNK_BYTES):
            digest.update(chunk)
            size += len(chunk)
    log.info("%s of %s: %s (%d bytes)", spec.algorithm, spec.source, digest.hexdigest(), size)
    finish_stage(ctx, {"source": spec.source, "algorithm": spec.algorithm, "digest": digest.hexdigest(), "bytes": size})
