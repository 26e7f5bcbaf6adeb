"""Pre-training and fine-tuning objectives: ITC, ITM, MLM, VQA.

Pure tensor functions; the objective module in ``objective.py`` wires them
to the model's routes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed._functional_collectives import all_gather_single_autograd


def gather_padded(features: torch.Tensor, sizes: list[int]) -> tuple[torch.Tensor, int]:
    """All-gather rows from every rank with gradients flowing back.

    Ranks may hold different batch sizes (a global batch of 1024 over 48 GPUs),
    so rows are padded to the largest size first; returns the concatenation of
    the real rows and the offset of this rank's rows in it. Rows may have any
    trailing shape, as long as it is the same on every rank.
    """
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return features, 0
    longest = max(sizes)
    trailing = (0, 0) * (features.dim() - 1)
    padded = F.pad(features, (*trailing, 0, longest - features.shape[0]))
    gathered = all_gather_single_autograd(padded, 0, dist.group.WORLD).split(longest)
    rank = dist.get_rank()
    real = torch.cat([chunk[:size] for chunk, size in zip(gathered, sizes)])
    return real, sum(sizes[:rank])


def gather_sequences(
    hidden: torch.Tensor, mask: torch.Tensor, sizes: list[int]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """All-gather token sequences [B, L, D] and their key-padding masks [B, L].

    Every rank pads its text to its own longest caption, so sequences are
    first padded to the longest length of any rank (padding is masked out).
    Returns this rank's padded hidden states and mask (same length as the
    gathered ones, so they can be concatenated) and the gathered pair.
    """
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return hidden, mask, hidden, mask
    length = torch.tensor([hidden.shape[1]], device=hidden.device)
    dist.all_reduce(length, op=dist.ReduceOp.MAX)
    extra = int(length.item()) - hidden.shape[1]
    hidden = F.pad(hidden, (0, 0, 0, extra))
    mask = F.pad(mask.bool(), (0, extra), value=False)
    all_hidden, _ = gather_padded(hidden, sizes)
    # Masks carry no gradient; gathered as floats through the same collective.
    all_mask, _ = gather_padded(mask.to(hidden.dtype), sizes)
    return hidden, mask, all_hidden, all_mask > 0.5


@dataclass(frozen=True)
class ContrastiveLogits:
    """Temperature-scaled similarities of this rank's items against the whole
    gathered batch (detached): what ITM mines its hard negatives from."""

    image_to_text: torch.Tensor  # [local images, all texts]
    text_to_image: torch.Tensor  # [local texts, all images]
    offset: int  # global index of this rank's first item


def itc_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    scale: torch.Tensor,
    rank_sizes: list[int],
) -> tuple[torch.Tensor, ContrastiveLogits]:
    """Symmetric InfoNCE with in-batch negatives gathered across ranks, on
    L2-normalised features.

    Returns the loss and the scaled logits (detached) for hard-negative mining.
    """
    all_images, offset = gather_padded(image_features, rank_sizes)
    all_texts, _ = gather_padded(text_features, rank_sizes)
    logits_i2t = scale * image_features @ all_texts.t()
    logits_t2i = scale * text_features @ all_images.t()
    targets = torch.arange(image_features.shape[0], device=image_features.device) + offset
    loss = (F.cross_entropy(logits_i2t, targets) + F.cross_entropy(logits_t2i, targets)) / 2
    return loss, ContrastiveLogits(logits_i2t.detach(), logits_t2i.detach(), offset)


def sample_hard_negatives(logits: ContrastiveLogits, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """For every local image a negative caption and for every local caption a
    negative image, drawn from the whole gathered batch with probability
    softmax(scaled similarity) over the negatives (the true pair excluded).

    Returns global indices into the gathered batch: (negative texts, negative images).
    """
    rows, columns = logits.image_to_text.shape
    if columns < 2:
        raise ValueError("ITM hard negatives need at least 2 pairs in the global batch")
    positives = torch.arange(rows) + logits.offset

    def draw(scores: torch.Tensor) -> torch.Tensor:
        scores = scores.float().cpu()
        # -inf on the true pair: softmax over the negatives only, never a zero row.
        scores[torch.arange(rows), positives] = float("-inf")
        return torch.multinomial(scores.softmax(dim=1), 1, generator=generator).squeeze(1)

    device = logits.image_to_text.device
    return draw(logits.image_to_text).to(device), draw(logits.text_to_image).to(device)


def itm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, labels)


def mask_tokens(
    ids: torch.Tensor,
    real: torch.Tensor,
    special: torch.Tensor,
    mask_id: int,
    vocab_size: int,
    prob: float,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking: choose ``prob`` of the real, non-special tokens; of those
    80% become [MASK], 10% a random token, 10% stay. Labels are -100 elsewhere.
    At least one token per sequence is chosen so no row is wasted."""
    candidates = real & ~torch.isin(ids, special)
    draws = torch.rand(ids.shape, generator=generator).to(ids.device)
    chosen = candidates & (draws < prob)
    # Force one masked token in rows that drew none (short captions).
    empty = ~chosen.any(dim=1) & candidates.any(dim=1)
    if empty.any():
        first = torch.where(candidates, draws, torch.full_like(draws, 2.0)).argmin(dim=1)
        chosen[empty, first[empty]] = True
    labels = torch.where(chosen, ids, torch.full_like(ids, -100))
    action = torch.rand(ids.shape, generator=generator).to(ids.device)
    masked = ids.clone()
    masked[chosen & (action < 0.8)] = mask_id
    random_tokens = torch.randint(vocab_size, ids.shape, generator=generator).to(ids.device)
    swap = chosen & (action >= 0.8) & (action < 0.9)
    masked[swap] = random_tokens[swap]
    return masked, labels


def mlm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)


def vqa_loss(logits: torch.Tensor, answers: torch.Tensor, kind: str = "softmax") -> torch.Tensor:
    """``bce``: the paper's binary cross-entropy per answer (made for VQA v2's
    soft scores), scaled by the number of answers as is customary.
    ``softmax``: cross-entropy over answers, for single-answer data such as
    the synthetic benchmark, where it learns several times faster."""
    if kind == "softmax":
        return F.cross_entropy(logits, answers)
    targets = F.one_hot(answers, logits.shape[-1]).to(logits.dtype)
    return F.binary_cross_entropy_with_logits(logits, targets) * logits.shape[-1]
