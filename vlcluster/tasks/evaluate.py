"""The ``eval`` stage: VQA accuracy and image-text retrieval on held-out data."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import torch

from vlcluster.context import StageContext
from vlcluster.data.quality import DataQuality, check_bad_fraction
from vlcluster.data.stream import eval_samples
from vlcluster.data.tokenizer import TextEncoder
from vlcluster.model import MultiwayTransformer, load_into
from vlcluster.outputs import finish_stage, read_model
from vlcluster.tasks.retrieval import retrieval_scores

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
    quality: DataQuality | None = None,
) -> dict:
    """Scores over every usable sample of ``urls``; skipped ones are counted in ``quality``."""
    cfg = model.config
    if "vqa" in tasks and "vqa" not in model.heads:
        raise ValueError("the model has no VQA head: evaluate a fine-tuned model or drop 'vqa' from tasks")
    if "retrieval" in tasks and "itc" not in model.heads:
        raise ValueError("the model has no ITC head: retrieval cannot be evaluated")
    answer_index = {answer: index for index, answer in enumerate(answers)}
    image_embs, text_embs = [], []
    vqa_correct = vqa_total = 0
    for chunk in batches(eval_samples(urls, cfg.image_size, quality), batch_size):
        images = torch.stack([sample["image"] for sample in chunk])
        image_bottom = model.bottom_image(images)
        if "retrieval" in tasks:
            ids, mask = encoder.encode([sample["caption"] for sample in chunk], cfg.max_text_len)
            image_cls = model.finish(image_bottom, "v")[:, 0]
            text_cls = model.encode_text(ids, mask)[:, 0]
            image_emb, text_emb = model.heads.itc(image_cls, text_cls)
            image_embs.append(image_emb)
            text_embs.append(text_emb)
        if "vqa" in tasks:
            for turn in range(max(len(sample["qa"]) for sample in chunk)):
                rows = [i for i, sample in enumerate(chunk) if turn < len(sample["qa"])]
                questions = [chunk[i]["qa"][turn][0] for i in rows]
                targets = torch.tensor([answer_index[chunk[i]["qa"][turn][1]] for i in rows])
                ids, mask = encoder.encode(questions, cfg.max_text_len)
                fused = model.fuse(image_bottom[rows], model.bottom_text(ids, mask), mask)
                predicted = model.heads.vqa(fused[:, 0]).argmax(dim=-1)
                vqa_correct += (predicted == targets).sum().item()
                vqa_total += len(rows)
    result: dict = {}
    if "vqa" in tasks:
        result["vqa_acc"] = 100 * vqa_correct / max(vqa_total, 1)
        result["vqa_questions"] = vqa_total
    if "retrieval" in tasks:
        result |= retrieval_scores(torch.cat(image_embs), torch.cat(text_embs))
        result["retrieval_pairs"] = sum(len(chunk) for chunk in image_embs)
    return result


def run_eval_stage(ctx: StageContext) -> None:
    spec = ctx.spec
    state, config = read_model(ctx.upstream_dir(spec.source))
    model = load_model(state, config)
    sources = ctx.data_sources(spec.data)
    if not sources.val:
        raise ValueError(f"stages.{ctx.name}.data: no validation shards (data.val)")
    encoder = TextEncoder(sources.tokenizer)
    answers = json.loads(Path(sources.answers).read_text()) if sources.answers else []
    quality = DataQuality()
    result = evaluate(model, encoder, answers, sources.val, spec.tasks, spec.batch_size, quality)
    check_bad_fraction(quality.bad_total, quality.read, spec.data.max_bad_fraction, final=True)
    result["model"] = {"stage": spec.source, "arch": config.arch}
    result["data"] = quality.summary(spec.data.max_bad_fraction)
    log.info("%s: %s", spec.source, ", ".join(f"{k} {v:.2f}" for k, v in result.items() if isinstance(v, float)))
    finish_stage(ctx, result)
