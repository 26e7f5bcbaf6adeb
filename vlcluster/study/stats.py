"""How sure is a number of the study? Intervals over replicates or evaluation items.

Replicates are runs of one arm that differ only in their seeds (initial weights
and data order); their spread is what a reader must compare an effect with.
Every interval here is two-sided at ``level`` (95 % by default):

- ``mean_interval``: a mean over replicates, Student's t.
- ``paired_interval``: the mean of differences taken *within* each replicate
  (merged minus unmerged of the same pre-training run), Student's t on the
  differences: the run-to-run spread that both arms share cancels.
- ``bootstrap_interval``: with one replicate, a percentile bootstrap over the
  evaluation items (questions, images, captions). It says how far the score
  could move on other items of the same distribution, *not* how far another
  training run could land: it is the narrower interval and is labelled so.
- ``pearson_interval``: Pearson r with a Fisher-z interval and a permutation
  p-value (exact over every pairing for up to 8 points).

Plain Python and numpy: the t quantile comes from the regularised incomplete
beta function, so the report needs no scipy (the tests check against it).
"""

from __future__ import annotations

import itertools
import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

LEVEL = 0.95
BOOTSTRAP_RESAMPLES = 10_000
PERMUTATION_RESAMPLES = 10_000
EXACT_PERMUTATION_POINTS = 8  # 8! = 40,320 pairings: exact below this, sampled above


@dataclass(frozen=True)
class Interval:
    """An estimate with its interval; ``basis`` says what the interval is over."""

    estimate: float
    low: float
    high: float
    n: int  # replicates, or items for a bootstrap
    basis: str  # "replicates", "paired replicates", "items (bootstrap)", "single value"

    @property
    def defined(self) -> bool:
        return math.isfinite(self.low) and math.isfinite(self.high)

    def above(self, value: float = 0.0) -> bool:
        return self.defined and self.low > value

    def below(self, value: float = 0.0) -> bool:
        return self.defined and self.high < value

    def describe(self, digits: int = 2) -> str:
        if not self.defined:
            return f"{self.estimate:.{digits}f} (no interval: {self.basis})"
        return f"{self.estimate:.{digits}f} [{self.low:.{digits}f}, {self.high:.{digits}f}] ({self.basis}, n = {self.n})"


def single(value: float) -> Interval:
    return Interval(value, math.nan, math.nan, 1, "single value")


# ---- Student's t ------------------------------------------------------------------


def _incomplete_beta(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta I_x(a, b), by its continued fraction (modified Lentz)."""
    if x <= 0:
        return 0.0
    if x >= 1:
        return 1.0
    if x > (a + 1) / (a + b + 2):  # the fraction converges fast only below this point
        return 1.0 - _incomplete_beta(b, a, 1.0 - x)
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)) / a
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    fraction = d
    for m in range(1, 500):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            fraction *= c * d
        if abs(c * d - 1.0) < 1e-15:
            break
    return front * fraction


def t_cdf(t: float, df: float) -> float:
    tail = 0.5 * _incomplete_beta(df / 2, 0.5, df / (df + t * t))
    return 1.0 - tail if t > 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The ``p`` quantile of Student's t with ``df`` degrees of freedom (bisection on the CDF)."""
    if not 0 < p < 1:
        raise ValueError(f"quantile of t: p = {p} is not in (0, 1)")
    if p < 0.5:
        return -t_quantile(1 - p, df)
    low, high = 0.0, 1.0
    while t_cdf(high, df) < p:
        high *= 2
    for _ in range(200):
        middle = (low + high) / 2
        low, high = (middle, high) if t_cdf(middle, df) < p else (low, middle)
        if high - low < 1e-13 * max(1.0, high):
            break
    return (low + high) / 2


# ---- intervals ----------------------------------------------------------------------


def mean_interval(values: Sequence[float], level: float = LEVEL, basis: str = "replicates") -> Interval:
    """Mean ± t_{(1+level)/2, n-1} · s/√n; one value has no interval."""
    values = [float(v) for v in values]
    if not values:
        raise ValueError("an interval needs at least one value")
    mean = statistics.fmean(values)
    if len(values) < 2:
        return single(mean)
    half = t_quantile((1 + level) / 2, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
    return Interval(mean, mean - half, mean + half, len(values), basis)


def paired_interval(first: Sequence[float], second: Sequence[float], level: float = LEVEL) -> Interval:
    """``first`` minus ``second``, pair by pair (one pair per replicate), and the t interval of that mean."""
    if len(first) != len(second):
        raise ValueError(f"paired difference: {len(first)} values against {len(second)}; pairs come from the same replicates")
    return mean_interval([a - b for a, b in zip(first, second)], level, basis="paired replicates")


def bootstrap_interval(columns: Sequence[Sequence[float]], statistic: Callable[..., np.ndarray] | None = None,
                       level: float = LEVEL, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> Interval:
    """Percentile bootstrap over items: every column is resampled with the same item indices
    (paired items: the same question answered by two models). ``statistic`` takes the
    resampled columns as arrays of shape (resamples, items) and returns one value per
    resample; the default is the mean of the one column."""
    arrays = [np.asarray(column, dtype=float) for column in columns]
    if not arrays or len({len(a) for a in arrays}) != 1 or len(arrays[0]) < 2:
        raise ValueError("a bootstrap needs columns of equal length with at least two items")
    statistic = statistic or (lambda values: values.mean(axis=-1))
    estimate = float(statistic(*(a[None, :] for a in arrays))[0])
    rng = np.random.default_rng(seed)
    items = len(arrays[0])
    block = max(1, min(1000, 2_000_000 // items))  # resamples per block: about 16 MB of indices at a time
    draws = []
    for start in range(0, resamples, block):
        index = rng.integers(0, items, size=(min(block, resamples - start), items))
        draws.append(statistic(*(a[index] for a in arrays)))
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(np.concatenate(draws), [tail, 100 - tail])
    return Interval(estimate, float(low), float(high), len(arrays[0]), "items (bootstrap)")


def mean_difference(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """A bootstrap statistic: mean of ``first`` minus mean of ``second`` per resample."""
    return first.mean(axis=-1) - second.mean(axis=-1)


# ---- correlation ----------------------------------------------------------------------


@dataclass(frozen=True)
class Correlation:
    r: float
    low: float  # Fisher-z interval; NaN with fewer than 4 points
    high: float
    p_value: float  # two-sided permutation p-value
    n: int

    def describe(self) -> str:
        if math.isnan(self.r):
            return f"undefined (n = {self.n})"
        shown = f"[{self.low:.2f}, {self.high:.2f}]" if math.isfinite(self.low) else "[no interval below 4 points]"
        return f"{self.r:.2f} {shown}, permutation p = {self.p_value:.3g} (n = {self.n})"


def _r(xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Pearson r of ``xs`` against each row of ``ys``."""
    dx = xs - xs.mean()
    dy = ys - ys.mean(axis=-1, keepdims=True)
    return (dy @ dx) / (np.sqrt((dx * dx).sum()) * np.sqrt((dy * dy).sum(axis=-1)))


def pearson_interval(xs: Sequence[float], ys: Sequence[float], level: float = LEVEL,
                     resamples: int = PERMUTATION_RESAMPLES, seed: int = 0) -> Correlation:
    """Pearson r, its Fisher-z interval (tanh(atanh r ± z/√(n-3))) and a two-sided permutation p-value:
    twice the smaller tail of r over re-pairings of the points (every pairing up to 8 points)."""
    x, y = np.asarray(xs, dtype=float), np.asarray(ys, dtype=float)
    n = len(x)
    if n != len(y):
        raise ValueError(f"correlation: {n} x values against {len(y)} y values")
    if n < 3 or np.ptp(x) == 0 or np.ptp(y) == 0 or not (np.isfinite(x).all() and np.isfinite(y).all()):
        return Correlation(math.nan, math.nan, math.nan, math.nan, n)
    r = float(np.clip(_r(x, y[None, :])[0], -1.0, 1.0))
    low = high = math.nan
    if n > 3:
        z, spread = math.atanh(min(max(r, -1 + 1e-15), 1 - 1e-15)), statistics.NormalDist().inv_cdf((1 + level) / 2) / math.sqrt(n - 3)
        low, high = math.tanh(z - spread), math.tanh(z + spread)
    return Correlation(r, low, high, _permutation_p(x, y, r, resamples, seed), n)


def _permutation_p(x: np.ndarray, y: np.ndarray, r: float, resamples: int, seed: int) -> float:
    exact = len(y) <= EXACT_PERMUTATION_POINTS
    if exact:
        permuted = np.array([y[list(order)] for order in itertools.permutations(range(len(y)))])
    else:
        rng = np.random.default_rng(seed)
        permuted = np.array([rng.permutation(y) for _ in range(resamples)])
    null = _r(x, permuted)
    tolerance = 1e-12 * max(abs(r), 1.0)  # r of the same pairing computed twice may differ in the last bit
    greater, less = (null >= r - tolerance).sum(), (null <= r + tolerance).sum()
    if exact:
        tails = greater / len(null), less / len(null)
    else:  # the observed pairing counts as one of the draws: p is never 0
        tails = (greater + 1) / (len(null) + 1), (less + 1) / (len(null) + 1)
    return float(min(1.0, 2 * min(tails)))
