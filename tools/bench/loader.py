"""Training loader throughput against a plain webdataset pipeline on the same shards.

    nice python tools/bench/loader.py [--samples 2048] [--image-size 224] [--batch 64] [--batches 20] [--workers 2] [--runs 3]
                                      [--augment none|randaugment]

Writes JPEG shards of synthetic scenes (``jpg``, ``txt``, ``json``; stored
32 px larger than ``--image-size``, so every sample is resized) into a temp
dir, then, in this process and for every run, measures samples/s over the
same shards doing the same work per sample — JPEG decode, bilinear resize,
float tensor in [-1, 1], JSON metadata, caption tokenisation per batch:

- (a) plain webdataset: ``WebDataset(urls).shuffle(256).decode("pil")``, a
  ``map`` to tensors, ``batched``, then the tokenizer (baseline);
- (b) vlcluster's ``TrainLoader`` without workers + ``BatchBuilder``: the
  canonical order (the shard index written beside the shards, as the data
  stage writes it; windowed shuffle; each step's member records, then its
  items, read by ranged reads of the files), exact position on any
  topology, bad-data accounting;
- (c) the same with ``--workers`` data-loader worker processes.

b/a is what the canonical order, exact resume and bad-data accounting cost (goal >= 0.9); c/b is
what the workers bring. Samples per second of CPU time of (a) and (b) are
printed too: on a machine shared with other work they compare the cost of
the two more steadily than wall time; the load average says how shared. By
default the work is the deterministic resize; ``--augment randaugment`` makes
every contender do ``data.augment: randaugment`` instead (the same
``vlcluster.data.augment.Augment``: random resized crop + kornia RandAugment
per sample, in (a) inside the webdataset ``map``). The first batch of each
contender (worker start-up) is not timed.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from vlcluster.data import synthetic as syn
from vlcluster.data.augment import AUGMENTS, Augment
from vlcluster.data.corpusindex import INDEX_NAME, write_index
from vlcluster.data.loader import TrainLoader
from vlcluster.data.tokenizer import TextEncoder, build_word_tokenizer
from vlcluster.train.batches import BatchBuilder

SHARDS = 8
MAX_TEXT_LEN = 40


def write_jpeg_shards(root: Path, samples: int, size: int) -> list[str]:
    urls = [str(root / f"train-{index:06d}.tar") for index in range(SHARDS)]
    per_shard = -(-samples // SHARDS)
    generated = syn._samples("train", samples, size, seed=0, unique=False)
    for url in urls:
        with wds.TarWriter(url, encoder=False) as tar:
            for sample in (next(generated, None) for _ in range(per_shard)):
                if sample is not None:
                    jpeg = io.BytesIO()
                    Image.open(io.BytesIO(sample.pop("png"))).save(jpeg, format="JPEG", quality=90)
                    tar.write({**sample, "jpg": jpeg.getvalue()})
    write_index(urls, str(root / INDEX_NAME))  # as the data stage does: (b) and (c) read items by their member records
    return urls


def plain_batches(urls: list[str], batch: int, size: int, encoder: TextEncoder, augment: Augment) -> Iterator[tuple]:
    def to_tensors(sample: tuple) -> tuple:
        image, caption, meta, key = sample
        if augment.active:
            image = augment(image.convert("RGB"), size, key)
        else:
            image = image.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1).contiguous()
        return pixels.div_(127.5).sub_(1.0), caption, meta["qa"]

    dataset = (
        wds.WebDataset(urls, shardshuffle=False, empty_check=False)
        .shuffle(256)
        .decode("pil")
        .to_tuple("jpg", "txt", "json", "__key__")
        .map(to_tensors)
        .batched(batch, collation_fn=None)
    )
    for chunk in dataset:
        images = torch.stack([image for image, _, _ in chunk])
        yield images, encoder.encode([caption for _, caption, _ in chunk], MAX_TEXT_LEN)


def vlcluster_batches(urls: list[str], batch: int, size: int, encoder: TextEncoder, workers: int, augment: Augment) -> Iterator:
    loader = TrainLoader(
        urls, 0, 1, seed=0, shuffle_buffer=256, batch_size=batch, image_size=size, num_workers=workers, augment=augment
    )
    builder = BatchBuilder(encoder, MAX_TEXT_LEN, None, seed=0)
    try:
        while True:
            yield builder(loader.next_batch(), with_questions=False)
    finally:
        loader.close()


def samples_per_s(batches: Iterator, count: int, batch: int) -> tuple[float, float]:
    """Samples per second of wall time and per second of this process's CPU time."""
    next(batches)  # start-up (worker processes, first shard open) is not timed
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(count):
        next(batches)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    batches.close()
    return count * batch / wall, count * batch / cpu


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=int, default=2048)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--batches", type=int, default=20, help="timed batches per contender (after one untimed)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--augment", choices=AUGMENTS, default="none")
    args = parser.parse_args()
    augment = Augment(args.augment)
    if (args.batches + 1) * args.batch > args.samples:
        sys.exit("--samples must cover (--batches + 1) x --batch: the plain pipeline reads one epoch")
    torch.set_num_threads(1)  # per-sample work only; the workers get one thread each too
    root = Path(tempfile.mkdtemp(prefix="vlbench-loader-"))
    try:
        urls = write_jpeg_shards(root, args.samples, args.image_size + 32)
        (root / "tokenizer.json").write_text(build_word_tokenizer(syn.vocabulary()).to_str())
        encoder = TextEncoder(root / "tokenizer.json")
        megabytes = sum(os.path.getsize(url) for url in urls) / 2**20
        print(f"{args.samples} JPEG samples ({args.image_size + 32} px -> {args.image_size} px) in {SHARDS} shards, "
              f"{megabytes:.0f} MB; batch {args.batch}, {args.batches} timed batches; {os.cpu_count()} cores; "
              f"augment {args.augment}")
        for run in range(1, args.runs + 1):
            plain, plain_cpu = samples_per_s(plain_batches(urls, args.batch, args.image_size, encoder, augment), args.batches, args.batch)
            single, single_cpu = samples_per_s(vlcluster_batches(urls, args.batch, args.image_size, encoder, 0, augment), args.batches, args.batch)
            workers, _ = samples_per_s(vlcluster_batches(urls, args.batch, args.image_size, encoder, args.workers, augment), args.batches, args.batch)
            print(f"run {run}: (a) plain webdataset {plain:5.0f} samples/s | (b) vlcluster, no workers {single:5.0f} "
                  f"({single / plain:4.2f}x a) | (c) vlcluster, {args.workers} workers {workers:5.0f} "
                  f"({workers / plain:4.2f}x a, {workers / single:4.2f}x b) | per CPU second: a {plain_cpu:4.0f}, "
                  f"b {single_cpu:4.0f} ({single_cpu / plain_cpu:4.2f}x a); load {os.getloadavg()[0]:.1f}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
