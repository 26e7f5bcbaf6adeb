"""Image-text retrieval (COCO / Flickr30k, Karpathy splits): dual-encoder fine-tune.

A sample is one image with its captions, one per line of ``txt``. Training
draws one caption per image per step and uses the in-batch contrastive loss
(ITC, negatives gathered across ranks) on the retrieval route; evaluation
embeds every image and every caption. TR (image query) counts a hit when any
of the image's captions ranks within k; IR (caption query) ranks every
caption against all images. TR/IR are the mean of R@1, R@5, R@10.
"""

from __future__ import annotations

import random
from typing import Any

import torch
from torch import Tensor

from vlcluster.model import MultiwayTransformer
from vlcluster.tasks.base import RawSample, Scorer, SyntheticData, Task, TaskBatch, TaskInfo, read_lines
from vlcluster.tasks.recall import recall_scores, retrieval_items
from vlcluster.train.losses import itc_loss


class RetrievalTask(Task):
    name = "retrieval"
    route = "dual"
    fields = ("txt",)
    metric = "rsum_mean"
    model_heads = ("itc",)  # the pre-trained ITC projections and temperature
    has_head = False

    def decode_fields(self, raw: RawSample, image_size: int | None) -> dict[str, Any]:
        return {"captions": read_lines(raw)}

    def from_image_caption(self, sample: dict[str, Any]) -> dict[str, Any]:
        return {"captions": sample["captions"]}

    def collate(self, samples, info: TaskInfo, encoder, max_len, rng: random.Random, train: bool) -> TaskBatch:
        captions, owners = [], []
        for row, options in enumerate(samples["captions"]):
            chosen = [rng.choice(options)] if train else options
            captions += chosen
            owners += [row] * len(chosen)
        ids, mask = encoder.encode(captions, max_len)
        return TaskBatch(image=samples["image"], ids=ids, mask=mask, owner=torch.tensor(owners))

    def synthetic(self) -> SyntheticData:
        from vlcluster.data.synthetic_tasks import retrieval_samples

        return SyntheticData(retrieval_samples)

    def embed(self, model: MultiwayTransformer, batch: TaskBatch) -> tuple[Tensor, Tensor]:
        image_cls = model.encode_image(batch["image"])[:, 0]
        text_cls = model.encode_text(batch["ids"], batch["mask"])[:, 0]
        return model.heads.itc(image_cls, text_cls)

    def loss(self, model, batch, rank_sizes) -> Tensor:
        image_emb, text_emb = self.embed(model, batch)
        return itc_loss(image_emb, text_emb, model.heads.itc.scale(), rank_sizes)[0]

    def scorer(self, info: TaskInfo) -> Scorer:
        return RetrievalScorer(self)

    def chance(self, info: TaskInfo) -> dict[str, float]:
        return {}  # depends on the gallery size: k / #images (TR roughly #captions-per-image times that)


def multi_caption_recall(similarity: Tensor, owner: Tensor) -> dict[str, float]:
    """``similarity`` [images, captions]; ``owner[c]`` = the image of caption c. Percentages."""
    scores = recall_scores(similarity.float(), owner)
    scores["rsum_mean"] = (scores["tr"] + scores["ir"]) / 2
    return scores


class RetrievalScorer(Scorer):
    def __init__(self, task: RetrievalTask):
        self.task = task
        self.image_embs: list[Tensor] = []
        self.text_embs: list[Tensor] = []
        self.owners: list[Tensor] = []
        self.images = 0

    def update(self, model, batch) -> None:
        image_emb, text_emb = self.task.embed(model, batch)
        self.image_embs.append(image_emb.float().cpu())
        self.text_embs.append(text_emb.float().cpu())
        self.owners.append(batch["owner"].cpu() + self.images)
        self.images += len(image_emb)

    def result(self) -> dict[str, float]:
        if not self.image_embs:
            return {}
        similarity = torch.cat(self.image_embs) @ torch.cat(self.text_embs).t()
        owner = torch.cat(self.owners)
        return {**multi_caption_recall(similarity, owner), "retrieval_images": self.images, "retrieval_captions": len(owner),
                "items": retrieval_items(similarity.float(), owner)}
