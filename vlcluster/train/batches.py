"""Turn decoded samples into model-ready tensors (tokenise, pick VQA pairs)."""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from vlcluster.data.shards import normalise_images
from vlcluster.data.tokenizer import TextEncoder


@dataclass
class Batch:
    images: torch.Tensor  # [B, 3, H, W] float, or uint8 [B, H, W, 3] pixels until moved with to()
    text_ids: torch.Tensor  # [B, L] captions
    text_mask: torch.Tensor  # [B, L] True = real token
    question_ids: torch.Tensor | None = None
    question_mask: torch.Tensor | None = None
    answers: torch.Tensor | None = None  # [B] answer index

    def to(self, device: torch.device) -> Batch:
        """On ``device``, ready for the model: uint8 images (as the training loader ships them, a quarter
        of float32's bytes to copy) become float32 in [-1, 1] there, by the same operations as on the host."""
        moved = {name: (value.to(device, non_blocking=True) if value is not None else None) for name, value in vars(self).items()}
        if moved["images"].dtype == torch.uint8:
            moved["images"] = normalise_images(moved["images"])
        return Batch(**moved)

    def rows(self, start: int, stop: int) -> Batch:
        """Samples ``start:stop`` (views, no copies): a micro-batch."""
        return Batch(**{name: (value[start:stop] if value is not None else None) for name, value in vars(self).items()})

    @property
    def size(self) -> int:
        return self.images.shape[0]


class BatchBuilder:
    """Tokenises captions and, for VQA, draws one question per image.

    The question of a sample is drawn from its own seed (``draw``: the
    loader's per-sample seed of (seed, epoch, shard, key)), so a resumed run
    asks the same questions as an uninterrupted one on any number of ranks.
    Batches without per-sample seeds draw from ``rng``, whose state is checkpointed.
    """

    def __init__(self, encoder: TextEncoder, max_text_len: int, answers: list[str] | None, seed: int):
        self.encoder = encoder
        self.max_text_len = max_text_len
        self.answer_index = {answer: index for index, answer in enumerate(answers or [])}
        self.rng = random.Random(seed)

    def __call__(self, samples: dict, with_questions: bool) -> Batch:
        text_ids, text_mask = self.encoder.encode(samples["caption"], self.max_text_len)
        batch = Batch(images=samples["image"], text_ids=text_ids, text_mask=text_mask)
        if with_questions:
            draws = samples.get("draw")
            pairs = (
                [random.Random(f"{draw}:question").choice(qa) for qa, draw in zip(samples["qa"], draws)] if draws
                else [self.rng.choice(qa) for qa in samples["qa"]]
            )
            batch.question_ids, batch.question_mask = self.encoder.encode([q for q, _ in pairs], self.max_text_len)
            batch.answers = torch.tensor([self.answer_index[a] for _, a in pairs], dtype=torch.long)
        return batch
