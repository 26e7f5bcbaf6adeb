"""The training objective as one module, so FSDP's root forward covers it.

Routes follow the paper: ITC on the retrieval route (image through all N
layers with the V expert, text with the L expert); ITM, MLM and VQA on the
fusion route (bottom N-M layers per modality, then the top M layers with the
VL expert on the concatenation). The bottom activations are computed once and
shared by ITC, ITM and VQA.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from vlcluster.model import MultiwayTransformer
from vlcluster.train import losses
from vlcluster.train.batches import Batch


class LossWeights(Protocol):
    """The weight of each pre-training loss, 0 leaving it out (a job file's
    ``train.loss_weights`` is one; the objective reads nothing else of the spec)."""

    itc: float
    itm: float
    mlm: float
    vqa: float


class Objective(nn.Module):
    def __init__(
        self,
        model: MultiwayTransformer,
        weights: LossWeights,
        special_ids: list[int],
        mask_id: int,
        mask_prob: float,
        rank_sizes: list[int],
        vqa_loss: str = "softmax",
    ):
        super().__init__()
        self.model = model
        self.weights = weights
        self.register_buffer("special_ids", torch.tensor(sorted(special_ids)), persistent=False)
        self.mask_id = mask_id
        self.mask_prob = mask_prob
        self.rank_sizes = rank_sizes
        self.vqa_loss = vqa_loss

    def forward(self, batch: Batch, generator: torch.Generator) -> dict[str, torch.Tensor]:
        model, weights = self.model, self.weights
        heads = model.heads
        image_bottom = model.bottom_image(batch.images)
        out: dict[str, torch.Tensor] = {}
        text_bottom = None
        if weights.itc > 0 or weights.itm > 0:
            text_bottom = model.bottom_text(batch.text_ids, batch.text_mask)
            image_cls = model.finish(image_bottom, "v")[:, 0]
            text_cls = model.finish(text_bottom, "l", batch.text_mask)[:, 0]
            image_emb, text_emb = heads.itc(image_cls, text_cls)
            out["itc"], logits = losses.itc_loss(image_emb, text_emb, heads.itc.scale(), self.rank_sizes)
            if weights.itm > 0:
                out["itm"] = self.itm(image_bottom, text_bottom, batch.text_mask, logits, generator)
        if weights.mlm > 0:
            out["mlm"] = self.mlm(image_bottom, batch, generator)
        if weights.vqa > 0:
            question_bottom = model.bottom_text(batch.question_ids, batch.question_mask)
            fused = model.fuse(image_bottom, question_bottom, batch.question_mask)
            out["vqa"] = losses.vqa_loss(heads.vqa(fused[:, 0]), batch.answers, self.vqa_loss)
        out["loss"] = sum(getattr(weights, name) * value for name, value in out.items())
        return out

    def itm(self, image_bottom, text_bottom, text_mask, logits: losses.ContrastiveLogits, generator) -> torch.Tensor:
        """Positives plus one hard negative caption per image and one hard
        negative image per caption, mined from the whole gathered batch (the
        negatives' bottom activations come from the rank that holds them)."""
        negative_text, negative_image = losses.sample_hard_negatives(logits, generator)
        all_images, _ = losses.gather_padded(image_bottom, self.rank_sizes)
        text_bottom, text_mask, all_texts, all_masks = losses.gather_sequences(text_bottom, text_mask, self.rank_sizes)
        images = torch.cat([image_bottom, image_bottom, all_images[negative_image]])
        texts = torch.cat([text_bottom, all_texts[negative_text], text_bottom])
        masks = torch.cat([text_mask, all_masks[negative_text], text_mask])
        fused = self.model.fuse(images, texts, masks)
        batch = image_bottom.shape[0]
        labels = torch.cat([torch.ones(batch), torch.zeros(2 * batch)]).long().to(fused.device)
        return losses.itm_loss(self.model.heads.itm(fused[:, 0]), labels)

    def mlm(self, image_bottom, batch: Batch, generator) -> torch.Tensor:
        cfg = self.model.config
        masked, labels = losses.mask_tokens(
            batch.text_ids, batch.text_mask, self.special_ids, self.mask_id, cfg.vocab_size, self.mask_prob, generator
        )
        text_bottom = self.model.bottom_text(masked, batch.text_mask)
        fused = self.model.fuse(image_bottom, text_bottom, batch.text_mask)
        text_hidden = fused[:, image_bottom.shape[1] :]
        picked = labels != -100
        return losses.mlm_loss(self.model.heads.mlm(text_hidden[picked]), labels[picked])
