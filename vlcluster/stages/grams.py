"""The ``grams`` stage: RegMean statistics of a modality-specific model
(:mod:`vlcluster.merge.grams`) over one split of its data, on every rank,
written by rank 0 to ``grams.safetensors``."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Literal

from pydantic import Field

from vlcluster.errors import EXIT_OK
from vlcluster.jobspec.models import DataSpec, StageBase
from vlcluster.jobspec.references import Reference, model_reference

if TYPE_CHECKING:
    from vlcluster.stages.context import StageContext

log = logging.getLogger("vlcluster.grams")


class GramsStage(StageBase):
    """RegMean statistics: Gram matrices of the inputs of every expert's linear layers."""

    kind: Literal["grams"]
    source: str = Field(description="stage holding the modality-specific checkpoint")
    data: DataSpec
    split: Literal["train", "val"] = "train"
    batches: int = Field(8, gt=0, description="global batches of image-text pairs")
    batch_size: int = Field(64, gt=0, description="global batch over all ranks")

    def references(self) -> list[Reference]:
        return self.data.references() + model_reference("source", self.source)


def run(ctx: StageContext) -> None:
    from safetensors.torch import save_file

    from vlcluster.data.quality import FIELDS_HINT, DataQuality, check_bad_fraction, no_usable_samples
    from vlcluster.data.stream import eval_samples
    from vlcluster.data.tokenizer import TextEncoder
    from vlcluster.merge.grams import collect_grams, load_experts_model, rank_batches
    from vlcluster.model.files import read_model
    from vlcluster.stages.outputs import finish_stage
    from vlcluster.stages.progress import reported
    from vlcluster.storage.paths import writable
    from vlcluster.tracking import exit_rank
    from vlcluster.train.dist import init_distributed

    spec = ctx.spec
    env = init_distributed("cpu")
    state, config = read_model(ctx.upstream_dir(spec.source))
    model = load_experts_model(state, config)
    sources = ctx.data_sources(spec.data)
    urls = sources.train if spec.split == "train" else sources.val
    if not urls:
        raise ValueError(f"stages.{ctx.name}.data: no {spec.split} shards")
    encoder = TextEncoder(sources.tokenizer)
    quality = DataQuality()
    samples = eval_samples(urls, config.image_size, quality, sources.fields)
    batches = rank_batches(samples, encoder, config.max_text_len, spec.batches, spec.batch_size, env.rank, env.world_size)
    if env.is_main:
        batches = reported(batches, ctx.dir, spec.batches, spec.batch_size)  # <stage>/progress.json
    grams, counts = collect_grams(model, batches)
    if quality.read == quality.bad_total:
        raise no_usable_samples(f"the grams stage read {len(urls)} {spec.split} shard(s)", quality, FIELDS_HINT)
    # Every rank reads the same samples (keeping its share), so the counts and the verdict agree.
    check_bad_fraction(quality.bad_total, quality.read, spec.data.max_bad_fraction, final=True)
    if env.is_main:
        with writable(ctx.dir.root / "grams.safetensors") as tmp:
            save_file(grams, str(tmp), metadata={"counts": str(counts)})
        log.info("%d Gram matrices from %d ranks; tokens per expert: %s..%s", len(grams), env.world_size, min(counts.values()), max(counts.values()))
        finish_stage(ctx, {
            "grams": len(grams), "tokens": counts, "ranks": env.world_size, "source": spec.source,
            "data": quality.summary(spec.data.max_bad_fraction),
        })
    exit_rank(EXIT_OK)
