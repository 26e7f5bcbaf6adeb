"""VQA accuracy and image-text retrieval of a pre-trained model on held-out image-caption data."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from vlcluster.data.fields import FieldMap
from vlcluster.data.quality import FIELDS_HINT, DataQuality, no_usable_samples
from vlcluster.data.shards import DEFAULT_FIELDS
from vlcluster.data.stream import eval_samples
from vlcluster.data.tokenizer import TextEncoder
from vlcluster.model import MultiwayTransformer, load_into
from vlcluster.tasks.recall import retrieval_items, retrieval_scores

log = logging.getLogger("vlcluster.eval")


def load_model(state: dict[str, torch.Tensor], config) -> MultiwayTransformer:
    heads = tuple(sorted({key.split(".")[1] for key in state if key.startswith("heads.")}))
    model = MultiwayTransformer(config, heads=heads)
    load_into(model, state, allow_missing_prefixes=())
    return model.eval()


def batches(samples: Iterator[dict], size: int) -> Iterator[list[dict]]:
    chunk: list[dict] = []
    for sample in samples:
        chunk.append(sample)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


@torch.no_grad()
def evaluate(
    model: MultiwayTransformer, encoder: TextEncoder, answers: list[str], urls: list[str], tasks: list[str], batch_size: int,
    quality: DataQuality | None = None, fields: FieldMap = DEFAULT_FIELDS,
) -> dict:
    """Scores over every usable sample of ``urls``; skipped ones are counted in ``quality``.

    Retrieval embeds every caption of a sample (COCO-style 5 per image) and
    scores any-caption text retrieval; VQA asks every question of a sample.
    """
    cfg = model.config
    if "vqa" in tasks and "vqa" not in model.heads:
        raise ValueError("the model has no VQA head: evaluate a fine-tuned model or drop 'vqa' from tasks")
    if "retrieval" in tasks and "itc" not in model.heads:
        raise ValueError("the model has no ITC head: retrieval cannot be evaluated")
    quality = quality if quality is not None else DataQuality()
    fields = fields.requiring("qa") if "vqa" in tasks else fields
    answer_index = {answer: index for index, answer in enumerate(answers)}
    image_embs, text_embs, text_image = [], [], []
    images_seen = 0
    vqa_hits: list[float] = []  # per question (100 or 0): the study report bootstraps over them
    for chunk in batches(eval_samples(urls, cfg.image_size, quality, fields), batch_size):
        images = torch.stack([sample["image"] for sample in chunk])
        image_bottom = model.bottom_image(images)
        if "retrieval" in tasks:
            image_emb, text_emb = _retrieval_embeddings(model, encoder, chunk, image_bottom, batch_size)
            image_embs.append(image_emb)
            text_embs.append(text_emb)
            text_image += [images_seen + i for i, sample in enumerate(chunk) for _ in sample["captions"]]
        if "vqa" in tasks:
            for turn in range(max(len(sample["qa"]) for sample in chunk)):
                rows = [i for i, sample in enumerate(chunk) if turn < len(sample["qa"])]
                questions = [chunk[i]["qa"][turn][0] for i in rows]
                targets = torch.tensor([answer_index[chunk[i]["qa"][turn][1]] for i in rows])
                ids, mask = encoder.encode(questions, cfg.max_text_len)
                fused = model.fuse(image_bottom[rows], model.bottom_text(ids, mask), mask)
                predicted = model.heads.vqa(fused[:, 0]).argmax(dim=-1)
                vqa_hits += [100.0 * hit for hit in (predicted == targets).tolist()]
        images_seen += len(chunk)
    if images_seen == 0:
        raise no_usable_samples(f"evaluation read {len(urls)} shard(s) ({', '.join(urls[:3])}{', ...' if len(urls) > 3 else ''})", quality, FIELDS_HINT)
    result: dict = {"items": {}}
    if "vqa" in tasks:
        result["vqa_acc"] = sum(vqa_hits) / max(len(vqa_hits), 1)
        result["vqa_questions"] = len(vqa_hits)
        result["items"]["vqa_acc"] = vqa_hits
    if "retrieval" in tasks:
        image_emb, text_emb, owner = torch.cat(image_embs), torch.cat(text_embs), torch.tensor(text_image)
        result |= retrieval_scores(image_emb, text_emb, owner)
        result["retrieval_pairs"] = images_seen
        result["retrieval_captions"] = len(text_image)
        result["items"] |= retrieval_items((image_emb @ text_emb.t()).float(), owner)
    return result


def _retrieval_embeddings(model, encoder: TextEncoder, chunk: list[dict], image_bottom: torch.Tensor, batch_size: int):
    """ITC embeddings of the chunk's images and of all their captions (in sample order)."""
    # The ITC head's projections, L2-normalised as in its forward (which pairs one text per image).
    image_emb = F.normalize(model.heads.itc.image(model.finish(image_bottom, "v")[:, 0]), dim=-1)
    captions = [caption for sample in chunk for caption in sample["captions"]]
    text_embs = []
    for start in range(0, len(captions), batch_size):
        ids, mask = encoder.encode(captions[start : start + batch_size], model.config.max_text_len)
        text_embs.append(F.normalize(model.heads.itc.text(model.encode_text(ids, mask)[:, 0]), dim=-1))
    return image_emb, torch.cat(text_embs)
