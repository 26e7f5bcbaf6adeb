"""What a pre-training (or multi-task fine-tuning) stage trains: the image-text
objective of ``loss_weights`` over image-caption shards.

A recipe gives the trainer (``vlcluster.train.loop``) its data, model, batches
and objective; a downstream task's recipe (``vlcluster.tasks.finetune``) gives
the same pieces for one task. Checkpoints, resume, FSDP and bad-data
accounting stay the trainer's.
"""

from __future__ import annotations

from typing import Any

from vlcluster.data.inputs import DataSources
from vlcluster.data.tokenizer import TextEncoder
from vlcluster.model import ModelConfig, MultiwayTransformer
from vlcluster.train.batches import BatchBuilder
from vlcluster.train.objective import Objective


def head_names(loss_weights: Any) -> tuple[str, ...]:
    """Heads of the pre-training model: one per loss with a weight."""
    names = [name for name in ("itc", "itm", "mlm", "vqa") if getattr(loss_weights, name) > 0]
    if "itm" in names and "itc" not in names:
        names.append("itc")  # ITM mines its negatives from ITC similarities
    return tuple(names)


class PretrainRecipe:
    """``train``: the stage's train settings (loss weights, mask probability, VQA loss)."""

    counts_flops = True  # the FLOPs meter knows the pre-training routes
    uint8_images = True
    decode = None  # the loader's image-caption decoding

    def __init__(self, sources: DataSources, encoder: TextEncoder, answers: list[str], train: Any):
        self.sources, self.encoder, self.answers, self.train = sources, encoder, answers, train
        with_questions = train.loss_weights.vqa > 0
        self.fields = sources.fields.requiring(*(["qa"] if with_questions else []))

    def batch_builder(self, config: ModelConfig, seed: int) -> BatchBuilder:
        return BatchBuilder(self.encoder, config.max_text_len, self.answers, seed)

    def build_model(self, config: ModelConfig) -> MultiwayTransformer:
        return MultiwayTransformer(config, heads=head_names(self.train.loss_weights))

    def objective(self, model: MultiwayTransformer, rank_sizes: list[int]) -> Objective:
        train = self.train
        return Objective(
            model, train.loss_weights, sorted(self.encoder.special_ids), self.encoder.mask_id,
            train.mask_prob, rank_sizes, train.vqa_loss,
        )
