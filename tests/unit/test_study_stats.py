"""The study's intervals against scipy.stats on fixed data (scipy is the reference only;
the report computes them without it)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from vlcluster.study import stats

scipy_stats = pytest.importorskip("scipy.stats", reason="scipy (the [test] extra) is the reference for these checks")

# Retrieval scores of three replicates of two arms, paired by replicate (same pre-training run).
MERGED = [46.83, 57.10, 50.21]
UNMERGED = [51.98, 48.02, 49.10]


@pytest.mark.parametrize("df", [1, 2, 3, 4, 7, 12, 30, 120])
@pytest.mark.parametrize("p", [0.55, 0.9, 0.975, 0.995, 0.025])
def test_t_quantile_matches_scipy(df, p):
    assert stats.t_quantile(p, df) == pytest.approx(scipy_stats.t.ppf(p, df), rel=1e-10, abs=1e-12)


def test_mean_interval_is_scipys_t_interval():
    interval = stats.mean_interval(MERGED)
    low, high = scipy_stats.t.interval(0.95, len(MERGED) - 1, loc=np.mean(MERGED), scale=scipy_stats.sem(MERGED))
    assert (interval.low, interval.high) == pytest.approx((low, high), rel=1e-10)
    assert interval.estimate == pytest.approx(np.mean(MERGED)) and interval.n == 3 and interval.basis == "replicates"
    ninety = stats.mean_interval(MERGED, level=0.9)
    assert (ninety.low, ninety.high) == pytest.approx(scipy_stats.t.interval(0.9, 2, loc=np.mean(MERGED), scale=scipy_stats.sem(MERGED)))


def test_one_replicate_has_no_t_interval():
    interval = stats.mean_interval([42.0])
    assert interval.estimate == 42.0 and not interval.defined
    assert not interval.above(0) and not interval.below(100)  # no interval decides nothing
    assert "no interval" in interval.describe()


def test_paired_difference_is_scipys_paired_t_interval():
    interval = stats.paired_interval(MERGED, UNMERGED)
    reference = scipy_stats.ttest_rel(MERGED, UNMERGED).confidence_interval(0.95)
    assert (interval.low, interval.high) == pytest.approx((reference.low, reference.high), rel=1e-10)
    assert interval.basis == "paired replicates"
    with pytest.raises(ValueError, match="same replicates"):
        stats.paired_interval(MERGED, UNMERGED[:2])


def test_pairing_removes_the_shared_run_to_run_spread():
    # Each replicate moves both arms together; the merged one is always 1.5 lower.
    unmerged = [40.0, 55.0, 47.0, 61.0]
    merged = [u - 1.5 + e for u, e in zip(unmerged, (0.1, -0.1, 0.05, -0.05))]
    assert stats.paired_interval(unmerged, merged).above(0)
    unpaired = stats.mean_interval(unmerged)
    assert unpaired.low < stats.mean_interval(merged).estimate  # the unpaired intervals overlap


def test_bootstrap_over_items_matches_scipys_percentile_bootstrap():
    rng = np.random.default_rng(7)
    correct = (rng.random(400) < 0.62).astype(float)  # 400 questions, 0/1 each
    interval = stats.bootstrap_interval([correct])
    reference = scipy_stats.bootstrap((correct,), np.mean, method="percentile", n_resamples=10_000, random_state=0).confidence_interval
    width = reference.high - reference.low
    # Two Monte-Carlo bootstraps of 10,000 resamples agree to a few percent of the width.
    assert interval.low == pytest.approx(reference.low, abs=0.05 * width)
    assert interval.high == pytest.approx(reference.high, abs=0.05 * width)
    assert interval.estimate == pytest.approx(correct.mean()) and interval.basis == "items (bootstrap)" and interval.n == 400


def test_paired_bootstrap_of_a_difference_matches_scipy():
    rng = np.random.default_rng(3)
    first = rng.random(300)
    second = np.clip(first - 0.05 + rng.normal(0, 0.1, 300), 0, 1)  # the same items answered by a second model
    interval = stats.bootstrap_interval([first, second], stats.mean_difference)
    reference = scipy_stats.bootstrap((first, second), lambda a, b, axis=-1: a.mean(axis=axis) - b.mean(axis=axis),
                                      paired=True, method="percentile", n_resamples=10_000, random_state=0).confidence_interval
    width = reference.high - reference.low
    assert (interval.low, interval.high) == pytest.approx((reference.low, reference.high), abs=0.05 * width)
    assert interval.estimate == pytest.approx(first.mean() - second.mean())
    assert interval.above(0)


def test_pearson_fisher_interval_and_exact_permutation_p_match_scipy():
    distance = [9.61, 6.22, 4.92, 2.87, 7.5, 3.9]
    drop = [8.1, 4.2, 3.9, 0.6, 5.0, 2.8]
    found = stats.pearson_interval(distance, drop)
    reference = scipy_stats.pearsonr(distance, drop)
    assert found.r == pytest.approx(reference.statistic, rel=1e-12)
    interval = reference.confidence_interval(0.95)
    assert (found.low, found.high) == pytest.approx((interval.low, interval.high), rel=1e-10)
    exact = scipy_stats.pearsonr(distance, drop, method=scipy_stats.PermutationMethod()).pvalue  # 6! pairings: exact
    assert found.p_value == pytest.approx(exact, rel=1e-12)
    assert 0 < found.p_value < 0.05


def test_study_md_table5_is_no_correlation_at_all():
    # docs/study.md, Table 5: L2 against the retrieval drop over the four K_seed.
    found = stats.pearson_interval([9.61, 6.22, 4.92, 2.87], [-1.13, 3.62, -6.79, 0.61])
    reference = scipy_stats.pearsonr([9.61, 6.22, 4.92, 2.87], [-1.13, 3.62, -6.79, 0.61])
    assert (found.low, found.high) == pytest.approx(tuple(reference.confidence_interval()), rel=1e-10)
    assert found.low < 0 < found.high and found.p_value == 1.0


def test_sampled_permutation_p_is_close_to_scipys():
    rng = np.random.default_rng(11)
    x = rng.normal(size=14)
    y = 0.5 * x + rng.normal(size=14)
    found = stats.pearson_interval(x, y)
    reference = scipy_stats.pearsonr(x, y, method=scipy_stats.PermutationMethod(n_resamples=10_000, random_state=0)).pvalue
    assert found.p_value == pytest.approx(reference, abs=0.01)


def test_correlation_is_undefined_without_spread_or_points():
    assert math.isnan(stats.pearson_interval([1.0, 2.0], [3.0, 4.0]).r)
    assert math.isnan(stats.pearson_interval([1.0, 1.0, 1.0], [3.0, 4.0, 5.0]).r)
    three = stats.pearson_interval([1.0, 2.0, 3.0], [1.0, 3.0, 2.0])
    assert not math.isnan(three.r) and math.isnan(three.low)  # Fisher z needs 4 points
