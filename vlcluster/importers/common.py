"""What every importer shares: finding images, encoding them, counting bad entries, writing the dataset.

An importer turns one real on-disk format into the task's WebDataset sample
format (see ``vlcluster.tasks``) plus ``dataset.json``. Entries that cannot
be used (a missing image, an unknown answer, a malformed line) are skipped,
counted by reason, logged (the first few with their location) and recorded
in ``dataset.json``; the import fails when more than ``max_bad_fraction`` of
the entries are bad.
"""

from __future__ import annotations

import io
import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from vlcluster.data.quality import BadDataError
from vlcluster.data.corpusindex import index_beside
from vlcluster.data.split_writer import SplitWriter
from vlcluster.tasks.dataset import write_record

log = logging.getLogger("vlcluster.import")
MAX_LOGGED = 20


class ImportFailed(BadDataError):
    """An input that cannot be imported at all (missing file, wrong format, too many bad entries)."""


@dataclass
class ImportOptions:
    out: str
    shard_size: int = 1000
    image_size: int | None = None  # resize (square) while importing; None keeps the original bytes
    tokenizer: str | None = None  # tokenizer.json to ship with the data; None builds a word-level one from the texts
    max_bad_fraction: float = 0.05
    max_answers: int = 3129


@dataclass
class BadEntries:
    counts: Counter = field(default_factory=Counter)
    entries: int = 0

    def add(self, reason: str, where: str) -> None:
        self.counts[reason] += 1
        if sum(self.counts.values()) <= MAX_LOGGED:
            log.warning("skipped (%s): %s", reason, where)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def check(self, source: str, limit: float) -> None:
        fraction = self.total / max(self.entries, 1)
        if self.entries == 0:
            raise ImportFailed(f"{source}: no entries found")
        if fraction > limit:
            reasons = ", ".join(f"{reason} ({count})" for reason, count in self.counts.most_common())
            raise ImportFailed(
                f"{source}: {self.total} of {self.entries} entries are bad ({100 * fraction:.1f}% > "
                f"max_bad_fraction {100 * limit:.1f}%): {reasons}"
            )


def need_file(path: str | Path, what: str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise ImportFailed(f"{what}: {path} is not a file")
    return path


def need_dir(path: str | Path, what: str) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise ImportFailed(f"{what}: {path} is not a directory")
    return path


def index_files(root: Path) -> dict[str, Path]:
    """File name -> path for every file under ``root`` (datasets nest images differently)."""
    found: dict[str, Path] = {}
    for folder, _, files in os.walk(root):
        for name in files:
            found.setdefault(name, Path(folder) / name)
    return found


def image_bytes(path: Path, image_size: int | None, mask: bool = False) -> tuple[str, bytes]:
    """(WebDataset extension, bytes) of the image at ``path``; raises ValueError when it does not decode.
    Resized images are re-encoded (masks as PNG with nearest-neighbour resizing)."""
    data = path.read_bytes()
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except Exception as exc:  # noqa: BLE001 - PIL raises many types on broken bytes
        raise ValueError(f"{type(exc).__name__}: {exc}") from None
    ext = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}.get(image.format or "", "")
    if image_size is None and ext:
        return ext, data
    size = image_size or image.size[0]
    if mask:
        resized = image.convert("L").resize((size, size), Image.Resampling.NEAREST) if image_size else image.convert("L")
        ext, fmt = "png", "PNG"
    else:
        resized = image.convert("RGB").resize((size, size), Image.Resampling.BICUBIC) if image_size else image.convert("RGB")
        ext, fmt = "jpg", "JPEG"
    buffer = io.BytesIO()
    resized.save(buffer, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return ext, buffer.getvalue()


class DatasetWriter:
    """Shards per split, the tokenizer and ``dataset.json`` of one import."""

    def __init__(self, options: ImportOptions, task: str, fmt: str):
        self.options, self.task, self.fmt = options, task, fmt
        Path(options.out).mkdir(parents=True, exist_ok=True)
        self.writers: dict[str, SplitWriter] = {}
        self.texts: set[str] = set()

    def write(self, split: str, sample: dict, texts: list[str] = ()) -> None:
        if split not in self.writers:
            self.writers[split] = SplitWriter(self.options.out, split, self.options.shard_size)
        self.writers[split].write(sample)
        self.texts.update(texts)

    def finish(self, labels: list[str], bad: BadEntries, extra: dict | None = None) -> dict:
        splits = {split: writer.close() for split, writer in self.writers.items()}
        index_beside([f"{str(self.options.out).rstrip('/')}/{name}" for entry in splits.values() for name in entry["shards"]])
        tokenizer = self._tokenizer() if self.texts or self.options.tokenizer else None
        record = write_record(self.options.out, self.task, self.fmt, labels, splits, tokenizer, dict(bad.counts))
        summary = {split: entry["count"] for split, entry in splits.items()}
        log.info("imported %s (%s): %s samples; %d bad entries of %d %s", self.fmt, self.task, summary, bad.total, bad.entries, dict(bad.counts))
        return {**record, "entries": bad.entries, **(extra or {})}

    def _tokenizer(self) -> str:
        target = Path(self.options.out) / "tokenizer.json"
        if self.options.tokenizer:
            target.write_bytes(need_file(self.options.tokenizer, "tokenizer").read_bytes())
        else:
            from vlcluster.data.tokenizer import build_word_tokenizer  # imports torch: not on the CLI's parser path

            target.write_text(build_word_tokenizer(sorted(self.texts)).to_str())
        return target.name
