"""Distances between the flattened V and L transformer weights.

For x = all V-expert weights, y = the matching L-expert weights (every
group with both experts; embeddings, heads and already-shared parts are not
part of either vector):

- L2: ‖x − y‖₂;  cosine dissimilarity: 1 − x·y / (‖x‖‖y‖);
- SSD: 1 − mean_i |x_i + y_i| / (|x_i| + |y_i|) over positions where not
  both are zero;
- TSSD: zero the k = (1 − density)·n smallest-magnitude entries of x and,
  separately, of y (k-th order statistic t; entries with |·| ≤ t are
  dropped), then SSD over the positions where not both are zero.

Reported per layer and overall. TSSD never sorts: thresholds come from a
radix select on the IEEE bit patterns of |x| (monotone for non-negative
floats): a 2¹⁵-bin histogram of the top 16 bits locates the bin holding the
k-th value, and ``kthvalue`` on that bin's few entries gives the exact value. 1 − r_i (r_i = |x_i + y_i| / (|x_i| + |y_i|)) is zero unless
the signs differ and does not depend on the thresholds, so it is computed
once per tensor and reused for SSD, per-layer TSSD and overall TSSD (where
only one entry survives, r = 1).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from vlcluster.metrics import METRICS
from vlcluster.model import parse_layer_key

BINS = 1 << 15  # top 15 bits of a non-negative float32's pattern: sign dropped, 8 exponent + 7 mantissa bits


def magnitude_bits(tensor: torch.Tensor) -> torch.Tensor:
    """Bit pattern of |x| as int32 (order-preserving for non-negative float32)."""
    return tensor.float().reshape(-1).view(torch.int32) & 0x7FFFFFFF


def high_half(bits: torch.Tensor) -> torch.Tensor:
    """The top 16 bits of each int32 as a strided int16 view (no copy), which
    is the histogram bin; values fit int16 because the sign bit is cleared."""
    if sys.byteorder == "little":
        return bits.view(torch.int16)[1::2]
    return bits >> 16


@dataclass
class Pair:
    """One V/L tensor pair, reduced to what every metric needs.

    SSD/TSSD sums are kept as a count minus Σ(1 − r): where x and y have the
    same sign (or one is zero) 1 − r is exactly 0, so 1 − r is computed and
    kept only at the positions whose signs differ (``differ``); a kept
    position anywhere else needs no ratio at all."""

    x: torch.Tensor
    y: torch.Tensor
    bits_x: torch.Tensor = field(init=False)
    bits_y: torch.Tensor = field(init=False)
    top_x: torch.Tensor = field(init=False)  # histogram bin of each entry (top bits of |x|)
    top_y: torch.Tensor = field(init=False)
    differ: torch.Tensor = field(init=False)  # indices where the signs differ
    loss: torch.Tensor = field(init=False)  # 1 − r at those indices (0 where both are ±0)

    def __post_init__(self) -> None:
        self.x, self.y = self.x.float().reshape(-1), self.y.float().reshape(-1)
        self.bits_x, self.bits_y = magnitude_bits(self.x), magnitude_bits(self.y)
        self.top_x, self.top_y = high_half(self.bits_x), high_half(self.bits_y)
        # Same signs add exactly to |x| + |y| in floating point, so 1 − r is exactly 0 there.
        self.differ = torch.nonzero(torch.signbit(self.x) != torch.signbit(self.y)).squeeze(1)
        x, y = self.x[self.differ], self.y[self.differ]
        ratio = (x + y).abs_().div_(x.abs().add_(y.abs()))
        self.loss = ratio.neg_().add_(1).nan_to_num_(0.0)  # 0/0 only for -0.0 against +0.0


def histogram(top: torch.Tensor) -> torch.Tensor:
    return torch.bincount(top, minlength=BINS)


def kth_bits(bit_tensors: list[torch.Tensor], top_tensors: list[torch.Tensor], hist: torch.Tensor, k: int) -> int:
    """Bit pattern of the k-th smallest (1-based) magnitude over ``bit_tensors``.

    ``hist`` (counts per top-16-bit bin) locates the bin; ``kthvalue`` then
    runs on that bin's entries only (~0.2% of them for trained weights)."""
    cumulative = hist.cumsum(0)
    high = int(torch.searchsorted(cumulative, torch.tensor(k)))
    rank = k - (int(cumulative[high - 1]) if high else 0)
    candidates = torch.cat([bits[top == high] for bits, top in zip(bit_tensors, top_tensors)])
    return int(candidates.kthvalue(rank).values)


def thresholds(pairs: list[Pair], hists: tuple[torch.Tensor, torch.Tensor], density: float) -> tuple[int, int]:
    """Magnitude thresholds (as bit patterns) for x and y: keep entries strictly above them."""
    n = sum(pair.x.numel() for pair in pairs)
    drop = n - math.ceil(density * n)
    if drop <= 0:
        return -1, -1
    return (
        kth_bits([p.bits_x for p in pairs], [p.top_x for p in pairs], hists[0], drop),
        kth_bits([p.bits_y for p in pairs], [p.top_y for p in pairs], hists[1], drop),
    )


@dataclass
class Sums:
    """float64 running sums of one scope (a layer or the whole model).

    ``*_loss`` accumulate Σ(1 − r) and ``*_count`` the positions averaged over,
    so SSD = loss / count."""

    sq_diff: float = 0.0
    dot: float = 0.0
    sq_x: float = 0.0
    sq_y: float = 0.0
    ssd_loss: float = 0.0
    ssd_count: int = 0
    tssd_loss: float = 0.0
    tssd_count: int = 0
    entries: int = 0

    def add_dense(self, pair: Pair) -> None:
        self.sq_diff += float(torch.dist(pair.x, pair.y).double() ** 2)
        self.dot += float(torch.dot(pair.x, pair.y))
        self.sq_x += float(torch.dot(pair.x, pair.x))
        self.sq_y += float(torch.dot(pair.y, pair.y))
        self.ssd_loss += float(pair.loss.sum(dtype=torch.float64))
        self.ssd_count += int(torch.count_nonzero(pair.bits_x | pair.bits_y))
        self.entries += pair.x.numel()

    def add_trimmed(self, pair: Pair, threshold: tuple[int, int]) -> None:
        keep_x, keep_y = pair.bits_x > threshold[0], pair.bits_y > threshold[1]
        kept = int(torch.count_nonzero(keep_x)) + int(torch.count_nonzero(keep_y))
        both = keep_x.logical_and_(keep_y)
        # Where only one survives the ratio is |x + 0|/(|x| + 0) = 1: no loss.
        self.tssd_loss += float(pair.loss[both[pair.differ]].sum(dtype=torch.float64))
        self.tssd_count += kept - int(torch.count_nonzero(both))

    def result(self) -> dict[str, float]:
        norms = math.sqrt(self.sq_x) * math.sqrt(self.sq_y)
        return {
            "l2": math.sqrt(self.sq_diff),
            "cosine": 1 - self.dot / norms if norms else float("nan"),
            "ssd": self.ssd_loss / self.ssd_count if self.ssd_count else float("nan"),
            "tssd": self.tssd_loss / self.tssd_count if self.tssd_count else float("nan"),
            "entries": self.entries,
        }


DENSE_FIELDS = ("sq_diff", "dot", "sq_x", "sq_y", "ssd_loss", "ssd_count", "entries")


def vl_pairs(keys: Iterable[str]) -> dict[int, list[tuple[str, str]]]:
    """layer -> (V key, L key) of every group that has both experts."""
    keys = set(keys)
    layers: dict[int, list[tuple[str, str]]] = {}
    for key in sorted(keys):
        parsed = parse_layer_key(key)
        if parsed and parsed[2] == "v":
            partner = key.replace(f".{parsed[1]}.v.", f".{parsed[1]}.l.", 1)
            if partner in keys:
                layers.setdefault(parsed[0], []).append((key, partner))
    return layers


def _pair_histograms(pairs: list[Pair]) -> tuple[torch.Tensor, torch.Tensor]:
    return sum(histogram(p.top_x) for p in pairs), sum(histogram(p.top_y) for p in pairs)


def _trimmed(sums: Sums, pairs: list[Pair], hists: tuple[torch.Tensor, torch.Tensor], density: float) -> Sums:
    threshold = thresholds(pairs, hists, density)
    for pair in pairs:
        sums.add_trimmed(pair, threshold)
    return sums


def _dense(pairs: list[Pair]) -> Sums:
    sums = Sums()
    for pair in pairs:
        sums.add_dense(pair)
    return sums


def distances(layers: dict[int, list[Pair]], density: float = 0.5) -> dict:
    """Every metric per layer and overall (overall thresholds are global, not per layer)."""
    hists = {layer: _pair_histograms(pairs) for layer, pairs in layers.items()}
    per_layer = {layer: _trimmed(_dense(pairs), pairs, hists[layer], density) for layer, pairs in layers.items()}
    overall = Sums(**{name: sum(getattr(s, name) for s in per_layer.values()) for name in DENSE_FIELDS})
    total_hists = (sum(h[0] for h in hists.values()), sum(h[1] for h in hists.values()))
    _trimmed(overall, [pair for pairs in layers.values() for pair in pairs], total_hists, density)
    return {"overall": overall.result(), "layers": {layer: sums.result() for layer, sums in sorted(per_layer.items())}}


def _pair(source, v_key: str, l_key: str) -> Pair:
    v, l = source.read(v_key), source.read(l_key)
    if v.shape != l.shape or not v.is_floating_point() or not l.is_floating_point():
        raise ValueError(f"{source.path}: {v_key} and {l_key} differ in shape or are not floating point")
    return Pair(v, l)


def checkpoint_distances(path, density: float = 0.5, prefix: str = "") -> dict:
    """Metrics of a modality-specific safetensors checkpoint (read lazily, V/L
    weights only; with ``prefix``, of the model stored under it)."""
    from vlcluster.storage.tensorfile import TensorFile

    with TensorFile(path, prefix) as source:
        layers = {
            layer: [_pair(source, v, l) for v, l in pairs]
            for layer, pairs in vl_pairs(source.keys()).items()
        }
    if not layers:
        raise ValueError(f"{path}: no layer has both a V and an L expert (is this a modality-specific checkpoint?)")
    return distances(layers, density)


def format_metrics(result: dict) -> str:
    """A result of :func:`checkpoint_distances` as a Markdown table: overall, then one row per layer."""
    header = "| scope | " + " | ".join(METRICS) + " |"
    lines = [header, "|---|" + "---:|" * len(METRICS)]
    scopes = [("overall", result["overall"])] + [(f"layer {layer}", values) for layer, values in result["layers"].items()]
    for scope, values in scopes:
        lines.append(f"| {scope} | " + " | ".join(f"{values[name]:.4g}" for name in METRICS) + " |")
    return "\n".join(lines)
