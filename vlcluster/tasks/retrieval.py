"""Image-text retrieval metrics (TR/IR as the mean of R@1, R@5, R@10)."""

from __future__ import annotations

import torch

RECALL_AT = (1, 5, 10)


def recall_at_k(similarity: torch.Tensor, ks: tuple[int, ...] = RECALL_AT) -> dict[int, float]:
    """Row i's correct column is i; returns the fraction of rows whose correct
    column ranks within the top k."""
    correct = similarity.diagonal().unsqueeze(1)
    rank = (similarity > correct).sum(dim=1)  # 0 = ranked first
    return {k: (rank < k).float().mean().item() for k in ks}


def retrieval_scores(image_emb: torch.Tensor, text_emb: torch.Tensor) -> dict[str, float]:
    """Percentages: text retrieval (image query), image retrieval (text query)."""
    similarity = image_emb @ text_emb.t()
    text_recall = recall_at_k(similarity)
    image_recall = recall_at_k(similarity.t())
    scores = {f"tr_r{k}": 100 * v for k, v in text_recall.items()}
    scores |= {f"ir_r{k}": 100 * v for k, v in image_recall.items()}
    scores["tr"] = sum(100 * v for v in text_recall.values()) / len(RECALL_AT)
    scores["ir"] = sum(100 * v for v in image_recall.values()) / len(RECALL_AT)
    return scores
