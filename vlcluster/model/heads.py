"""Task heads. They are shared across modalities and are never merged.

Heads take already-selected features (a [CLS] vector, or the masked
positions for MLM) so the caller decides what to pool and what to skip.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import ModelConfig

HEADS = ("itc", "itm", "mlm", "vqa")


class ITCHead(nn.Module):
    """Image-text contrastive projections plus a learned temperature."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.image = nn.Linear(config.dim, config.itc_dim)
        self.text = nn.Linear(config.dim, config.itc_dim)
        # Shape (1,), not a scalar: FSDP2 cannot shard 0-d parameters.
        self.logit_scale = nn.Parameter(torch.empty(1))

    def init_weights(self) -> None:
        nn.init.constant_(self.logit_scale, math.log(1 / 0.07))

    def scale(self) -> Tensor:
        # CLIP's clamp: keeps the temperature from collapsing the softmax.
        return self.logit_scale.exp().clamp(max=100.0).squeeze(0)

    def forward(self, image_cls: Tensor, text_cls: Tensor) -> tuple[Tensor, Tensor]:
        """L2-normalised embeddings; logits are scale() * img @ txt.T (possibly across ranks)."""
        return F.normalize(self.image(image_cls), dim=-1), F.normalize(self.text(text_cls), dim=-1)


class ITMHead(nn.Module):
    """Image-text matching: BERT-style pooler on the fused [CLS], then match / no-match."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.pool = nn.Linear(config.dim, config.dim)
        self.classifier = nn.Linear(config.dim, 2)

    def forward(self, cls: Tensor) -> Tensor:
        return self.classifier(torch.tanh(self.pool(cls)))


class MLMHead(nn.Module):
    # Decoder is not tied to the word embedding: keeps FSDP sharding and naming simple.
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.dense = nn.Linear(config.dim, config.dim)
        self.norm = nn.LayerNorm(config.dim, eps=config.layer_norm_eps)
        self.decoder = nn.Linear(config.dim, config.vocab_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.decoder(self.norm(F.gelu(self.dense(x))))


class VQAHead(nn.Module):
    """The paper's VQA classifier over the fused [CLS]: Linear(d -> 2d) -> LayerNorm ->
    GELU -> Linear(-> #answers). The one VQA head: pre-training's (``heads.vqa``) and
    the vqa task's (``vlcluster.tasks.vqa``) are the same module, so either loads the other."""

    def __init__(self, dim: int, answers: int, eps: float):
        super().__init__()
        hidden = 2 * dim
        self.fc1 = nn.Linear(dim, hidden)
        self.norm = nn.LayerNorm(hidden, eps=eps)
        self.fc2 = nn.Linear(hidden, answers)

    def forward(self, cls: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.norm(self.fc1(cls))))


def _vqa_head(config: ModelConfig) -> VQAHead:
    return VQAHead(config.dim, config.num_answers, config.layer_norm_eps)


_BUILDERS = {"itc": ITCHead, "itm": ITMHead, "mlm": MLMHead, "vqa": _vqa_head}


def build_heads(config: ModelConfig, names: Sequence[str]) -> nn.ModuleDict:
    """Heads by name; "vqa" is skipped when the config has no answers."""
    unknown = set(names) - set(_BUILDERS)
    if unknown:
        raise ValueError(f"unknown heads {sorted(unknown)}; expected some of {HEADS}")
    return nn.ModuleDict(
        {n: _BUILDERS[n](config) for n in names if not (n == "vqa" and config.num_answers == 0)}
    )
