"""Statistics of paired per-seed differences, for samples as small as a study's seeds.

The headline interval is Student's t (:func:`t_interval`); a percentile
bootstrap sits beside it (too narrow with few values); :func:`sign_flip_test`
is the exact permutation test of a zero mean; :func:`holm` adjusts a family
of p-values; :func:`seeds_needed` says how many seeds an interval of a given
half-width takes. docs/method.md ("Pitfalls") says why.
"""
from __future__ import annotations

import math

import numpy as np
from scipy import stats

LEVEL = 0.95
RESAMPLES = 10_000
"""Bootstrap resamples, and random sign flips beyond :data:`EXACT_MAX_N` pairs."""
BOOTSTRAP_SEED = 0
EXACT_MAX_N = 20
"""Up to this many pairs the sign-flip test enumerates all 2^n flips."""
HALF_WIDTH = 0.005
"""Target 95% half-width for :func:`seeds_needed` (in the metric's units)."""


def t_interval(values, level: float = LEVEL) -> tuple[float, float] | None:
    """Student t interval of the mean (quantile from :data:`scipy.stats.t`); None with fewer than two
    values. Equal values give the point itself."""
    x = np.asarray(values, dtype=float)
    if x.size < 2:
        return None
    half = float(stats.t.ppf((1 + level) / 2, x.size - 1)) * float(x.std(ddof=1)) / math.sqrt(x.size)
    return float(x.mean() - half), float(x.mean() + half)


def bootstrap_interval(values, resamples: int = RESAMPLES, seed: int = BOOTSTRAP_SEED,
                       level: float = LEVEL) -> tuple[float, float] | None:
    """Percentile bootstrap interval of the mean (:func:`scipy.stats.bootstrap`, seeded); None with fewer
    than two values. Too narrow with few values: shown beside the t interval, never instead of it."""
    x = np.asarray(values, dtype=float)
    if x.size < 2:
        return None
    res = stats.bootstrap((x,), np.mean, n_resamples=resamples, confidence_level=level, method="percentile",
                          vectorized=True, rng=np.random.default_rng(seed))
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def _mean_stat(x, axis=-1):
    return np.mean(x, axis=axis)


def sign_flip_test(values, resamples: int = RESAMPLES, seed: int = BOOTSTRAP_SEED,
                   exact_max: int = EXACT_MAX_N) -> dict | None:
    """Two-sided sign-flip permutation test of a zero mean of paired differences: under the null each
    difference is as likely negated, so p is the share of sign assignments whose mean is at least as far
    from zero as the observed one. Up to ``exact_max`` differences all 2^n assignments are enumerated
    (explicitly: their 2^n sums built by doubling), so p is exact and cannot go below 2/2^n (0.0625 for 5
    pairs); beyond, ``resamples`` seeded random flips (:func:`scipy.stats.permutation_test`,
    ``permutation_type="samples"``). ``{"p", "method", "p_min"}``, None for no difference."""
    x = np.asarray(values, dtype=float)
    if x.size == 0:
        return None
    if x.size <= exact_max:
        sums = np.zeros(1)
        for v in x:
            sums = np.concatenate((sums + v, sums - v))
        tolerance = 1e-9 * float(np.abs(x).sum())  # sums equal in exact arithmetic, apart in rounding
        p = float(np.mean(np.abs(sums) >= abs(float(x.sum())) - tolerance))
        return {"p": p, "method": "exact", "p_min": min(1.0, 2.0 ** (1 - x.size))}
    res = stats.permutation_test((x,), _mean_stat, permutation_type="samples", n_resamples=resamples,
                                 alternative="two-sided", vectorized=True, rng=np.random.default_rng(seed))
    return {"p": float(res.pvalue), "method": f"monte carlo ({resamples} flips)", "p_min": 2.0 / (resamples + 1)}


def holm(pvalues) -> list[float]:
    """Holm's step-down adjustment of ``pvalues`` (one family), in their order: the i-th smallest p times
    (m - i + 1), made non-decreasing in that order, capped at 1. It controls the family-wise error rate
    under any dependence between the tests."""
    p = np.asarray(pvalues, dtype=float)
    m = p.size
    if m == 0:
        return []
    order = np.argsort(p, kind="stable")
    adjusted = np.minimum(1.0, np.maximum.accumulate((m - np.arange(m)) * p[order]))
    out = np.empty(m)
    out[order] = adjusted
    return out.tolist()


def seeds_needed(sd: float | None, half_width: float = HALF_WIDTH, level: float = LEVEL) -> int | None:
    """Smallest n >= 2 with t_{(1+level)/2, n-1} * sd / sqrt(n) <= half_width: the seeds (pairs) a
    ``level`` t interval of that half-width needs at spread ``sd``. None without a spread."""
    if sd is None or not math.isfinite(sd) or half_width <= 0:
        return None
    if sd == 0:
        return 2
    q = (1 + level) / 2
    n = max(2, math.ceil((stats.norm.ppf(q) * sd / half_width) ** 2))  # t > z: no smaller n can do
    while stats.t.ppf(q, n - 1) * sd / math.sqrt(n) > half_width:
        n += 1
    return n
