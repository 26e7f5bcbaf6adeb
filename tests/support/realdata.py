"""Real-format test data: WebDataset shards in img2dataset's layout and a
bert-base-uncased style WordPiece tokenizer.json.

``write_img2dataset_shards`` writes what img2dataset 1.47 writes with
``--output_format webdataset`` (checked against the tool's own output): per
shard ``NNNNN.tar`` with, per sample, ``KEY.json`` (caption, url, key,
status, error_message, width, height, original_width, original_height,
exif, sha256), ``KEY.txt`` (the caption as given, newlines included) and
``KEY.jpg|png|webp``; keys are the shard number (5 digits) then the sample's
index in the shard; ``NNNNN_stats.json`` beside each tar. (The tool's
``NNNNN.parquet`` of the same records is left out: no reader of ours opens
it, and writing it needs pyarrow.) The slow test in
tests/e2e/test_e2e_realdata.py runs img2dataset itself.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import random
import tarfile
import time
from collections.abc import Sequence
from pathlib import Path

from PIL import Image
from tokenizers import BertWordPieceTokenizer

PIL_FORMATS = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}
# BERT's layout: [PAD]=0, [unused0..98]=1..99, [UNK]=100, [CLS]=101, [SEP]=102, [MASK]=103.
BERT_SPECIALS = ["[PAD]", *(f"[unused{i}]" for i in range(99)), "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def image_bytes(image: Image.Image, encode_format: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=PIL_FORMATS[encode_format])
    return buffer.getvalue()


def _member(tar: tarfile.TarFile, name: str, data: bytes, mtime: float) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uname, info.gname = len(data), mtime, 0o444, "bigdata", "bigdata"
    tar.addfile(info, io.BytesIO(data))


def write_img2dataset_shards(
    out_dir: Path, samples: Sequence[tuple[Image.Image, str]], per_shard: int, encode_format: str = "jpg", first_shard: int = 0
) -> list[str]:
    """``samples``: (image, caption) pairs; a caption with newlines holds several captions."""
    out_dir.mkdir(parents=True, exist_ok=True)
    digits = max(1, math.ceil(math.log10(per_shard)))
    shards = []
    for shard in range(math.ceil(len(samples) / per_shard)):
        number = first_shard + shard
        path = out_dir / f"{number:05d}.tar"
        chunk = samples[shard * per_shard : (shard + 1) * per_shard]
        mtime = time.time()
        with tarfile.open(path, "w") as tar:
            for index, (image, caption) in enumerate(chunk):
                key = f"{number:05d}{index:0{digits}d}"
                data = image_bytes(image, encode_format)
                meta = {
                    "caption": caption, "url": f"http://127.0.0.1/{key}.{encode_format}", "key": key, "status": "success",
                    "error_message": None, "width": image.width, "height": image.height,
                    "original_width": image.width, "original_height": image.height, "exif": "{}",
                    "sha256": hashlib.sha256(data).hexdigest(),
                }
                _member(tar, f"{key}.json", json.dumps(meta, indent=4).encode(), mtime)
                _member(tar, f"{key}.txt", caption.encode(), mtime)
                _member(tar, f"{key}.{encode_format}", data, mtime)
        stats = {
            "count": len(chunk), "successes": len(chunk), "failed_to_download": 0, "failed_to_resize": 0,
            "duration": 0.1, "start_time": mtime, "end_time": mtime + 0.1, "status_dict": {"success": len(chunk)},
        }
        (out_dir / f"{number:05d}_stats.json").write_text(json.dumps(stats, indent=4))
        shards.append(str(path))
    return shards


def bert_wordpiece_tokenizer(path: Path, corpus: Sequence[str]) -> Path:
    """A WordPiece tokenizer.json as bert-base-uncased's: lower-casing, BERT's
    special tokens in BERT's order, trained (in well under a second) on ``corpus``."""
    tokenizer = BertWordPieceTokenizer(lowercase=True)
    tokenizer.train_from_iterator(list(corpus), vocab_size=400, min_frequency=1, special_tokens=BERT_SPECIALS)
    tokenizer.save(str(path))
    return path


COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "white", "black"]


def scene(index: int, captions: int) -> tuple[Image.Image, str]:
    rng = random.Random(index)
    colour = COLOURS[index % len(COLOURS)]
    size = (24 + index % 5, 20)
    image = Image.frombytes("RGB", size, rng.randbytes(size[0] * size[1] * 3))  # texture: crops differ
    text = "\n".join(f"photo {index} of a {colour} thing, view {view}" for view in range(captions))
    return image, text
