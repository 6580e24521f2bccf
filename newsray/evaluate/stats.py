"""Pairwise statistical inference between models on per-example metrics (docs/METRICS.md)."""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy import stats

from newsray.evaluate.metrics import STAT_METRICS

ALPHA = 0.05
NOT_COMPUTABLE = "not computable (n < 2)"  # what a test block says when one paired example cannot carry it
DEFAULT_SEED = 0
DEFAULT_RESAMPLES = 10_000
_BOOTSTRAP_CHUNK = 1_000


def _test_result(statistic: float, pvalue: float, alpha: float) -> dict[str, Any]:
    """The {statistic, pvalue, significant} block of one test."""
    return {
        "statistic": float(statistic),
        "pvalue": float(pvalue),
        "significant": bool(pvalue < alpha),
    }


def paired_ttest(x: np.ndarray, y: np.ndarray, alpha: float = ALPHA) -> dict[str, Any]:
    """scipy.stats.ttest_rel(x, y); identical samples give statistic 0, p 1."""
    if np.array_equal(x, y):
        return _test_result(0.0, 1.0, alpha)
    res = stats.ttest_rel(x, y)
    return _test_result(res.statistic, res.pvalue, alpha)


def wilcoxon_test(x: np.ndarray, y: np.ndarray, alpha: float = ALPHA) -> dict[str, Any]:
    """scipy.stats.wilcoxon(x, y) with scipy's defaults; identical samples give statistic 0, p 1."""
    if np.array_equal(x, y):
        return _test_result(0.0, 1.0, alpha)
    res = stats.wilcoxon(x, y)
    return _test_result(res.statistic, res.pvalue, alpha)


def cohens_d(x: np.ndarray, y: np.ndarray) -> float:
    """(mean x − mean y) / sqrt((var x + var y) / 2), ddof 1; 0 or ±inf when that SD is 0."""
    diff = float(np.mean(x) - np.mean(y))
    pooled = math.sqrt((np.var(x, ddof=1) + np.var(y, ddof=1)) / 2)
    if pooled == 0:
        return 0.0 if diff == 0 else math.copysign(math.inf, diff)
    return diff / pooled


def paired_power(d: float, n: int, alpha: float = ALPHA) -> float:
    """Power of a two-sided paired t-test: df n − 1, noncentrality |d|·sqrt(n)."""
    if math.isinf(d):
        return 1.0
    df = n - 1
    nc = abs(d) * math.sqrt(n)
    crit = stats.t.ppf(1 - alpha / 2, df)
    # P(T < -crit | nc) is written as P(T > crit | -nc): scipy's nct.cdf far in the left
    # tail returns nan for large nc, its sf does not.
    upper, lower = stats.nct.sf(crit, df, nc), stats.nct.sf(crit, df, -nc)
    return min(1.0, float(upper + np.nan_to_num(lower, nan=0.0)))


def bootstrap_ci(
    x: np.ndarray,
    y: np.ndarray,
    seed: int = DEFAULT_SEED,
    n_resamples: int = DEFAULT_RESAMPLES,
    level: float = 0.95,
) -> dict[str, float]:
    """Percentile bootstrap CI of the mean paired difference x − y (indices resampled)."""
    diff = np.asarray(x, dtype=float) - np.asarray(y, dtype=float)
    rng = np.random.default_rng(seed)
    means = np.empty(n_resamples)
    for start in range(0, n_resamples, _BOOTSTRAP_CHUNK):
        stop = min(start + _BOOTSTRAP_CHUNK, n_resamples)
        idx = rng.integers(0, len(diff), size=(stop - start, len(diff)))
        means[start:stop] = diff[idx].mean(axis=1)
    tail = (1 - level) / 2 * 100
    lower, upper = np.percentile(means, [tail, 100 - tail])
    return {"lower": float(lower), "upper": float(upper)}


def compare_metric(
    x: Sequence[float],
    y: Sequence[float],
    metric_name: str,
    seed: int = DEFAULT_SEED,
    n_resamples: int = DEFAULT_RESAMPLES,
    alpha: float = ALPHA,
) -> dict[str, Any]:
    """All tests of model1 (x) against model2 (y) on one per-example metric."""
    xa, ya = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if xa.shape != ya.shape or xa.ndim != 1:
        raise ValueError(f"{metric_name}: paired samples differ ({xa.shape} vs {ya.shape}).")
    m1, m2 = (float(np.mean(xa)), float(np.mean(ya))) if len(xa) else (math.nan, math.nan)
    if len(xa) < 2:  # no variance, no test: the means are still reported, every test says why it is missing
        return {"metric_name": metric_name, "model1_mean": m1, "model2_mean": m2, "mean_difference": m2 - m1,
                "not_computable": NOT_COMPUTABLE, "paired_ttest": None, "wilcoxon_test": None,
                "effect_sizes": {"cohens_d": None}, "confidence_interval": None, "statistical_power": None}
    d = cohens_d(xa, ya)
    return {
        "metric_name": metric_name,
        "model1_mean": m1,
        "model2_mean": m2,
        "mean_difference": m2 - m1,
        "paired_ttest": paired_ttest(xa, ya, alpha),
        "wilcoxon_test": wilcoxon_test(xa, ya, alpha),
        "effect_sizes": {"cohens_d": d},
        "confidence_interval": bootstrap_ci(xa, ya, seed, n_resamples, 1 - alpha),
        "statistical_power": paired_power(d, len(xa), alpha),
    }


def pairwise_inference(
    per_example: Mapping[str, Mapping[str, Sequence[float]]],
    metrics: Sequence[str] = STAT_METRICS,
    seed: int = DEFAULT_SEED,
    n_resamples: int = DEFAULT_RESAMPLES,
    alpha: float = ALPHA,
) -> dict[str, dict[str, dict[str, Any]]]:
    """Every pair of models (in the mapping's order) keyed '<m1>_vs_<m2>', then by metric."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for m1, m2 in itertools.combinations(per_example, 2):
        out[f"{m1}_vs_{m2}"] = {
            name: compare_metric(
                per_example[m1][name], per_example[m2][name], name, seed, n_resamples, alpha
            )
            for name in metrics
        }
    return out
