"""Modulation conditions compared across a search's trials (docs/method.md, "Claims to test").

``compare(name)`` reads the search's completed trials and reports, by the
search metric (or ``metric``):

- per **condition** (:func:`condition`: the kind plus its variant, e.g.
  ``none[heads]``, ``stochastic[shuffled]``): trial counts, the best trial,
  the distribution;
- **paired differences** for the pairs :func:`comparisons` lists (stochastic -
  deterministic first): trials that share every setting except the kind, the
  kind-only settings (:data:`KIND_ONLY`) and the variant settings
  (:data:`VARIANTS`) form a matched group; a group's trials of one condition
  are averaged, giving one difference per group. Per pair: n, the mean, the
  Student t 95% interval (the headline), a seeded percentile bootstrap
  interval beside it, a two-sided sign-flip p-value (:func:`sign_flip_test`),
  the seeds a 95% half-width of :data:`HALF_WIDTH` would need
  (:func:`seeds_needed`) and, where groups share a pretrained network (seed, data, model and pretraining settings), the same
  over per-seed means (``by_seed``, the unit). Holm's adjustment
  (:func:`holm`) runs within each family of comparisons (:data:`HOLM_FAMILIES`: the
  search metric over the pairs of conditions, each test metric, the per-setting splits, the
  efficiency measures; ``holm``);
- the same for the test metrics (``paired_metrics``), per value of each
  varied setting (``by_setting``) and per noise scale (``by_noise_scale``),
  numeric settings with many or sampled values in quantile bins; per-task
  win rates of stochastic over deterministic;
- ``efficiency``: fine-tuning curves per arm and condition with a t 95%
  band, the paired normalised AUC and steps to reach :data:`FRACTIONS` of
  deterministic's final score;
- ``pretraining``: validation curves over pretraining and a plateau check;
- ``cost`` (:func:`study_cost`): the share of slot time spent waiting for a
  pretraining, the pretrainings made and an estimate of the wall time a
  per-kind pretraining design would have taken;
- ``importances``: Optuna's parameter importances (fANOVA) per kind.

It writes ``compare.md``, ``compare.json`` and PNG plots into ``out_dir``
(default the search folder's ``compare/``), logs them to the search's parent
MLflow run and returns the numbers as a dict. With too few trials or no
matched groups the report says so instead of inventing numbers.
"""
from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

from comod.config import GROUPS
from comod.pretrain_cache import DETERMINING
from comod_platform.conventions import (COMPLETED, FAILED, PRUNED, RUNNING, WALL, best_of, better, direction,
                                        reaches)
from comod_platform.results import KINDS, TrialRecord, guess_mode, load_results
from comod_platform.stats import (BOOTSTRAP_SEED, EXACT_MAX_N, HALF_WIDTH, LEVEL, RESAMPLES, bootstrap_interval,
                                  holm, seeds_needed, sign_flip_test, t_interval)

log = logging.getLogger(__name__)

KIND_ONLY = ("modulation.noise_scale", "modulation.gain_form")
KIND_ONLY_PREFIXES = ("modulation.readout.",)
"""Settings that matter for one kind only; left out when matching trials."""
VARIANTS = ("finetune.trainable", "modulation.readout.shuffle", "finetune.readout_reset")
"""Settings that make a condition of a kind (:func:`condition`); left out when matching trials."""
DEFAULT_TRAINABLE = ("controller",)
READOUT_KINDS = ("stochastic",)
"""Kinds with a readout gain, the only ones ``modulation.readout.shuffle`` and ``finetune.readout_reset``
change."""
CARRIED = "readout carried"
"""Condition part of a stochastic trial whose readout estimate carries over from pretraining
(``finetune.readout_reset: false``)."""
HEADLINE = ("stochastic", "deterministic")
SHUFFLED = "stochastic[shuffled]"
COMPARISONS = (("stochastic", "deterministic"), ("stochastic", "none"), ("deterministic", "none"))
"""Pairs every report lists (with no pairs where a condition is missing); see :func:`comparisons`."""
ROUGH_N = 8
"""Fewer seeds than this: the Markdown warns that the interval is rough."""
ARTIFACT_PATH = "compare"
PAIRED_METRICS = ("test/mean_f1", "test/mean_recall", "test/mean_precision", "test/mean_ece", "test/mean_accuracy")
"""Test metrics every comparison reports besides the search metric (``paired_metrics``)."""
FRACTIONS = (0.9, 0.95)
"""Efficiency: fine-tuning steps to reach these fractions of the deterministic trial's final score."""
MAX_LEVELS = 6
"""A numeric setting with more distinct values, or floats sampled from a range, is split into :data:`BINS`
quantile bins (by_setting, by_noise_scale and the fine-tuning curves' panels)."""
BINS = 4
MAX_PANELS = 12
"""Most panels of the fine-tuning curves: settings with the most levels stop being arms beyond it."""
KIND_COLOURS = {"none": "tab:grey", "deterministic": "tab:blue", "stochastic": "tab:orange"}
_SPARE_COLOURS = ("tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan")
MARGINS = {"left": 0.08, "right": 0.98, "bottom": 0.14, "top": 0.86, "wspace": 0.25, "hspace": 0.45}
"""Fixed margins (see plots.py: no tight layout)."""
_TASK_F1 = re.compile(r"^test/([^/]+)/f1$")


class CompareError(RuntimeError):
    """The comparison cannot be made; the message says why."""


# ----------------------------------------------------------------- conditions and matching

def _truthy(value: Any) -> bool:
    return value is True or (isinstance(value, str) and value.strip().lower() == "true")


def _kind_of(cond: str) -> str:
    return cond.split("[", 1)[0]


def condition(trial: TrialRecord) -> str:
    """The trial's condition: its kind, plus in brackets what sets it apart from the kind's default run:
    the groups fine-tuning trains when not only the controller (``none[heads]``, ``none[decoder+heads]``)
    ``shuffled`` for a readout gain applied with its units permuted (``stochastic[shuffled]``, the
    control), and ``readout carried`` for a readout that does not restart when fine-tuning starts. Absent
    settings take their defaults (older trials have neither setting)."""
    kind = trial.kind or trial.flat.get("modulation.kind") or "unknown"
    parts = []
    trainable = trial.flat.get("finetune.trainable")
    if trainable is not None:
        groups = [trainable] if isinstance(trainable, str) else list(trainable)
        if sorted(groups) != sorted(DEFAULT_TRAINABLE):
            order = {g: i for i, g in enumerate(GROUPS)}
            parts.append("+".join(sorted(groups, key=lambda g: (order.get(g, len(order)), g))) or "nothing")
    if kind in READOUT_KINDS and _truthy(trial.flat.get("modulation.readout.shuffle")):
        parts.append("shuffled")
    if kind in READOUT_KINDS and not _truthy(trial.flat.get("finetune.readout_reset", True)):
        parts.append(CARRIED)
    return f"{kind}[{','.join(parts)}]" if parts else kind


def _condition_order(cond: str) -> tuple:
    """stochastic, deterministic, none, other kinds; a kind's plain condition before its variants."""
    kind = _kind_of(cond)
    return ({"stochastic": 0, "deterministic": 1, "none": 2}.get(kind, 3), kind, cond != kind, cond)


def _headline(present: list[str]) -> tuple[str, str]:
    """stochastic - deterministic; where neither plain kind ran but both kinds ran with the same variant
    (e.g. ``[heads+controller]`` when new tasks open their heads), that pair."""
    if "stochastic" in present or "deterministic" in present:
        return HEADLINE
    for cond in present:
        twin = "deterministic" + cond[len("stochastic"):]
        if _kind_of(cond) == "stochastic" and cond != "stochastic" and twin in present:
            return cond, twin
    return HEADLINE


def comparisons(present) -> list[tuple[str, str]]:
    """The pairs a report compares (first minus second), in this order: stochastic - deterministic (the
    headline; :func:`_headline`); stochastic - stochastic[shuffled] (the control) where present; stochastic, then
    deterministic, minus each none condition present; then every
    other pair of the ``present`` conditions, both in :func:`_condition_order`."""
    present = sorted(set(present), key=_condition_order)
    nones = sorted({c for c in present if _kind_of(c) == "none"}, key=_condition_order)
    headline = _headline(present)
    out = [headline] + ([("stochastic", SHUFFLED)] if SHUFFLED in present else [])
    out += [(a, n) for a in headline for n in nones]
    seen = {frozenset(p) for p in out}
    for i, a in enumerate(present):
        for b in present[i + 1:]:
            if frozenset((a, b)) not in seen:
                seen.add(frozenset((a, b)))
                out.append((a, b))
    return out


def _unmatched(path: str) -> bool:
    return path == "modulation.kind" or path in KIND_ONLY or path.startswith(KIND_ONLY_PREFIXES) or path in VARIANTS


def match_key(trial: TrialRecord) -> str:
    """Every setting but the kind, the kind-only settings and the variant settings, as canonical text."""
    return json.dumps({p: v for p, v in trial.flat.items() if not _unmatched(p)}, sort_keys=True, default=str)


def matched_groups(trials: list[TrialRecord]) -> dict[str, dict[str, list[TrialRecord]]]:
    """``{match_key: {condition: [trials]}}``: trials that differ only in the condition (and kind-only
    settings)."""
    groups: dict[str, dict[str, list[TrialRecord]]] = {}
    for t in trials:
        groups.setdefault(match_key(t), {}).setdefault(condition(t), []).append(t)
    return groups


def _stats(diffs: list[float], mode: str, resamples: int, seed: int, half_width: float | None) -> dict:
    """Everything the report says about one set of paired differences."""
    x = np.asarray(diffs, dtype=float)
    n = int(x.size)
    sd = float(x.std(ddof=1)) if n > 1 else None
    t_ci, boot = t_interval(x), bootstrap_interval(x, resamples, seed)
    test = sign_flip_test(x, resamples, seed)
    return {"n": n, "differences": [float(d) for d in diffs], "mean": float(x.mean()) if n else None, "sd": sd,
            "ci95": list(t_ci) if t_ci else None, "bootstrap_ci95": list(boot) if boot else None,
            "p_sign_flip": test["p"] if test else None, "p_method": test["method"] if test else None,
            "p_min": test["p_min"] if test else None, "p_holm": None,
            "seeds_needed": seeds_needed(sd, half_width) if half_width else None, "rough": 0 < n < ROUGH_N,
            "a_better": sum(better(d, 0, mode) for d in diffs), "ties": sum(d == 0 for d in diffs)}


def _difference(diffs: list[float], mode: str, resamples: int, seed: int, seeds: list | None = None,
                half_width: float | None = HALF_WIDTH) -> dict:
    """:func:`_stats` of paired differences. With ``seeds`` (the training seed of each difference) and fewer
    seeds than differences, also ``by_seed``: the same over the differences averaged per seed. Groups that
    share a seed share its pretraining (e.g. the arms of a few-shot sweep fine-tune one pretrained model),
    so they are not independent: the seed is the unit."""
    out = _stats(diffs, mode, resamples, seed, half_width)
    if seeds is not None and len(set(map(str, seeds))) < len(diffs):
        per: dict[str, list[float]] = {}
        for d, s in zip(diffs, seeds):
            per.setdefault(str(s), []).append(d)
        means = [float(np.mean(v)) for _, v in sorted(per.items())]
        out["by_seed"] = _stats(means, mode, resamples, seed, half_width)
    return out


def _summary(values: list[float]) -> dict:
    if not values:
        return {"n": 0, "mean": None, "std": None, "median": None, "min": None, "max": None}
    x = np.asarray(values, dtype=float)
    return {"n": int(x.size), "mean": float(x.mean()), "std": float(x.std(ddof=1)) if x.size > 1 else None,
            "median": float(np.median(x)), "min": float(x.min()), "max": float(x.max())}


def _mean_of(trials: list[TrialRecord], key: str) -> float | None:
    values = [t.final[key] for t in trials if key in t.final and not math.isnan(t.final[key])]
    return float(np.mean(values)) if values else None


UNIT_SECTIONS = ("seed", "precision", "data", "model", "pretrain")
"""Sections whose settings make a matched group's pretrained network (the kind aside): groups equal in them
fine-tune one pretraining (e.g. the K arms of a seed), so they are one unit; groups of another pretraining
design (``pretrain.modulation_kind``) or budget are units of their own."""


def _group_seed(group: dict) -> Any:
    """The group's unit: its seed with the settings that make its pretrained network (:data:`UNIT_SECTIONS`)."""
    flat = next(iter(group.values()))[0].flat
    return json.dumps({p: v for p, v in flat.items() if p.split(".")[0] in UNIT_SECTIONS}, sort_keys=True,
                      default=str)


def paired_differences(groups: dict, key: str, mode: str, resamples: int = RESAMPLES, seed: int = BOOTSTRAP_SEED,
                       pairs=None) -> dict[str, dict]:
    """Per pair of conditions ``a-b`` (default :func:`comparisons` of the groups' conditions): one difference
    of ``key`` (a's group mean - b's) per matched group that has both, with :func:`_difference`'s
    statistics; ``a_better`` counts by ``mode``."""
    if pairs is None:
        pairs = comparisons({c for g in groups.values() for c in g})
    out = {}
    for a, b in pairs:
        diffs, members, seeds = [], [], []
        for group in groups.values():
            va = _mean_of(group[a], key) if a in group else None
            vb = _mean_of(group[b], key) if b in group else None
            if va is not None and vb is not None:
                diffs.append(va - vb)
                seeds.append(_group_seed(group))
                members.append({a: [t.trial_id for t in group[a]], b: [t.trial_id for t in group[b]]})
        out[f"{a}-{b}"] = {"a": a, "b": b, "groups": members, **_difference(diffs, mode, resamples, seed, seeds)}
    return out


# ----------------------------------------------------------------- settings, levels and bins

def _show(value: Any) -> str:
    """A setting's value as text: floats to 3 significant digits."""
    if value is None:
        return "null"
    if isinstance(value, float):
        return f"{value:.3g}"
    return value if isinstance(value, str) else json.dumps(value)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _sampled(value: Any) -> bool:
    """A float with more than 6 significant digits: drawn from a range, not written in a list of choices."""
    return isinstance(value, float) and math.isfinite(value) and float(f"{value:.6g}") != value


def _binned(values: list, ranged: bool = False) -> bool:
    """Whether a setting's values go into quantile bins: all numbers, and more than :data:`MAX_LEVELS` of
    them distinct, or floats sampled from a range (``ranged``: the search space says so; else any value
    with more than 6 significant digits)."""
    if not values or not all(_is_number(v) for v in values):
        return False
    return len(set(values)) > MAX_LEVELS or ranged or any(_sampled(v) for v in values)


def _levels(values: list, binned: bool = False) -> list[tuple[tuple, str]]:
    """(sort key, label) per value: the value itself, or when ``binned`` its quantile bin (of
    :data:`BINS`, over the distinct values: trials and groups that repeat a value bin alike) labelled
    ``[min, max]`` of the values that fall in it, to 3 significant digits."""
    if not binned:
        return [((0, float(v), "") if _is_number(v) else (1, 0.0, _show(v)), _show(v)) for v in values]
    x = np.asarray(values, dtype=float)
    edges = np.quantile(np.unique(x), np.linspace(0, 1, BINS + 1))[1:-1]
    bins = np.searchsorted(edges, x, side="right")
    labels = {b: f"[{x[bins == b].min():.3g}, {x[bins == b].max():.3g}]" for b in set(bins.tolist())}
    return [((0, float(b), ""), labels[b]) for b in bins.tolist()]


def varied_settings(trials: list[TrialRecord]) -> list[str]:
    """Settings whose value differs among ``trials``: the seed, the kind, the kind-only and the variant
    settings aside."""
    out = []
    for path in dict.fromkeys(p for t in trials for p in t.flat):
        if path == "seed" or _unmatched(path):
            continue
        if len({json.dumps(t.flat.get(path), sort_keys=True, default=str) for t in trials}) > 1:
            out.append(path)
    return out


def by_setting(groups: dict, settings: list[str], metric: str, mode: str, resamples: int = RESAMPLES,
               seed: int = BOOTSTRAP_SEED, ranges=()) -> dict[str, list[dict]]:
    """Per varied setting, per value (or quantile bin; ``ranges``: settings the search samples from a float
    range): stochastic - deterministic of ``metric`` and test F1 over the matched groups with that value
    (a group's trials share it)."""
    keys = list(dict.fromkeys([metric, "test/mean_f1"]))
    out: dict[str, list[dict]] = {}
    for path in settings:
        items = list(groups.values())
        values = [next(iter(g.values()))[0].flat.get(path) for g in items]
        split: dict[tuple, dict] = {}
        for i, (group, level) in enumerate(zip(items, _levels(values, _binned(values, path in ranges)))):
            split.setdefault(level, {})[str(i)] = group
        out[path] = [{"value": label, "paired": {
            k: paired_differences(sub, k, guess_mode(k) if k != metric else mode, resamples, seed,
                                  pairs=(HEADLINE,))["stochastic-deterministic"]
            for k in keys}} for (_, label), sub in sorted(split.items())]
    return out


def by_noise_scale(groups: dict, metric: str, mode: str, resamples: int = RESAMPLES,
                   seed: int = BOOTSTRAP_SEED, ranges=()) -> list[dict]:
    """Each stochastic trial minus its group's deterministic mean (``metric`` and test F1), split by
    ``modulation.noise_scale`` (quantile bins when it takes many or sampled values)."""
    keys = list(dict.fromkeys([metric, "test/mean_f1"]))
    rows = [(t, group["deterministic"]) for group in groups.values() if "deterministic" in group
            for t in group.get("stochastic", [])]
    values = [t.flat.get("modulation.noise_scale") for t, _ in rows]
    split: dict[tuple, list] = {}
    for row, level in zip(rows, _levels(values, _binned(values, "modulation.noise_scale" in ranges))):
        split.setdefault(level, []).append(row)
    out = []
    for (_, label), members in sorted(split.items()):
        entry = {"noise_scale": label, "trials": [t.trial_id for t, _ in members]}
        for k in keys:
            pairs = [(t.value(k), _mean_of(det, k), t.flat.get("seed")) for t, det in members]
            kept = [(a - b, s) for a, b, s in pairs if a is not None and b is not None]
            entry[k] = _difference([d for d, _ in kept], guess_mode(k) if k != metric else mode, resamples, seed,
                                   [s for _, s in kept])
        out.append(entry)
    return out


# ----------------------------------------------------------------- fine-tuning efficiency

def curve_auc(curve: list[tuple[int, float]]) -> float | None:
    """Trapezoid area under the curve over its steps divided by the step range: the mean score over
    fine-tuning. A curve of one point (a kind with nothing to fine-tune, e.g. none with only the
    controller open) is flat: its value. None for no point."""
    if not curve:
        return None
    if len(curve) == 1:
        return float(curve[0][1])
    x, y = np.asarray(curve, dtype=float).T
    return float(((y[1:] + y[:-1]) / 2 * np.diff(x)).sum() / (x[-1] - x[0]))


def align_curves(curves: list[list[tuple[int, float]]]) -> tuple[np.ndarray, np.ndarray, str] | None:
    """The curves on one grid: (steps, values [curve, step], how). ``common``: all curves have the same
    steps; else ``interpolated``: each curve linearly interpolated onto the union of their steps within the
    range all of them cover. None for no curve, or no step all of them cover."""
    grids = [[s for s, _ in c] for c in curves if c]
    if not grids:
        return None
    if all(g == grids[0] for g in grids):
        return np.asarray(grids[0], dtype=float), np.asarray([[v for _, v in c] for c in curves if c]), "common"
    lo, hi = max(g[0] for g in grids), min(g[-1] for g in grids)
    x = np.asarray(sorted({s for g in grids for s in g if lo <= s <= hi}), dtype=float)
    if not x.size:
        return None
    return x, np.asarray([np.interp(x, *np.asarray(c, dtype=float).T) for c in curves if c]), "interpolated"


def mean_curve(curves: list[list[tuple[int, float]]]) -> dict | None:
    """Mean of the curves on their common grid (:func:`align_curves`) and its Student t 95% interval over
    the curves (``lo``/``hi`` None with one curve)."""
    aligned = align_curves(curves)
    if aligned is None:
        return None
    steps, v, how = aligned
    n, m = v.shape[0], v.mean(axis=0)
    half = stats.t.ppf((1 + LEVEL) / 2, n - 1) * v.std(axis=0, ddof=1) / math.sqrt(n) if n > 1 else None
    return {"n": n, "steps": [int(s) for s in steps], "mean": m.tolist(), "grid": how,
            "lo": (m - half).tolist() if half is not None else None,
            "hi": (m + half).tolist() if half is not None else None}


def steps_to_reach(curve: list[tuple[int, float]], target: float, mode: str = "max") -> int | None:
    """First fine-tuning step at which the curve reaches ``target`` (>= for max, <= for min); None if never."""
    return next((int(s) for s, v in curve if reaches(v, target, mode)), None)


def reach_target(final: float, fraction: float, mode: str = "max") -> float:
    """``fraction`` of a final score: ``fraction * final`` when higher is better, ``final / fraction`` (that
    much worse) when lower is."""
    return fraction * final if mode == "max" else final / fraction


def _pairs(curve: dict | None) -> list[tuple[int, float]]:
    return list(zip(curve["steps"], curve["mean"])) if curve else []


def _arms(trials: list[TrialRecord], ranges=()) -> tuple[list[str], dict, dict, list[str]]:
    """The settings that split the fine-tuning curves into panels: (arms, their levels per trial, whether
    each is binned, the varied settings dropped to keep at most :data:`MAX_PANELS` panels, those with the
    most levels first)."""
    arms = varied_settings(trials)
    values = {p: [t.flat.get(p) for t in trials] for p in arms}
    binned = {p: _binned(values[p], p in ranges) for p in arms}
    levels = {p: _levels(values[p], binned[p]) for p in arms}
    dropped = []
    while len({tuple(levels[p][i][0] for p in arms) for i in range(len(trials))}) > MAX_PANELS:
        widest = max(reversed(arms), key=lambda p: len({k for k, _ in levels[p]}))
        arms.remove(widest)
        dropped.append(widest)
    return arms, levels, binned, dropped


def efficiency(trials: list[TrialRecord], metric: str, mode: str, resamples: int = RESAMPLES,
               seed: int = BOOTSTRAP_SEED, fractions=FRACTIONS, ranges=(), pairs=None) -> dict:
    """Fine-tuning curves of ``finetune/<metric>`` of completed trials: per arm (a value or bin of the varied
    settings) and condition the mean curve with a t 95% band; per matched group (a group's trials of one
    condition averaged into one curve) the normalised AUC (``pairs``, default :func:`comparisons`) and the
    steps each condition takes to reach each fraction of deterministic's final value, paired."""
    key = f"finetune/{metric}"
    notes: list[str] = []
    out = {"curve_key": key, "fractions": list(fractions), "arm_settings": [], "binned_settings": [], "panels": [],
           "auc": None, "steps_to_fraction": None, "groups": [], "notes": notes,
           "band": "Student t 95% interval of the mean over the trials of the condition",
           "grid": "the curves' own fine-tuning steps when all of them have the same; else linear "
                   "interpolation onto the union of their steps within the range all of them cover"}
    have = [t for t in trials if t.curves.get(key)]
    if not have:
        notes.append(f"No completed trial has a fine-tuning curve of `{key}`: no efficiency comparison (runs "
                     f"log it per fine-tuning evaluation; older runs and metrics other than validation ones lack it).")
        return out
    if len(have) < len(trials):
        notes.append(f"{len(trials) - len(have)} of {len(trials)} completed trials have no `{key}` curve; left out.")

    arms, levels, binned, dropped = _arms(have, ranges)
    out["arm_settings"], out["binned_settings"] = arms, [p for p in arms if binned[p]]
    if dropped:
        notes.append(f"Not split into panels (more than {MAX_PANELS} panels otherwise): "
                     f"{', '.join(f'`{p}`' for p in dropped)}.")
    panels: dict[tuple, dict] = {}
    for i, t in enumerate(have):
        arm = tuple(levels[p][i][0] for p in arms)
        label = ", ".join(f"{p} in {levels[p][i][1]}" if binned[p] else f"{p}={levels[p][i][1]}" for p in arms)
        panels.setdefault(arm, {"arm": label or "all trials", "values": {p: levels[p][i][1] for p in arms},
                                "trials": {}})
        panels[arm]["trials"].setdefault(condition(t), []).append(t.curves[key])
    for arm in sorted(panels):
        panel = panels[arm]
        curves = panel.pop("trials")
        panel["kinds"] = {k: c for k in sorted(curves, key=_condition_order) for c in [mean_curve(curves[k])] if c}
        out["panels"].append(panel)
        thin = [k for k, c in panel["kinds"].items() if c["n"] < 2]
        if thin:
            notes.append(f"{panel['arm']}: one trial only for {', '.join(thin)}: no band.")

    present = sorted({condition(t) for t in have}, key=_condition_order)
    pairs = [tuple(p) for p in pairs] if pairs is not None else comparisons(present)
    auc_of_trial = {k: [a for t in have if condition(t) == k for a in [curve_auc(t.curves[key])] if a is not None]
                    for k in present}
    rows, auc_diffs, auc_seeds = [], {p: [] for p in pairs}, {p: [] for p in pairs}
    to_det = [(c, "deterministic") for c in sorted({"stochastic", "none", *present}, key=_condition_order)
              if c != "deterministic"]
    step_diffs: dict[tuple, list] = {}
    step_seeds: dict[tuple, list] = {}
    reached = {f: {k: [] for k in present} for f in fractions}
    for group in matched_groups(have).values():
        curves = {k: mean_curve([t.curves[key] for t in ts]) for k, ts in group.items()}
        row = {"trials": {k: [t.trial_id for t in ts] for k, ts in group.items()},
               "auc": {k: curve_auc(_pairs(c)) for k, c in curves.items()}, "steps": {}}
        for a, b in pairs:
            if curves.get(a) and curves.get(b):
                ca, cb = _pairs(curves[a]), _pairs(curves[b])
                aligned = align_curves([ca, cb])
                if aligned is not None and len(aligned[0]) >= 2:
                    x, v, _ = aligned
                    auc_diffs[(a, b)].append(curve_auc(list(zip(x, v[0]))) - curve_auc(list(zip(x, v[1]))))
                    auc_seeds[(a, b)].append(_group_seed(group))
                elif min(len(ca), len(cb)) == 1:  # a condition with nothing to fine-tune: its flat value
                    auc_diffs[(a, b)].append(curve_auc(ca) - curve_auc(cb))
                    auc_seeds[(a, b)].append(_group_seed(group))
        if curves.get("deterministic"):
            final = curves["deterministic"]["mean"][-1]
            for f in fractions:
                target = reach_target(final, f, mode)
                steps = {k: steps_to_reach(_pairs(c), target, mode) for k, c in curves.items()}
                row["steps"][f"{f:g}"] = steps
                for k, s in steps.items():
                    reached[f][k].append(s)
                for a, b in to_det:
                    if steps.get(a) is not None and steps.get(b) is not None:
                        step_diffs.setdefault((f, a, b), []).append(float(steps[a] - steps[b]))
                        step_seeds.setdefault((f, a, b), []).append(_group_seed(group))
        rows.append(row)
    out["groups"] = rows
    out["auc"] = {"per_kind": {k: _summary(v) for k, v in auc_of_trial.items()},
                  "paired": {f"{a}-{b}": {"a": a, "b": b, **_difference(auc_diffs[(a, b)], mode, resamples, seed,
                                                                      auc_seeds[(a, b)])} for a, b in pairs}}
    out["steps_to_fraction"] = {f"{f:g}": {
        "per_kind": {k: {"groups": len(s), "reached": sum(x is not None for x in s),
                         "median": float(np.median([x for x in s if x is not None]))
                         if any(x is not None for x in s) else None} for k, s in reached[f].items()},
        "paired": {f"{a}-{b}": {"a": a, "b": b, **_difference(step_diffs.get((f, a, b), []), "min", resamples, seed,
                                                              step_seeds.get((f, a, b), []), half_width=None)}
                   for a, b in to_det}} for f in fractions}
    for what, p in [("AUC", p) for p in out["auc"]["paired"].values()] + [
            (f"steps to {f}", p) for f, st in out["steps_to_fraction"].items() for p in st["paired"].values()]:
        if p["n"] < 2 and {p["a"], p["b"]} <= set(present):
            notes.append(f"{what}, {p['a']} - {p['b']}: {p['n']} matched group(s) with both: no interval.")
    if fractions and not any(reached[fractions[0]].values()):
        notes.append("No matched group has a deterministic curve: no steps-to-fraction.")
    return out


# ----------------------------------------------------------------- pretraining

PLATEAU_WINDOW = 3
"""Pretraining evaluations per half of the plateau check: the mean of the last ones against the ones before."""


def pretrained_with(trial: TrialRecord) -> str:
    """The mechanism the trial's network was pretrained with: ``shared none`` or ``shared deterministic``
    (one pretraining per seed for every kind, ``pretrain.modulation_kind``), else the trial's own kind."""
    design = trial.flat.get("pretrain.modulation_kind", "same")
    return f"shared {design}" if design not in (None, "same") else (trial.kind or "unknown")


def pretraining(trials: list[TrialRecord], metric: str, mode: str) -> dict:
    """The validation curve of ``pretrain/<metric>`` per pretraining mechanism (:func:`pretrained_with`)
    over pretraining epochs (each distinct
    pretraining once: trials that share one through the cache report the same curve), with a plateau
    check: the mean of the last :data:`PLATEAU_WINDOW` epochs minus the mean of the ones before, per
    pretraining, with a t 95% interval over them. A comparison is only as good as its budget: a kind
    still improving when pretraining ends is flagged."""
    key = f"pretrain/{metric}"
    out = {"curve_key": key, "window": PLATEAU_WINDOW, "kinds": {}, "plateau": {}, "notes": []}
    labels = sorted({pretrained_with(t) for t in trials},
                    key=lambda m: (m.startswith("shared"), KINDS.index(m.split()[-1]) if m.split()[-1] in KINDS else 9, m))
    for kind in labels:
        seen, curves = set(), []
        for t in trials:
            c = t.curves.get(key)
            if pretrained_with(t) == kind and c and tuple(v for _, v in c) not in seen:
                seen.add(tuple(v for _, v in c))
                curves.append([(i + 1, v) for i, (_, v) in enumerate(c)])  # one evaluation per epoch
        if not curves:
            continue
        out["kinds"][kind] = mean_curve(curves)
        gains = [float(np.mean([v for _, v in c[-PLATEAU_WINDOW:]]) - np.mean([v for _, v in
                 c[-2 * PLATEAU_WINDOW:-PLATEAU_WINDOW]])) for c in curves if len(c) >= 2 * PLATEAU_WINDOW]
        if not gains:
            out["notes"].append(f"{kind}: pretraining shorter than {2 * PLATEAU_WINDOW} epochs: no plateau check.")
            continue
        mean = float(np.mean(gains))
        ci = t_interval(gains)
        ci = list(ci) if ci else None
        out["plateau"][kind] = {"pretrainings": len(gains), "gain": mean, "ci95": ci}
        improving = ci is not None and all(better(bound, 0, mode) for bound in ci)  # the whole interval
        if improving:
            out["notes"].append(f"{kind} was still improving when pretraining ended ({metric} "
                                f"{mean:+.4f} over its last {PLATEAU_WINDOW} epochs against the {PLATEAU_WINDOW} "
                                f"before, 95% CI [{ci[0]:+.4f}, {ci[1]:+.4f}]): consider longer pretraining.")
    return out


# ----------------------------------------------------------------- what the study cost

COST_METRICS = ("pretrain_wait_seconds", "pretrain_seconds", WALL)
"""Final metrics of a trial: seconds waiting for another trial's pretraining, seconds pretraining itself (0
when taken from the cache) and the run's wall time (both included)."""
WAIT_SHARE_TARGET = 0.10
PER_KIND_RATIO_TARGET = 0.4


def _pretraining_key(trial: TrialRecord) -> str:
    """What a pretraining would be had every kind pretrained its own network: the trial's settings in the
    sections that determine pretraining (:data:`comod.pretrain_cache.DETERMINING`, the kind and seed
    among them), the pretraining design ``pretrain.modulation_kind`` aside."""
    kept = {p: v for p, v in trial.flat.items() if p.split(".")[0] in DETERMINING and p != "pretrain.modulation_kind"}
    kept["modulation.kind"] = trial.kind or trial.flat.get("modulation.kind")
    return json.dumps(kept, sort_keys=True, default=str)


def study_cost(trials: list[TrialRecord], max_concurrent: int | None = None) -> dict:
    """What the study cost, from the completed trials' :data:`COST_METRICS`: the share of slot time spent
    waiting for a pretraining (sum of waits / sum of wall times), the pretrainings made (trials with
    ``pretrain_seconds`` > 0), the study's wall time (first trial start to last trial end over all trials;
    without start times an estimate, the sum of wall times / ``max_concurrent``) and an estimate of the
    wall time had every kind pretrained its own network: the study's plus (the distinct pretrainings that
    design needs, :func:`_pretraining_key`, minus those made) x the mean pretraining time /
    ``max_concurrent``. Without the metrics (older searches) every figure is None and a note says why."""
    have = [t for t in trials if t.completed and all(t.final.get(k) is not None for k in COST_METRICS)]
    out: dict[str, Any] = {"metrics": list(COST_METRICS), "trials": len(have), "max_concurrent": max_concurrent,
                           "wait_seconds": None, "wall_seconds_sum": None, "wait_share": None,
                           "wait_share_target": WAIT_SHARE_TARGET, "pretrainings": None, "pretrain_seconds_mean": None,
                           "study_wall_seconds": None, "study_wall_from": None, "per_kind_pretrainings": None,
                           "extra_pretrainings": None, "per_kind_wall_seconds": None, "ratio": None,
                           "ratio_target": PER_KIND_RATIO_TARGET, "notes": []}
    notes = out["notes"]
    if not have:
        notes.append(f"No completed trial reports {', '.join(f'`{k}`' for k in COST_METRICS)} (searches from "
                     f"before they were recorded): no cost figures.")
        return out
    completed = sum(t.completed for t in trials)
    if len(have) < completed:
        notes.append(f"{completed - len(have)} of {completed} completed trials lack these metrics; left out.")
    wait = float(sum(t.final["pretrain_wait_seconds"] for t in have))
    wall = float(sum(t.final[WALL] for t in have))
    made = [float(t.final["pretrain_seconds"]) for t in have if t.final["pretrain_seconds"] > 0]
    out.update(wait_seconds=wait, wall_seconds_sum=wall, wait_share=wait / wall if wall > 0 else None,
               pretrainings=len(made), pretrain_seconds_mean=float(np.mean(made)) if made else None)
    timed = [t for t in trials if t.start_time and t.wall_seconds is not None]
    if timed:
        out["study_wall_seconds"] = (max(t.start_time + t.wall_seconds for t in timed)
                                     - min(t.start_time for t in timed))
        out["study_wall_from"] = "first trial start to last trial end"
    elif max_concurrent:
        out["study_wall_seconds"] = sum(t.wall_seconds for t in trials if t.wall_seconds is not None) / max_concurrent
        out["study_wall_from"] = f"estimate: sum of trial wall times / max_concurrent ({max_concurrent})"
    distinct = len({_pretraining_key(t) for t in have})
    out["per_kind_pretrainings"] = distinct
    out["extra_pretrainings"] = max(0, distinct - len(made))
    if not made:
        notes.append("No trial pretrained (all from the cache): no mean pretraining time, no per-kind estimate.")
    elif not max_concurrent:
        notes.append("The search's max_concurrent is unknown: no per-kind estimate.")
    elif out["study_wall_seconds"]:
        per_kind = out["study_wall_seconds"] + out["extra_pretrainings"] * out["pretrain_seconds_mean"] / max_concurrent
        out.update(per_kind_wall_seconds=per_kind, ratio=out["study_wall_seconds"] / per_kind)
    notes.append("Counted over completed trials only: a pretraining made by a pruned or failed trial is not seen.")
    return out


def select_trials(trials: list[TrialRecord], where: dict[str, Any]) -> list[TrialRecord]:
    """The trials whose settings equal every ``{dotted.path: value}`` of ``where`` (an arm of a search, e.g.
    one pretraining design); an unknown path or a value no trial has raises :class:`CompareError`."""
    for path, value in where.items():
        values = {json.dumps(t.flat[path], default=str) for t in trials if path in t.flat}
        if not values:
            raise CompareError(f"--where {path}: not a setting of this search's trials; use a dotted setting "
                               f"such as pretrain.modulation_kind")
        if json.dumps(value, default=str) not in values:
            raise CompareError(f"--where {path}={value!r}: no trial has it; its values: {', '.join(sorted(values))}")
        trials = [t for t in trials if json.dumps(t.flat.get(path), default=str) == json.dumps(value, default=str)]
    return trials


def compare(name: str, metric: str | None = None, out_dir: str | Path | None = None, home: Path | None = None,
            resamples: int = RESAMPLES, seed: int = BOOTSTRAP_SEED, log_artifact: bool = True,
            where: dict[str, Any] | None = None) -> dict:
    """Compare the modulation conditions in search ``name`` (only its trials matching ``where``, when
    given: :func:`select_trials`); see the module docstring."""
    results = load_results(name, home)
    if where:
        results.trials = select_trials(results.trials, where)
    metric = metric or results.metric
    mode = results.mode if metric == results.metric else guess_mode(metric)
    out = Path(out_dir) if out_dir is not None else results.paths.root / "compare"
    out.mkdir(parents=True, exist_ok=True)

    known = {k for t in results.trials for k in t.final} | {results.metric}
    if metric not in known:
        close = sorted(k for k in known if "/mean_" in k)[:8]
        raise CompareError(f"metric {metric!r} is not among search {name!r}'s final metrics; "
                           f"e.g. {', '.join(close) or results.metric}")
    search = getattr(results, "search", None)
    ranges = {p for p, d in getattr(search, "space", {}).items() if getattr(d, "type", None) == "float"}
    max_concurrent = getattr(getattr(search, "search", None), "max_concurrent", None)
    report = build_report(name, results.trials, metric, mode, resamples, seed, ranges=ranges,
                          max_concurrent=max_concurrent)
    report["out_dir"] = str(out)
    report["where"] = dict(where or {})
    report["importances"] = importances(results, metric)
    notes = report["notes"]
    files = _plots(report, results.trials, out)
    md = out / "compare.md"
    md.write_text(_markdown(report, [Path(f).name for f in files]))
    js = out / "compare.json"
    imp = out / IMPORTANCES_FILE
    imp.write_text(json.dumps(report["importances"], indent=2))
    report["files"] = [str(md), str(js), *files, str(imp)]
    js.write_text(json.dumps(report, indent=2))
    if log_artifact:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=results.meta.tracking_uri)
        for path in report["files"]:
            try:
                client.log_artifact(results.meta.parent_run_id, path, ARTIFACT_PATH)
            except Exception as err:  # noqa: BLE001 - the report is written; tracking is a copy
                log.warning("could not log %s to the search's MLflow run: %s", path, err)
                notes.append(f"not logged to MLflow: {Path(path).name} ({err})")
    return report


# ----------------------------------------------------------------- parameter importances

IMPORTANCE_MIN_TRIALS = 4
"""Completed trials a kind needs before its parameter importances are computed."""
IMPORTANCE_SEED = 0
IMPORTANCES_FILE = "importances.json"
"""The importances alone, written beside compare.json and logged to the parent run under ``compare/``."""


def _evaluator(seed: int = IMPORTANCE_SEED):
    """fANOVA (a random forest: scikit-learn, which MLflow brings), else PED-ANOVA; (evaluator, description)."""
    from optuna.importance import FanovaImportanceEvaluator, PedAnovaImportanceEvaluator

    try:
        import sklearn  # noqa: F401

        return (FanovaImportanceEvaluator(seed=seed),
                f"fANOVA (optuna.importance.FanovaImportanceEvaluator, seed {seed})")
    except ImportError:
        return PedAnovaImportanceEvaluator(), "PED-ANOVA (optuna.importance.PedAnovaImportanceEvaluator)"


def _label(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def param_importances(trials: list, min_trials: int = IMPORTANCE_MIN_TRIALS, seed: int = IMPORTANCE_SEED,
                      direction: str = "maximize") -> dict:
    """Optuna's parameter importances (:func:`optuna.importance.get_param_importances`) over ``trials``
    (Optuna ``FrozenTrial``s; the completed ones count) for their objective value, over the parameters every
    completed trial has and that took more than one value among them. ``{"trials": n, "params": {name:
    importance, ...} (largest first, summing to 1) or None, "note": why None, or None}``."""
    import optuna
    from optuna.trial import TrialState

    done = [t for t in trials if t.state == TrialState.COMPLETE and t.value is not None and math.isfinite(t.value)]
    out: dict[str, Any] = {"trials": len(done), "params": None, "note": None}
    if len(done) < min_trials:
        out["note"] = f"{len(done)} completed trial(s); importances need at least {min_trials}"
        return out
    names = [p for p in done[0].params if all(p in t.params for t in done)]
    varied = [p for p in names if len({_label(t.params[p]) for t in done}) > 1]
    if not varied:
        out["note"] = "no searched setting took more than one value among the completed trials"
        return out
    level = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = optuna.create_study(direction=direction)  # in memory: only these trials
        study.add_trials(done)
        evaluator, _ = _evaluator(seed)
        found = optuna.importance.get_param_importances(study, evaluator=evaluator, params=varied)
    except Exception as err:  # noqa: BLE001 - e.g. a metric equal in every trial (zero variance)
        out["note"] = f"no importances: {str(err).splitlines()[0] if str(err) else type(err).__name__}"
        return out
    finally:
        optuna.logging.set_verbosity(level)
    out["params"] = {p: float(v) for p, v in sorted(found.items(), key=lambda kv: -kv[1])}
    return out


def _study_trials(meta) -> list:
    """Every trial of the search's Optuna study (the database of meta.json); DashboardError when unreadable."""
    from comod_platform.dashboard import open_study_storage

    storage, study_id = open_study_storage(meta.optuna_storage, meta.study_name, meta.name)
    try:
        return storage.get_all_trials(study_id, deepcopy=False)
    finally:
        engine = getattr(storage, "engine", None)
        if engine is not None:
            engine.dispose()


def importances(results, metric: str | None = None, min_trials: int = IMPORTANCE_MIN_TRIALS,
                seed: int = IMPORTANCE_SEED) -> dict:
    """The parameter importances of search ``results`` for its metric (its Optuna study's objective), per kind
    (the trial's ``modulation.kind`` param, else the base experiment's kind) and, when the search has several
    kinds, over all of them (the kind itself then a parameter). A kind with too few completed trials, or none
    varied, gets a note instead. Never raises: a study that cannot be read is a note."""
    search_metric = results.metric
    _, described = _evaluator(seed)
    out: dict[str, Any] = {"metric": search_metric, "study": getattr(results.meta, "study_name", None),
                           "evaluator": described, "min_trials": min_trials, "kinds": {}, "all": None, "notes": []}
    if metric is not None and metric != search_metric:
        out["notes"].append(f"Importances are of `{search_metric}`, the search metric that Optuna's study was "
                            f"told, not of `{metric}`.")
    try:
        trials = _study_trials(results.meta)
        base_kind = results.search.base_config().modulation.kind
    except Exception as err:  # noqa: BLE001 - the rest of the report stands without them
        out["notes"].append(f"The search's Optuna study cannot be read, so no importances: {err}")
        return out
    objective = direction(results.mode)
    by_kind: dict[str, list] = {}
    for t in trials:
        by_kind.setdefault(str(t.params.get("modulation.kind", base_kind)), []).append(t)
    for kind in [k for k in KINDS if k in by_kind] + sorted(k for k in by_kind if k not in KINDS):
        out["kinds"][kind] = param_importances(by_kind[kind], min_trials, seed, objective)
    if len(by_kind) > 1:
        out["all"] = param_importances(trials, min_trials, seed, objective)
    if not trials:
        out["notes"].append("The search's Optuna study has no trial yet.")
    return out


def _markdown_importances(imp: dict | None) -> list[str]:
    if not imp:
        return []
    lines = ["", "## Parameter importances", "",
             f"How much of the variation of `{imp['metric']}` (the search metric, the objective of Optuna's study "
             f"`{imp['study']}`) each searched setting explains among a kind's completed trials: {imp['evaluator']}, "
             f"normalised to sum to 1, over the settings that varied. A kind needs at least {imp['min_trials']} "
             f"completed trials; \"all kinds\" counts `modulation.kind` as a setting."]
    rows = [(kind, entry) for kind, entry in imp["kinds"].items()] + ([("all kinds", imp["all"])] if imp["all"] else [])
    if rows:
        lines += ["", "| kind | completed trials | setting | importance |", "|---|---|---|---|"]
        for kind, entry in rows:
            if entry["params"]:
                for i, (param, value) in enumerate(entry["params"].items()):
                    lines.append(f"| {kind if i == 0 else ''} | {entry['trials'] if i == 0 else ''} | `{param}` | "
                                 f"{value:.3f} |")
            else:
                lines.append(f"| {kind} | {entry['trials']} | n/a | {entry['note']} |")
    lines += [""] + [f"- {n}" for n in imp["notes"]] if imp["notes"] else []
    return lines


def _usable(trials: list[TrialRecord], metric: str) -> list[TrialRecord]:
    return [t for t in trials if t.completed and t.value(metric) is not None]



def build_report(name: str, trials: list[TrialRecord], metric: str, mode: str, resamples: int = RESAMPLES,
                 seed: int = BOOTSTRAP_SEED, ranges=(), max_concurrent: int | None = None) -> dict:
    """The comparison of ``trials`` (a search's records, any state) as a JSON-ready dict: what
    :func:`compare` writes, without MLflow or files (``out_dir`` None). ``ranges``: settings the search
    samples from a float range (binned); ``max_concurrent``: the search's, for the cost estimate."""
    counted = (COMPLETED, PRUNED, FAILED, RUNNING)  # interrupted only where there are some
    usable = _usable(trials, metric)
    present = sorted({condition(t) for t in usable}, key=_condition_order)
    listed = sorted(set(KINDS) | set(present), key=_condition_order)
    counts = {c: {s: 0 for s in counted} for c in listed}
    for t in trials:
        c = condition(t)
        counts.setdefault(c, {s: 0 for s in counted})
        counts[c][t.state] = counts[c].get(t.state, 0) + 1
    by_cond = {c: [t for t in usable if condition(t) == c] for c in listed}

    best = {}
    for cond, members in by_cond.items():
        if not members:
            best[cond] = None
            continue
        top = best_of(members, mode, key=lambda t: t.value(metric))
        best[cond] = {"trial_id": top.trial_id, "run_id": top.run_id, "value": top.value(metric),
                      "test": {k: v for k, v in sorted(top.final.items()) if k.startswith("test/mean_")}}
    distribution = {c: _summary([t.value(metric) for t in members]) for c, members in by_cond.items()}

    groups = matched_groups(usable)
    pairs = comparisons(present)
    paired = paired_differences(groups, metric, mode, resamples, seed, pairs)
    paired_metrics = {k: paired_differences(groups, k, guess_mode(k), resamples, seed, pairs) for k in PAIRED_METRICS}

    tasks = sorted({m.group(1) for t in usable for k in t.final for m in [_TASK_F1.match(k)] if m})
    win_rates: dict[str, dict] = {}
    for task in tasks:
        key = f"test/{task}/f1"
        wins = ties = losses = 0
        for group in groups.values():
            if "stochastic" in group and "deterministic" in group:
                s, d = _mean_of(group["stochastic"], key), _mean_of(group["deterministic"], key)
                if s is None or d is None:
                    continue
                wins, ties, losses = wins + (s > d), ties + (s == d), losses + (s < d)
        n = wins + ties + losses
        win_rates[task] = {"wins": wins, "ties": ties, "losses": losses, "n": n, "rate": wins / n if n else None}

    varied = varied_settings(usable)
    report = {"search": name, "metric": metric, "mode": mode, "trials": len(trials),
              "completed": len(usable), "conditions": present, "comparisons": [list(p) for p in pairs],
              "variant_settings": list(VARIANTS), "counts": counts, "best": best, "distribution": distribution,
              "paired": paired, "win_rates": win_rates, "resamples": resamples, "bootstrap_seed": seed,
              "level": LEVEL, "exact_max_n": EXACT_MAX_N, "rough_n": ROUGH_N, "half_width": HALF_WIDTH,
              "notes": _notes(trials, usable, by_cond, paired), "out_dir": None, "paired_metrics": paired_metrics,
              "varied_settings": varied,
              "by_setting": by_setting(groups, varied, metric, mode, resamples, seed, ranges),
              "by_noise_scale": by_noise_scale(groups, metric, mode, resamples, seed, ranges),
              "efficiency": efficiency(usable, metric, mode, resamples, seed, ranges=ranges, pairs=pairs),
              "pretraining": pretraining(usable, metric, mode), "cost": study_cost(trials, max_concurrent)}
    report["holm"] = apply_holm(report)
    return report


HOLM_FAMILIES = {
    "conditions": "the search metric, every pair of conditions (the paired-differences table)",
    "test metrics": "each test metric, every pair of conditions (one family per metric)",
    "settings": "stochastic - deterministic per value of each varied setting and per noise scale",
    "efficiency": "the paired fine-tuning AUC and steps to each fraction",
}
"""Holm's families: one per question the report asks, each a table of it. A family holds the comparisons
with at least two units (seeds where matched groups share a seed, else groups)."""


def _families(r: dict) -> dict[str, list[tuple[str, dict]]]:
    """The report's paired comparisons by Holm family (:data:`HOLM_FAMILIES`; the test metrics one family
    each), labelled, each as its unit entry (``by_seed`` where groups share a seed, else the entry)."""
    metric = r["metric"]
    out: dict[str, list[tuple[str, dict]]] = {
        "conditions": [(f"`{metric}` {p['a']} - {p['b']}", p) for p in r["paired"].values()]}
    for k, ps in r["paired_metrics"].items():
        if k != metric:
            out[f"test metrics: {k}"] = [(f"`{k}` {p['a']} - {p['b']}", p) for p in ps.values()]
    settings = [(f"`{k}` stochastic - deterministic at {path}={row['value']}", p)
                for path, rows in r["by_setting"].items() for row in rows for k, p in row["paired"].items()]
    settings += [(f"`{k}` stochastic - deterministic at noise scale {row['noise_scale']}", p)
                 for row in r["by_noise_scale"] for k, p in row.items() if isinstance(p, dict)]
    out["settings"] = settings
    e = r.get("efficiency") or {}
    eff = [(f"AUC of `{e['curve_key']}` {p['a']} - {p['b']}", p) for p in (e.get("auc") or {}).get("paired", {}).values()]
    eff += [(f"steps to {f} of deterministic's final {p['a']} - {p['b']}", p)
            for f, st in (e.get("steps_to_fraction") or {}).items() for p in st["paired"].values()]
    out["efficiency"] = eff
    return {name: [(label, p.get("by_seed") or p) for label, p in items] for name, items in out.items()}


def apply_holm(r: dict) -> dict:
    """Holm-adjust the sign-flip p-values within each family of report ``r`` (:data:`HOLM_FAMILIES`): sets
    ``p_holm`` on each unit entry; returns each family's size and members' labels."""
    families = {}
    for name, items in _families(r).items():
        family = [(label, u) for label, u in items if u["n"] >= 2 and u["p_sign_flip"] is not None]
        for (_, u), adjusted in zip(family, holm([u["p_sign_flip"] for _, u in family])):
            u["p_holm"] = adjusted
        families[name] = {"m": len(family), "members": [label for label, _ in family]}
    return {"families": families, "rule": "Holm's step-down adjustment within each family: "
            + "; ".join(f"{k}: {v}" for k, v in HOLM_FAMILIES.items())}


def _notes(trials: list[TrialRecord], usable, by_cond, paired) -> list[str]:
    notes = []
    c = {s: sum(t.state == s for t in trials) for s in (PRUNED, FAILED, RUNNING)}
    if not usable:
        notes.append(f"No completed trial has the metric ({len(trials)} trials: {c[PRUNED]} pruned, "
                     f"{c[FAILED]} failed, {c[RUNNING]} running); nothing to compare yet.")
    for cond, members in by_cond.items():
        if 0 < len(members) < 2:
            notes.append(f"Only one completed {cond} trial: its spread (std) is undefined.")
        elif not members:
            notes.append(f"No completed {cond} trial.")
    for p in paired.values():
        if p["n"] == 0:
            notes.append(f"No matched pairs for {p['a']} vs {p['b']}: no two completed trials of these conditions "
                         f"share every other setting (search modulation.kind over otherwise equal settings, e.g. "
                         f"the same seeds, to get pairs).")
        elif p["n"] == 1:
            notes.append(f"Only one matched pair for {p['a']} vs {p['b']}: no confidence interval.")
    return notes


# ----------------------------------------------------------------- Markdown

def _f(v: Any, digits: int = 4) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _p(v: float | None) -> str:
    if v is None:
        return "n/a"
    return f"{v:.4f}" if v >= 1e-3 else f"{v:.1e}"


def _ci(p: dict | None, digits: int = 4, key: str = "ci95") -> str:
    return f"[{p[key][0]:.{digits}f}, {p[key][1]:.{digits}f}]" if p and p.get(key) else "n/a"


STAT_COLUMNS = ("n | mean difference | t 95% CI | bootstrap 95% CI | sign-flip p | Holm p | first better | "
                "seeds for ±0.005")
STAT_RULE = "---|" * 8


def _stat_cells(p: dict, digits: int, unit: bool) -> str:
    """``p``'s cells; Holm p and seeds needed only on the unit's row (the seed where groups share seeds)."""
    n = f"{p['n']}*" if unit and p["rough"] else str(p["n"])
    return (f"{n} | {_f(p['mean'], digits)} | {_ci(p, digits)} | {_ci(p, digits, 'bootstrap_ci95')} | "
            f"{_p(p['p_sign_flip'])} | {_p(p['p_holm']) if unit else ''} | {p['a_better'] if p['n'] else 'n/a'} | "
            f"{'' if not unit else p['seeds_needed'] if p['seeds_needed'] is not None else 'n/a'}")


def _stat_rows(cells: list[str], p: dict, digits: int = 4) -> list[str]:
    """A table row of ``p``'s statistics after ``cells``, and a second, ``by seed``, where groups share seeds."""
    seed = p.get("by_seed")
    rows = ["| " + " | ".join(cells) + " | " + _stat_cells(p, digits, unit=seed is None) + " |"]
    if seed:
        rows.append("| " + " | ".join(cells[:-1] + [cells[-1] + ", by seed"]) + " | "
                    + _stat_cells(seed, digits, unit=True) + " |")
    return rows


def _rough_footnote(entries) -> list[str]:
    if any((p.get("by_seed") or p)["rough"] for p in entries):
        return ["", f"\\* fewer than {ROUGH_N} seeds: the interval is rough."]
    return []


def _rough_warnings(paired: dict) -> list[str]:
    """One line per comparison with fewer than :data:`ROUGH_N` seeds."""
    lines = []
    for p in paired.values():
        u = p.get("by_seed") or p
        if u["rough"]:
            unit = "seeds" if p.get("by_seed") else "pairs"
            floor = (f"; an exact sign-flip p on {u['n']} {unit} cannot go below {u['p_min']:.4g}"
                     if u["p_method"] == "exact" else "")
            lines.append(f"- {p['a']} - {p['b']}: fewer than {ROUGH_N} seeds: the interval is rough "
                         f"({u['n']} {unit}{floor}).")
    return [""] + lines if lines else []


def _markdown(r: dict, images: list[str]) -> str:
    where = ", ".join(f"`{k}={v}`" for k, v in (r.get("where") or {}).items())
    lines = [f"# Stochastic vs deterministic modulation: search `{r['search']}`", "",
             f"Metric `{r['metric']}` ({r['mode']}), {r['completed']} completed trials with it, "
             f"{r['trials']} trials in all" + (f", of those with {where}" if where else "") + ".", "",
             "## Trials per condition", "",
             "A condition is the kind, with in brackets the groups fine-tuning trains when not only the controller "
             "(`finetune.trainable`, e.g. `none[heads]`) and `shuffled` when the stochastic readout gain is applied "
             "with its units permuted (`modulation.readout.shuffle`, the control).", "",
             "| condition | completed | pruned | failed | running |", "|---|---|---|---|---|"]
    for cond, c in r["counts"].items():
        lines.append(f"| {cond} | {c.get('completed', 0)} | {c.get('pruned', 0)} | {c.get('failed', 0)} | "
                     f"{c.get('running', 0)} |")
    test_keys = sorted({k for b in r["best"].values() if b for k in b["test"]})
    lines += ["", "## Best trial of each condition", "",
              "| condition | trial | " + f"{r['metric']} | " + " | ".join(test_keys) + (" |" if test_keys else ""),
              "|---|---|---|" + "---|" * len(test_keys)]
    for cond, b in r["best"].items():
        if b is None:
            lines.append(f"| {cond} | none completed | n/a |" + " n/a |" * len(test_keys))
        else:
            lines.append(f"| {cond} | `{b['trial_id']}` | {_f(b['value'])} | "
                         + " | ".join(_f(b["test"].get(k)) for k in test_keys) + (" |" if test_keys else ""))
    lines += ["", "## Distribution per condition (completed trials)", "",
              "| condition | n | mean | std | median | min | max |", "|---|---|---|---|---|---|---|"]
    for cond, d in r["distribution"].items():
        lines.append(f"| {cond} | {d['n']} | {_f(d['mean'])} | {_f(d['std'])} | {_f(d['median'])} | "
                     f"{_f(d['min'])} | {_f(d['max'])} |")
    conditions_m = ((r.get("holm") or {}).get("families") or {}).get("conditions", {}).get("m", 0)
    lines += ["", "## Paired differences", "",
              "Trials that share every setting except the condition (`modulation.kind`, `finetune.trainable`, "
              "`modulation.readout.shuffle`) and the kind-only settings (`modulation.noise_scale`, "
              "`modulation.gain_form`, `modulation.readout.*`) are matched; a group's trials of one condition are "
              "averaged. Difference = first minus second condition; stochastic - deterministic is the headline, "
              "stochastic - stochastic[shuffled] the control (a stochastic edge the shuffled readout shares is not "
              "comodulation).", "",
              f"n: matched groups. Where groups fine-tune one pretrained network (the same seed, data, model and pretraining settings, e.g. the K arms of a seed) a second row, \"by "
              f"seed\", averages them per seed: the seed is the unit to read, and the one Holm adjusts. **t 95% CI**: "
              f"Student t interval of the mean difference. Bootstrap: seeded percentile bootstrap "
              f"(scipy.stats.bootstrap, {r['resamples']} resamples, seed {r['bootstrap_seed']}), too narrow with "
              f"few pairs. Sign-flip p: two-sided, every one of the 2^n sign flips enumerated up to n = "
              f"{r.get('exact_max_n', EXACT_MAX_N)} (so with n pairs it cannot go below 2/2^n: 0.0625 for 5), "
              f"{r['resamples']} random flips beyond (scipy.stats.permutation_test). Holm p: Holm's step-down "
              f"adjustment within the table's family (here the {conditions_m} comparisons of the search metric; each test metric, the per-setting table and the efficiency tables are families of their own). Seeds for ±0.005: the "
              f"smallest n with t(0.975, n-1) x sd / sqrt(n) <= {r.get('half_width', HALF_WIDTH)} at the observed "
              f"spread of the differences.", "",
              "| comparison | " + STAT_COLUMNS + " |", "|---|" + STAT_RULE]
    for p in r["paired"].values():
        lines += _stat_rows([f"{p['a']} - {p['b']}"], p)
    lines += _rough_warnings(r["paired"])
    lines += ["", "## Per-task win rates (stochastic vs deterministic, test F1)", ""]
    if any(w["n"] for w in r["win_rates"].values()):
        lines += ["| task | wins | ties | losses | pairs | win rate |", "|---|---|---|---|---|---|"]
        for task, w in r["win_rates"].items():
            lines.append(f"| {task} | {w['wins']} | {w['ties']} | {w['losses']} | {w['n']} | {_f(w['rate'], 3)} |")
    else:
        lines.append("No matched stochastic/deterministic pairs with per-task test F1: no win rates.")
    lines += _markdown_more(r)
    lines += _markdown_pretraining(r.get("pretraining"))
    lines += _markdown_cost(r.get("cost"))
    lines += _markdown_importances(r.get("importances"))
    if r["notes"]:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in r["notes"]]
    if images:
        lines += ["", "## Plots", ""] + [f"![{Path(i).stem}]({i})" for i in images]
    return "\n".join(lines) + "\n"


def _markdown_pretraining(pre: dict | None) -> list[str]:
    if not pre or not pre["kinds"]:
        return []
    w = pre["window"]
    lines = ["", "## Pretraining", "",
             f"`{pre['curve_key']}` per pretraining epoch, each distinct pretraining once (trials that share one "
             f"through the cache count once). Plateau: the mean of the last {w} epochs minus the mean of the "
             f"{w} before, per pretraining, with a t 95% interval; a comparison is only as good as its budget.", "",
             "| pretrained with | pretrainings | epochs | last epoch (mean) | plateau gain | 95% CI |",
             "|---|---|---|---|---|---|"]
    for kind, c in pre["kinds"].items():
        plateau = pre["plateau"].get(kind) or {}
        lines.append(f"| {kind} | {c['n']} | {len(c['steps'])} | {_f(c['mean'][-1])} | {_f(plateau.get('gain'))} | "
                     f"{_ci(plateau)} |")
    lines += [f"- {n}" for n in pre["notes"]]
    return lines


def _markdown_cost(c: dict | None) -> list[str]:
    if not c:
        return []
    lines = ["", "## What the study cost", ""]
    if not c["trials"]:
        return lines + [f"- {n}" for n in c["notes"]]

    def seconds(v):
        return f"{v:.0f} s ({v / 3600:.2f} h)" if v is not None else "n/a"

    share = f"{100 * c['wait_share']:.1f}%" if c["wait_share"] is not None else "n/a"
    ratio = f"{c['ratio']:.2f}x" if c["ratio"] is not None else "n/a"
    mean = f", {c['pretrain_seconds_mean']:.0f} s each on average" if c["pretrain_seconds_mean"] else ""
    lines += [f"From the {c['trials']} completed trials that report `pretrain_wait_seconds`, `pretrain_seconds` "
              f"and `wall_seconds`.", "", "| quantity | value | target |", "|---|---|---|",
              f"| share of slot time spent waiting for a pretraining (sum of waits / sum of trial wall times) | "
              f"{share} | under {100 * c['wait_share_target']:.0f}% |",
              f"| pretrainings made (trials with pretrain_seconds > 0) | {c['pretrainings']}{mean} | |",
              f"| study wall time ({c['study_wall_from'] or 'unknown'}) | {seconds(c['study_wall_seconds'])} | |",
              f"| **estimate**: wall time had every kind pretrained its own network | "
              f"{seconds(c['per_kind_wall_seconds'])} | |",
              f"| ratio: study / that estimate | {ratio} | at most {c['ratio_target']:.1f}x |", "",
              f"The estimate adds to the study's wall time the pretrainings a per-kind design would make beyond those "
              f"made ({c['per_kind_pretrainings']} distinct kind, seed and pretraining settings - "
              f"{c['pretrainings']} made = {c['extra_pretrainings']}) at the mean pretraining time, spread over "
              f"max_concurrent = {c['max_concurrent'] if c['max_concurrent'] else 'unknown'} slots. It ignores waits "
              f"and scheduling: a rough figure."]
    return lines + [f"- {n}" for n in c["notes"]]


def _markdown_more(r: dict) -> list[str]:
    """The sections on the test metrics, the varied settings, the noise scale and fine-tuning efficiency."""
    lines = ["", "## Paired differences on the test metrics", "",
             "Same matched groups and statistics as above. Higher is better except for ECE (`test/mean_ece`, "
             "calibration error), where a negative difference favours the first condition; \"first better\" counts "
             "accordingly.", "",
             "| metric | comparison | " + STAT_COLUMNS + " |", "|---|---|" + STAT_RULE]
    for key, pairs in r.get("paired_metrics", {}).items():
        for p in pairs.values():
            lines += _stat_rows([f"`{key}`", f"{p['a']} - {p['b']}"], p)
    lines += _rough_footnote(p for ps in r.get("paired_metrics", {}).values() for p in ps.values())
    lines += ["", "## Stochastic - deterministic per varied setting", ""]
    if r.get("by_setting"):
        lines += ["Matched groups split by the value of each setting the search varied (the seed, the condition and "
                  "kind-only settings aside; numeric settings with many values or sampled from a range: quantile "
                  "bins).", "", "| setting | value | metric | " + STAT_COLUMNS + " |", "|---|---|---|" + STAT_RULE]
        for path, rows in r["by_setting"].items():
            for row in rows:
                for k, p in row["paired"].items():
                    lines += _stat_rows([f"`{path}`", row["value"], f"`{k}`"], p)
        lines += _rough_footnote(p for rows in r["by_setting"].values() for row in rows for p in row["paired"].values())
    else:
        lines.append("The search varied no setting besides the seed, the condition and the kind-only settings.")
    lines += ["", "## Stochastic - deterministic by noise scale", ""]
    if r.get("by_noise_scale"):
        lines += ["Each stochastic trial minus the mean of its group's deterministic trials, split by "
                  "`modulation.noise_scale`.", "", "| noise scale | metric | " + STAT_COLUMNS + " |",
                  "|---|---|" + STAT_RULE]
        for row in r["by_noise_scale"]:
            for k, p in row.items():
                if isinstance(p, dict):
                    lines += _stat_rows([row["noise_scale"], f"`{k}`"], p)
        lines += _rough_footnote(p for row in r["by_noise_scale"] for p in row.values() if isinstance(p, dict))
    else:
        lines.append("No stochastic trial with a deterministic trial in its matched group.")
    e = r.get("efficiency")
    if e is None:
        return lines
    lines += ["", "## Fine-tuning efficiency", "",
              f"Does one condition converge in less fine-tuning? Curve: `{e['curve_key']}` per fine-tuning step "
              f"(step 0 is the pretrained model, so a condition that starts higher gains area without learning "
              f"faster). Curves are averaged on {e['grid']}; band: {e['band']}."]
    if e["panels"]:
        lines += ["", "### Curves", "", "| arm | condition | trials | steps | grid | start | final | final 95% CI |",
                  "|---|---|---|---|---|---|---|---|"]
        for panel in e["panels"]:
            for kind, c in panel["kinds"].items():
                ci = f"[{c['lo'][-1]:.4f}, {c['hi'][-1]:.4f}]" if c["lo"] is not None else "n/a"
                lines.append(f"| {panel['arm']} | {kind} | {c['n']} | {c['steps'][-1]} | {c['grid']} | "
                             f"{_f(c['mean'][0])} | {_f(c['mean'][-1])} | {ci} |")
    if e["auc"]:
        lines += ["", "### Area under the fine-tuning curve", "",
                  "Normalised area: the trapezoid over fine-tuning steps divided by the step range, i.e. the mean "
                  "score over fine-tuning. Per condition over trials; paired over matched groups (a group's curves "
                  "of one condition averaged, the pair on their common steps).", "",
                  "| condition | trials | mean | std | median |", "|---|---|---|---|---|"]
        for kind, d in e["auc"]["per_kind"].items():
            lines.append(f"| {kind} | {d['n']} | {_f(d['mean'])} | {_f(d['std'])} | {_f(d['median'])} |")
        lines += ["", "| comparison | " + STAT_COLUMNS + " |", "|---|" + STAT_RULE]
        for p in e["auc"]["paired"].values():
            lines += _stat_rows([f"{p['a']} - {p['b']}"], p)
        lines += _rough_footnote(e["auc"]["paired"].values())
    if e["steps_to_fraction"]:
        lines += ["", "### Fine-tuning steps to reach a fraction of deterministic's final score", "",
                  "Per matched group, the first fine-tuning step at which a condition's curve reaches the fraction "
                  "of the final value of the group's deterministic curve (for a lower-is-better metric: the final "
                  "value divided by the fraction). Paired: difference in steps over the groups where both "
                  "reached it (negative: the first condition is faster; \"first better\" counts those).", "",
                  "| fraction | condition | groups | reached | median steps |", "|---|---|---|---|---|"]
        for f, st in e["steps_to_fraction"].items():
            for kind, k in st["per_kind"].items():
                if k["groups"]:
                    lines.append(f"| {f} | {kind} | {k['groups']} | {k['reached']} | {_f(k['median'], 1)} |")
        lines += ["", "| fraction | comparison | " + STAT_COLUMNS.replace("seeds for ±0.005", "seeds needed") + " |",
                  "|---|---|" + STAT_RULE]
        for f, st in e["steps_to_fraction"].items():
            for p in st["paired"].values():
                lines += _stat_rows([f, f"{p['a']} - {p['b']}"], p, digits=1)
        lines += _rough_footnote(p for st in e["steps_to_fraction"].values() for p in st["paired"].values())
    if e["notes"]:
        lines += [""] + [f"- {n}" for n in e["notes"]]
    return lines


# ----------------------------------------------------------------- plots

def _colours(conditions) -> dict[str, str]:
    """Plain kinds keep their colour; every other condition takes the next spare one, in report order."""
    conditions = sorted(set(conditions), key=_condition_order)
    spare = iter(_SPARE_COLOURS * (1 + len(conditions) // len(_SPARE_COLOURS)))
    return {c: KIND_COLOURS.get(c) or next(spare) for c in conditions}


def _plots(r: dict, trials: list[TrialRecord], out: Path) -> list[str]:
    from matplotlib.figure import Figure  # no pyplot: the Agg canvas, no global backend

    metric = r["metric"]
    usable = _usable(trials, metric)
    conds = sorted({condition(t) for t in usable}, key=_condition_order)
    files = []
    if conds:
        fig = Figure(figsize=(max(5.5, 1.1 * len(conds) + 2), 3.8), dpi=110)
        ax = fig.subplots()
        data = [[t.value(metric) for t in usable if condition(t) == c] for c in conds]
        ax.boxplot(data, showmeans=True)
        ax.set_xticks(range(1, len(conds) + 1), [f"{c}\n(n={len(d)})" for c, d in zip(conds, data)])
        rng = np.random.default_rng(0)
        for i, values in enumerate(data, 1):
            ax.scatter(i + rng.uniform(-0.08, 0.08, len(values)), values, s=14, alpha=0.7, zorder=3)
        ax.set_ylabel(metric)
        ax.set_title(f"{metric} per condition (completed trials)")
        fig.tight_layout()
        path = out / "distribution.png"
        fig.savefig(path)
        files.append(str(path))
    shown = [p for p in r["paired"].values() if p["n"]]
    if shown:
        fig = Figure(figsize=(max(5.5, 1.4 * len(shown) + 2), 3.8), dpi=110)
        ax = fig.subplots()
        rng = np.random.default_rng(0)
        for i, p in enumerate(shown):
            ax.scatter(i + rng.uniform(-0.08, 0.08, p["n"]), p["differences"], s=14, alpha=0.6)
            lo, hi = p["ci95"] if p["ci95"] else (p["mean"], p["mean"])
            ax.errorbar([i + 0.25], [p["mean"]], yerr=[[p["mean"] - lo], [hi - p["mean"]]], fmt="o", color="k",
                        capsize=4)
        ax.axhline(0.0, color="grey", lw=0.8, ls="--")
        ax.set_xticks(range(len(shown)), [f"{p['a']} -\n{p['b']}\n(n={p['n']})" for p in shown], fontsize=7)
        ax.set_ylabel(f"difference in {metric}")
        ax.set_title("paired differences (mean, Student t 95% CI)")
        fig.tight_layout()
        path = out / "paired.png"
        fig.savefig(path)
        files.append(str(path))
    rates = {t: w for t, w in r["win_rates"].items() if w["n"]}
    if rates:
        fig = Figure(figsize=(max(4.0, 0.6 * len(rates) + 2), 3.5), dpi=110)
        ax = fig.subplots()
        ax.bar(range(len(rates)), [w["rate"] for w in rates.values()])
        ax.axhline(0.5, color="grey", lw=0.8, ls="--")
        ax.set_xticks(range(len(rates)), list(rates), rotation=45, ha="right")
        ax.set_ylim(0, 1)
        ax.set_ylabel("stochastic win rate (test F1)")
        ax.set_title("per-task win rate vs deterministic")
        fig.tight_layout()
        path = out / "win_rates.png"
        fig.savefig(path)
        files.append(str(path))
    path = _curves_plot(r, out / "curves.png")
    pre = _pretraining_plot(r, out / "pretraining.png")
    return files + [str(f) for f in (path, pre) if f]


def _pretraining_plot(r: dict, path: Path) -> Path | None:
    """Each kind's mean validation curve over pretraining epochs with its 95% band."""
    from matplotlib.figure import Figure

    pre = r.get("pretraining") or {}
    if not pre.get("kinds"):
        return None
    fig = Figure(figsize=(5.5, 3.8), dpi=100)
    ax = fig.subplots()
    fig.subplots_adjust(left=0.13, right=0.97, bottom=0.14, top=0.9)
    for kind, c in pre["kinds"].items():
        colour = KIND_COLOURS.get(kind.split()[-1]) if not kind.startswith("shared") else None
        ax.plot(c["steps"], c["mean"], marker="o", ms=3, color=colour, label=f"{kind} (n={c['n']})")
        if c["lo"] is not None:
            ax.fill_between(c["steps"], c["lo"], c["hi"], color=colour, alpha=0.2, lw=0)
    ax.set(xlabel="pretraining epoch", ylabel=r["metric"], title=f"{pre['curve_key']}: mean and t 95% band")
    ax.title.set_fontsize(9)
    ax.legend(fontsize=8)
    fig.savefig(path)
    return path


def _curves_figure(r: dict):
    """One panel per arm (binned settings: a bin each), every condition's mean fine-tuning curve with its
    95% band, all panels on one y scale; (figure, the panels' axes) or None without curves."""
    from matplotlib.figure import Figure

    panels = [p for p in (r.get("efficiency") or {}).get("panels", []) if p["kinds"]]
    if not panels:
        return None
    colours = _colours(c for p in panels for c in p["kinds"])
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig = Figure(figsize=(4.6 * cols, 3.4 * rows + 0.4), dpi=100)
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False, sharey=True)).ravel()
    fig.subplots_adjust(**MARGINS)
    for ax, panel in zip(axes, panels):
        last = max(c["steps"][-1] for c in panel["kinds"].values())
        for cond, c in panel["kinds"].items():
            steps, mean, lo, hi = c["steps"], c["mean"], c["lo"], c["hi"]
            flat = len(steps) == 1
            if flat:  # nothing fine-tuned: the value holds over the panel's steps
                steps, mean = [0, last], mean * 2
                lo, hi = (lo * 2, hi * 2) if lo is not None else (None, None)
            style = "--" if flat else ":" if "shuffled" in cond else "-." if cond != _kind_of(cond) else "-"
            ax.plot(steps, mean, marker="o" if len(steps) < 30 else None, ms=3, color=colours[cond], ls=style,
                    label=f"{cond} (n={c['n']})")
            if lo is not None:
                ax.fill_between(steps, lo, hi, color=colours[cond], alpha=0.2, lw=0)
        title = panel["arm"] if len(panel["arm"]) < 60 else panel["arm"][:57] + "..."
        ax.set(xlabel="fine-tuning step", title=title)
        ax.title.set_fontsize(9)
        ax.legend(fontsize=7)
        ax.yaxis.set_tick_params(labelleft=True)
    for ax in axes[::cols]:
        ax.set_ylabel(r["metric"])
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    height = 3.4 * rows + 0.4
    fig.subplots_adjust(**{**MARGINS, "top": 1 - 0.8 / height})  # room for two title lines above the panels'
    fig.suptitle(f"{r['efficiency']['curve_key']} over fine-tuning\n(step 0: the pretrained model; mean and t 95% "
                 f"interval)", fontsize=9)
    return fig, list(axes[:len(panels)])


def _curves_plot(r: dict, path: Path) -> Path | None:
    made = _curves_figure(r)
    if made is None:
        return None
    made[0].savefig(path)
    return path


__all__ = ["CompareError", "compare", "build_report", "condition", "comparisons", "match_key", "matched_groups",
           "paired_differences", "t_interval", "bootstrap_interval", "sign_flip_test", "holm", "apply_holm",
           "seeds_needed", "varied_settings", "by_setting", "by_noise_scale", "efficiency", "curve_auc",
           "align_curves", "mean_curve", "steps_to_reach", "reach_target", "study_cost", "FRACTIONS",
           "PAIRED_METRICS", "VARIANTS", "HALF_WIDTH", "importances", "param_importances", "IMPORTANCE_MIN_TRIALS"]
