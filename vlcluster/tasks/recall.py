"""Image-text retrieval metrics (TR/IR as the mean of R@1, R@5, R@10).

Images may have several captions (COCO and Flickr30k: 5 each). Text
retrieval (an image queries all captions) counts a hit at k when ANY of the
image's captions ranks within the top k; image retrieval ranks the images
for every caption on its own. With one caption per image both reduce to the
usual diagonal recall.
"""

from __future__ import annotations

import torch

RECALL_AT = (1, 5, 10)


def recall_at_k(similarity: torch.Tensor, ks: tuple[int, ...] = RECALL_AT) -> dict[int, float]:
    """Row i's correct column is i; returns the fraction of rows whose correct
    column ranks within the top k."""
    correct = similarity.diagonal().unsqueeze(1)
    rank = (similarity > correct).sum(dim=1)  # 0 = ranked first
    return {k: (rank < k).float().mean().item() for k in ks}


def text_retrieval_ranks(similarity: torch.Tensor, text_image: torch.Tensor) -> torch.Tensor:
    """Per image (row of ``similarity`` [images, captions]): the rank of its best-ranked own caption."""
    own = text_image.unsqueeze(0) == torch.arange(similarity.shape[0]).unsqueeze(1)
    best_own = similarity.masked_fill(~own, float("-inf")).max(dim=1).values
    return (similarity > best_own.unsqueeze(1)).sum(dim=1)


def image_retrieval_ranks(similarity: torch.Tensor, text_image: torch.Tensor) -> torch.Tensor:
    """Per caption: the rank of its image among all images."""
    correct = similarity[text_image, torch.arange(similarity.shape[1])]
    return (similarity.t() > correct.unsqueeze(1)).sum(dim=1)


def retrieval_items(similarity: torch.Tensor, text_image: torch.Tensor) -> dict[str, list[float]]:
    """Per-item scores (percentages) whose means are the retrieval scores, for the study
    report's bootstrap over one run's items: ``tr`` per image and ``ir`` per caption (the mean
    of its hits at 1/5/10), ``retrieval`` per image (its TR item and its captions' mean IR item,
    averaged; their mean is (TR + IR) / 2 when every image has as many captions)."""
    images = similarity.shape[0]
    ir = _mean_hits(image_retrieval_ranks(similarity, text_image))
    tr = _mean_hits(text_retrieval_ranks(similarity, text_image))
    captions = torch.bincount(text_image, minlength=images).double()
    ir_per_image = torch.zeros(images, dtype=torch.float64).index_add_(0, text_image, ir) / captions.clamp(min=1)
    return {name: [round(100 * value, 4) for value in values.tolist()]
            for name, values in (("tr", tr), ("ir", ir), ("retrieval", (tr + ir_per_image) / 2))}


def _mean_hits(rank: torch.Tensor) -> torch.Tensor:
    """Per query: the fraction of R@1, R@5, R@10 it hits."""
    return sum((rank < k).double() for k in RECALL_AT) / len(RECALL_AT)


def retrieval_scores(image_emb: torch.Tensor, text_emb: torch.Tensor, text_image: torch.Tensor | None = None) -> dict[str, float]:
    """Percentages: text retrieval (image query), image retrieval (text query).

    ``text_image[j]``: the image caption ``j`` describes (default: caption j
    belongs to image j)."""
    if text_image is None:
        text_image = torch.arange(text_emb.shape[0])
    return recall_scores((image_emb @ text_emb.t()).float(), text_image)


def recall_scores(similarity: torch.Tensor, text_image: torch.Tensor) -> dict[str, float]:
    """TR/IR R@1/5/10 and their means (percentages) of a [images, captions] similarity,
    ``text_image[j]`` being the image of caption ``j``: TR counts an image as found
    when any of its captions is in the top k, IR ranks every caption's image."""
    ranks = {"tr": text_retrieval_ranks(similarity, text_image), "ir": image_retrieval_ranks(similarity, text_image)}
    scores: dict[str, float] = {}
    for direction, rank in ranks.items():
        recalls = {k: 100 * (rank < k).float().mean().item() for k in RECALL_AT}
        scores |= {f"{direction}_r{k}": value for k, value in recalls.items()}
        scores[direction] = sum(recalls.values()) / len(RECALL_AT)
    return scores
