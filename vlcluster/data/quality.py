"""Bad-data accounting: what was skipped, per shard and reason, and the limit.

Training never stops on a single bad sample and never skips one silently:
each is counted under its shard and one of the reasons below, logged, and
the totals go to TensorBoard and the stage's ``result.json``. A stage fails
once the bad fraction of everything read exceeds ``data.max_bad_fraction``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

# Why a raw item was skipped.
READ_ERROR = "read_error"  # the tar is truncated or corrupt; the rest of that shard is lost
MISSING_FIELD = "missing_field"  # no image, caption or metadata in the sample
BAD_IMAGE = "bad_image"  # the image bytes do not decode
BAD_TEXT = "bad_text"  # caption not UTF-8 or metadata not the expected JSON
REASONS = (READ_ERROR, MISSING_FIELD, BAD_IMAGE, BAD_TEXT)

# Mid-run checks wait for this many samples so that one bad sample early on
# (1 of 50 read) does not fail a long run; the check at the end always applies.
MIN_SAMPLES_FOR_EARLY_CHECK = 1000


class BadDataError(RuntimeError):
    """More of the data was bad than the stage allows."""


def no_usable_samples(where: str, quality: DataQuality, hint: str = "") -> BadDataError:
    """The error of a reader or an evaluation that found nothing it can use."""
    if quality.read == 0:
        found = "no samples at all (empty shards?)"
    else:
        found = quality.describe()
    return BadDataError(f"{where} without one usable sample: {found}" + (f". {hint}" if hint else ""))


FIELDS_HINT = (
    "Compare data.fields (which files hold the image and caption, which task fields a stage needs) "
    "with the files of a shard (tar tf SHARD | head)"
)


class BadSample(ValueError):
    """One raw item that cannot be used; ``reason`` is one of ``REASONS``."""

    def __init__(self, reason: str, detail: str, cause: str | None = None) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail
        # A short label that stays the same for every sample with this fault
        # (``detail`` names the sample's own bytes), for counts in messages.
        self.cause = cause or reason.replace("_", " ")


class DataQuality:
    """Items read and items skipped, per shard and reason. Adds up across batches and ranks."""

    def __init__(self) -> None:
        self.read = 0
        self.bad: dict[str, Counter[str]] = {}
        self.causes: Counter[str] = Counter()

    def record(self, url: str, reason: str, cause: str | None = None) -> None:
        self.bad.setdefault(url, Counter())[reason] += 1
        self.causes[cause or reason.replace("_", " ")] += 1

    def describe(self) -> str:
        """E.g. "256 of 256 samples bad: missing field qa (256)"."""
        causes = ", ".join(f"{cause} ({count})" for cause, count in self.causes.most_common())
        return f"{self.bad_total} of {self.read} samples bad" + (f": {causes}" if causes else "")

    @property
    def bad_total(self) -> int:
        return sum(sum(counts.values()) for counts in self.bad.values())

    def add(self, other: DataQuality) -> None:
        self.read += other.read
        for url, counts in other.bad.items():
            self.bad.setdefault(url, Counter()).update(counts)
        self.causes.update(other.causes)

    def state_dict(self) -> dict:
        return {
            "read": self.read,
            "bad": {url: dict(counts) for url, counts in sorted(self.bad.items())},
            "causes": dict(sorted(self.causes.items())),
        }

    @classmethod
    def from_state(cls, state: dict) -> DataQuality:
        quality = cls()
        quality.read = int(state.get("read", 0))
        quality.bad = {url: Counter(counts) for url, counts in state.get("bad", {}).items()}
        quality.causes = Counter(state.get("causes", {}))
        return quality

    @classmethod
    def total(cls, parts: Iterable[DataQuality]) -> DataQuality:
        merged = cls()
        for part in parts:
            merged.add(part)
        return merged

    def summary(self, max_bad_fraction: float) -> dict:
        """What ``result.json`` reports under ``data``."""
        by_reason: Counter[str] = Counter()
        for counts in self.bad.values():
            by_reason.update(counts)
        return {
            "samples_read": self.read,
            "bad_samples": self.bad_total,
            "bad_fraction": bad_fraction(self.bad_total, self.read),
            "max_bad_fraction": max_bad_fraction,
            "bad_by_reason": dict(sorted(by_reason.items())),
            "bad_by_cause": dict(sorted(self.causes.items())),
            "bad_by_shard": self.state_dict()["bad"],
        }


def bad_fraction(bad: float, read: float) -> float:
    return bad / read if read else 0.0


def check_bad_fraction(bad: int, read: int, limit: float, final: bool) -> None:
    """Raise ``BadDataError`` when ``bad`` of ``read`` items is over ``limit`` (global counts)."""
    if not final and read < MIN_SAMPLES_FOR_EARLY_CHECK:
        return
    fraction = bad_fraction(bad, read)
    if fraction > limit:
        raise BadDataError(
            f"{bad} of {read} samples read were bad ({fraction:.2%}), more than "
            f"data.max_bad_fraction = {limit:g}; the stage's log lists each skipped sample with its "
            "shard and reason. Repair or drop those shards, or raise data.max_bad_fraction "
            "(it is not part of the stage's identity: a resubmit resumes from the last checkpoint)"
        )
