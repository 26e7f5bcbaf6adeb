"""VQA v2: answer classification over the fused [CLS] with soft scores.

A sample is one image with all its questions: ``json`` =
``{"questions": [{"question": str, "answers": [[answer, score], ...]}]}``,
score = min(#annotators who gave the answer / 3, 1). Training draws one
question per image per step; evaluation asks every question. The loss is
the paper's binary cross-entropy against the soft scores; the metric is VQA
accuracy: the soft score of the predicted answer, averaged over questions
(answers outside the vocabulary score 0, so they count as wrong).
"""

from __future__ import annotations

import random
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlcluster.model import ModelConfig, MultiwayTransformer
from vlcluster.model.heads import VQAHead
from vlcluster.tasks.base import RawSample, Scorer, SyntheticData, Task, TaskBatch, TaskInfo, read_json, require

DEFAULT_VOCABULARY = 3129  # VQA v2's most frequent answers, the usual head size


def soft_score(annotators: int) -> float:
    return min(annotators / 3, 1.0)


class VQATask(Task):
    name = "vqa"
    route = "fusion"
    fields = ("json",)
    metric = "vqa_acc"
    image_caption_fields = ("qa",)

    def decode_fields(self, raw: RawSample, image_size: int | None) -> dict[str, Any]:
        meta = read_json(raw)
        questions = meta.get("questions") if isinstance(meta, dict) else None
        require(isinstance(questions, list) and questions, "json: no 'questions' list")
        parsed = []
        for q in questions:
            require(isinstance(q, dict) and isinstance(q.get("question"), str), "json: a question without text")
            answers = q.get("answers", [])
            require(all(isinstance(a, list) and len(a) == 2 and isinstance(a[0], str) for a in answers), "json: malformed answers")
            parsed.append((q["question"], [(a, float(s)) for a, s in answers]))
        return {"questions": parsed}

    def from_image_caption(self, sample: dict[str, Any]) -> dict[str, Any]:
        """Pre-training data's questions have one answer each (soft score 1)."""
        return {"questions": [(question, [(answer, 1.0)]) for question, answer in sample["qa"]]}

    def collate(self, samples, info: TaskInfo, encoder, max_len, rng: random.Random, train: bool) -> TaskBatch:
        index = info.label_index
        rows, texts, targets = [], [], []
        for row, questions in enumerate(samples["questions"]):
            for question, answers in ([rng.choice(questions)] if train else questions):
                rows.append(row)
                texts.append(question)
                targets.append([(index[a], s) for a, s in answers if a in index])
        soft = torch.zeros(len(rows), len(index))
        for i, pairs in enumerate(targets):
            for column, score in pairs:
                soft[i, column] = max(soft[i, column].item(), score)
        ids, mask = encoder.encode(texts, max_len)
        return TaskBatch(image=samples["image"][torch.tensor(rows, dtype=torch.long)], ids=ids, mask=mask, soft=soft)

    def synthetic(self) -> SyntheticData:
        from vlcluster.data.synthetic import ANSWERS
        from vlcluster.data.synthetic_tasks import vqa_samples

        return SyntheticData(vqa_samples, ANSWERS)

    def build_head(self, config: ModelConfig, info: TaskInfo) -> nn.Module:
        return VQAHead(config.dim, len(info.labels), config.layer_norm_eps)

    def logits(self, model: MultiwayTransformer, batch: TaskBatch) -> Tensor:
        return model.heads[self.name](model.fusion(batch["image"], batch["ids"], batch["mask"])[:, 0])

    def loss(self, model, batch, rank_sizes) -> Tensor:
        logits = self.logits(model, batch)
        # Scaled by the number of answers as is customary for VQA's BCE.
        return F.binary_cross_entropy_with_logits(logits, batch["soft"]) * logits.shape[-1]

    def scorer(self, info: TaskInfo) -> Scorer:
        return VQAScorer(self)

    def chance(self, info: TaskInfo) -> dict[str, float]:
        return {self.metric: 100 / max(len(info.labels), 1)}


class VQAScorer(Scorer):
    def __init__(self, task: VQATask):
        self.task, self.score, self.count = task, 0.0, 0
        self.items: list[float] = []  # per question (percent): the study report bootstraps over them

    def update(self, model, batch) -> None:
        predicted = self.task.logits(model, batch).argmax(dim=-1)
        scores = batch["soft"].gather(1, predicted[:, None]).squeeze(1)
        self.score += scores.sum().item()
        self.count += len(predicted)
        self.items += [round(100 * value, 4) for value in scores.tolist()]

    def result(self) -> dict[str, float]:
        return {"vqa_acc": 100 * self.score / max(self.count, 1), "vqa_questions": self.count, "items": {"vqa_acc": self.items}}
