"""Statistics of paired per-seed differences, for samples as small as a study's seeds: docs/method.md
("Pitfalls") says why a t interval, an exact sign-flip test and Holm's adjustment."""
from __future__ import annotations

import math

import numpy as np
from scipy import stats

from comod_platform.conventions import better

LEVEL = 0.95
RESAMPLES = 10_000
"""Bootstrap resamples, and random sign flips beyond :data:`EXACT_MAX_N` pairs."""
BOOTSTRAP_SEED = 0
EXACT_MAX_N = 20
"""Up to this many pairs the sign-flip test enumerates all 2^n flips."""
HALF_WIDTH = 0.005
"""Target 95% half-width for :func:`seeds_needed` (in the metric's units)."""
ROUGH_N = 8
"""Fewer seeds than this: the interval is rough."""


def t_half_width(sd, n: int):
    """Half-width of the Student t interval of a mean of ``n`` values of spread ``sd`` (or an array of them)."""
    return stats.t.ppf((1 + LEVEL) / 2, n - 1) * sd / math.sqrt(n)


def t_interval(values) -> tuple[float, float] | None:
    """Student t interval of the mean; None with fewer than two values."""
    x = np.asarray(values, dtype=float)
    if x.size < 2:
        return None
    half = float(t_half_width(float(x.std(ddof=1)), x.size))
    return float(x.mean() - half), float(x.mean() + half)


def bootstrap_interval(values, resamples: int = RESAMPLES, seed: int = BOOTSTRAP_SEED) -> tuple[float, float] | None:
    """Seeded percentile bootstrap interval of the mean; None with fewer than two values."""
    x = np.asarray(values, dtype=float)
    if x.size < 2:
        return None
    res = stats.bootstrap((x,), np.mean, n_resamples=resamples, confidence_level=LEVEL, method="percentile",
                          vectorized=True, rng=np.random.default_rng(seed))
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def sign_flip_test(values, resamples: int = RESAMPLES, seed: int = BOOTSTRAP_SEED) -> dict | None:
    """Two-sided sign-flip test of a zero mean: ``{"p", "method", "p_min"}``, None for no value. Up to
    :data:`EXACT_MAX_N` values all 2^n flips are enumerated (p >= 2/2^n); beyond, ``resamples`` seeded ones."""
    x = np.asarray(values, dtype=float)
    if x.size == 0:
        return None
    if x.size <= EXACT_MAX_N:
        sums = np.zeros(1)
        for v in x:  # the 2^n sums, built by doubling
            sums = np.concatenate((sums + v, sums - v))
        tolerance = 1e-9 * float(np.abs(x).sum())  # sums equal in exact arithmetic, apart in rounding
        p = float(np.mean(np.abs(sums) >= abs(float(x.sum())) - tolerance))
        return {"p": p, "method": "exact", "p_min": min(1.0, 2.0 ** (1 - x.size))}
    res = stats.permutation_test((x,), lambda v, axis=-1: np.mean(v, axis=axis), permutation_type="samples",
                                 n_resamples=resamples, vectorized=True, rng=np.random.default_rng(seed))
    return {"p": float(res.pvalue), "method": f"monte carlo ({resamples} flips)", "p_min": 2.0 / (resamples + 1)}


def holm(pvalues) -> list[float]:
    """Holm's step-down adjustment of one family of p-values, in their order."""
    p = np.asarray(pvalues, dtype=float)
    order = np.argsort(p, kind="stable")
    out = np.empty(p.size)
    out[order] = np.minimum(1.0, np.maximum.accumulate((p.size - np.arange(p.size)) * p[order]))
    return out.tolist()


def seeds_needed(sd: float | None, half_width: float = HALF_WIDTH) -> int | None:
    """Smallest n >= 2 whose t interval at spread ``sd`` has at most ``half_width``; None without a spread."""
    if sd is None or not math.isfinite(sd) or half_width <= 0:
        return None
    n = max(2, math.ceil((stats.norm.ppf((1 + LEVEL) / 2) * sd / half_width) ** 2))  # t > z: no smaller n can do
    while t_half_width(sd, n) > half_width:
        n += 1
    return n


def summary(values) -> dict:
    """n, mean, std, median, min and max of ``values`` (None where undefined)."""
    x = np.asarray(values, dtype=float)
    if not x.size:
        return {"n": 0, "mean": None, "std": None, "median": None, "min": None, "max": None}
    return {"n": int(x.size), "mean": float(x.mean()), "std": float(x.std(ddof=1)) if x.size > 1 else None,
            "median": float(np.median(x)), "min": float(x.min()), "max": float(x.max())}


def paired_stats(diffs, mode: str, resamples: int = RESAMPLES, seed: int = BOOTSTRAP_SEED, seeds=None,
                 half_width: float | None = HALF_WIDTH) -> dict:
    """All a report says of paired differences (``a_better`` by ``mode``); with ``seeds`` (each one's unit) and
    fewer units than differences, ``by_seed`` over the per-unit means too: a shared pretraining ties differences."""
    x = np.asarray(diffs, dtype=float)
    sd = float(x.std(ddof=1)) if x.size > 1 else None
    t_ci, boot, test = t_interval(x), bootstrap_interval(x, resamples, seed), sign_flip_test(x, resamples, seed)
    out = {"n": int(x.size), "differences": x.tolist(), "mean": float(x.mean()) if x.size else None, "sd": sd,
           "ci95": list(t_ci) if t_ci else None, "bootstrap_ci95": list(boot) if boot else None,
           "p_sign_flip": test and test["p"], "p_method": test and test["method"], "p_min": test and test["p_min"],
           "p_holm": None, "seeds_needed": seeds_needed(sd, half_width) if half_width else None,
           "rough": 0 < x.size < ROUGH_N, "a_better": sum(better(d, 0, mode) for d in x.tolist()),
           "ties": int(np.sum(x == 0))}
    if seeds is not None and len(units := sorted(set(map(str, seeds)))) < len(diffs):
        means = [float(np.mean([d for d, s in zip(diffs, seeds) if str(s) == u])) for u in units]
        out["by_seed"] = paired_stats(means, mode, resamples, seed, half_width=half_width)
    return out
