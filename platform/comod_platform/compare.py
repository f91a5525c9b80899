"""Stochastic vs deterministic (vs no) modulation across a search's trials.

``compare(name)`` reads the search's completed trials and reports, by the
search metric (or ``metric``):

- the best trial of each kind, with its test metrics;
- the distribution per kind (n, mean, std, median, min, max);
- paired differences: trials that share every setting except the kind (and
  the settings only one kind uses: ``modulation.noise_scale``,
  ``modulation.gain_form``, ``modulation.readout.*``) form a matched group;
  a group's trials of one kind are averaged, so each group gives one
  difference per pair of kinds, with a seeded bootstrap 95% interval of the
  mean difference over groups;
- per-task win rates: in how many matched groups stochastic's
  ``test/<task>/f1`` beats deterministic's;
- ``paired_metrics``: the same paired differences for the test F1, recall,
  precision, ECE (lower is better) and accuracy;
- ``by_setting``: stochastic - deterministic per value of each setting the
  search varied (the seed, the kind and the kind-only settings aside), and
  ``by_noise_scale``: each stochastic trial against its group's
  deterministic trials, split by ``modulation.noise_scale``;
- ``efficiency``: the fine-tuning curves (``finetune/<metric>`` per
  fine-tuning step, step 0 the pretrained model) per kind and arm, with a
  95% band; per matched group the normalised area under the curve (the mean
  score over fine-tuning) and the steps each kind takes to reach a fraction
  (:data:`FRACTIONS`) of the deterministic trial's final score, paired;
- ``importances``: Optuna's parameter importances (fANOVA) of the search metric
  in the search's study, per kind with at least :data:`IMPORTANCE_MIN_TRIALS`
  completed trials and a setting that varied, and over all kinds (a note
  instead where there are too few); also written as ``importances.json``.

It writes ``compare.md`` and PNG plots into ``out_dir`` (default the search
folder's ``compare/``), logs them to the search's parent MLflow run and
returns the numbers as a dict. With too few trials or no matched groups the
report says so instead of inventing numbers.
"""
from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path
from typing import Any

import numpy as np

from comod_platform.conventions import (COMPLETED, FAILED, PRUNED, RUNNING, best_of, better, direction,
                                        reaches)
from comod_platform.results import KINDS, TrialRecord, guess_mode, load_results

log = logging.getLogger(__name__)

KIND_ONLY = ("modulation.noise_scale", "modulation.gain_form")
KIND_ONLY_PREFIXES = ("modulation.readout.",)
"""Settings that matter for one kind only; left out when matching trials."""
COMPARISONS = (("stochastic", "deterministic"), ("stochastic", "none"), ("deterministic", "none"))
RESAMPLES = 10_000
BOOTSTRAP_SEED = 0
ARTIFACT_PATH = "compare"
PAIRED_METRICS = ("test/mean_f1", "test/mean_recall", "test/mean_precision", "test/mean_ece", "test/mean_accuracy")
"""Test metrics every comparison reports besides the search metric (``paired_metrics``)."""
FRACTIONS = (0.9, 0.95)
"""Efficiency: fine-tuning steps to reach these fractions of the deterministic trial's final score."""
MAX_LEVELS = 6
"""A varied setting with more distinct values is split into :data:`BINS` quantile bins (numbers) and is
not an arm of the fine-tuning curves (one panel per value)."""
BINS = 4
KIND_COLOURS = {"none": "tab:grey", "deterministic": "tab:blue", "stochastic": "tab:orange"}
MARGINS = {"left": 0.08, "right": 0.98, "bottom": 0.14, "top": 0.86, "wspace": 0.25, "hspace": 0.45}
"""Fixed margins (see plots.py: no tight layout)."""
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)
"""Student t 97.5% quantiles for 1..30 degrees of freedom."""
_TASK_F1 = re.compile(r"^test/([^/]+)/f1$")


class CompareError(RuntimeError):
    """The comparison cannot be made; the message says why."""


def match_key(trial: TrialRecord) -> str:
    """Every setting but the kind and the settings only one kind uses, as canonical text."""
    kept = {p: v for p, v in trial.flat.items()
            if p != "modulation.kind" and p not in KIND_ONLY and not p.startswith(KIND_ONLY_PREFIXES)}
    return json.dumps(kept, sort_keys=True, default=str)


def bootstrap_ci(values: list[float], resamples: int = RESAMPLES, seed: int = BOOTSTRAP_SEED,
                 level: float = 0.95) -> tuple[float, float] | None:
    """Percentile bootstrap interval of the mean; None with fewer than two values."""
    x = np.asarray(values, dtype=float)
    if x.size < 2:
        return None
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(resamples, x.size))].mean(axis=1)
    tail = (1.0 - level) / 2 * 100
    lo, hi = np.percentile(means, [tail, 100 - tail])
    return float(lo), float(hi)


def _summary(values: list[float]) -> dict:
    if not values:
        return {"n": 0, "mean": None, "std": None, "median": None, "min": None, "max": None}
    x = np.asarray(values, dtype=float)
    return {"n": int(x.size), "mean": float(x.mean()), "std": float(x.std(ddof=1)) if x.size > 1 else None,
            "median": float(np.median(x)), "min": float(x.min()), "max": float(x.max())}


def t_quantile(df: int) -> float:
    """Student t 97.5% quantile (two-sided 95%): a table to 30 degrees of freedom, then 1.96 + 2.5/df."""
    return _T975[df - 1] if df <= len(_T975) else 1.96 + 2.5 / df


def _mean_of(trials: list[TrialRecord], key: str) -> float | None:
    values = [t.final[key] for t in trials if key in t.final and not math.isnan(t.final[key])]
    return float(np.mean(values)) if values else None


def matched_groups(trials: list[TrialRecord]) -> dict[str, dict[str, list[TrialRecord]]]:
    """``{match_key: {kind: [trials]}}``: trials that differ only in the kind (and kind-only settings)."""
    groups: dict[str, dict[str, list[TrialRecord]]] = {}
    for t in trials:
        groups.setdefault(match_key(t), {}).setdefault(t.kind, []).append(t)
    return groups


def _difference(diffs: list[float], mode: str, resamples: int, seed: int, seeds: list | None = None) -> dict:
    """Mean and bootstrap interval of paired differences. With ``seeds`` (the training seed of each
    difference) and fewer seeds than differences, also ``by_seed``: the differences averaged per seed and
    bootstrapped over seeds. Groups that share a seed share its pretraining (e.g. the arms of a few-shot
    sweep fine-tune one pretrained model), so they are not independent: the seed is the unit."""
    ci = bootstrap_ci(diffs, resamples, seed)
    out = {"n": len(diffs), "differences": diffs, "mean": float(np.mean(diffs)) if diffs else None,
           "ci95": list(ci) if ci else None, "a_better": sum(better(d, 0, mode) for d in diffs),
           "ties": sum(d == 0 for d in diffs)}
    if seeds is not None and len(set(map(str, seeds))) < len(diffs):
        per: dict[str, list[float]] = {}
        for d, s in zip(diffs, seeds):
            per.setdefault(str(s), []).append(d)
        means = [float(np.mean(v)) for _, v in sorted(per.items())]
        seed_ci = bootstrap_ci(means, resamples, seed)
        out["by_seed"] = {"n": len(means), "differences": means, "mean": float(np.mean(means)),
                          "ci95": list(seed_ci) if seed_ci else None, "a_better": sum(better(d, 0, mode) for d in means)}
    return out


def _group_seed(group: dict) -> Any:
    return next(iter(group.values()))[0].flat.get("seed")


def paired_differences(groups: dict, key: str, mode: str, resamples: int = RESAMPLES, seed: int = BOOTSTRAP_SEED,
                       pairs=COMPARISONS) -> dict[str, dict]:
    """Per pair of kinds ``a-b``: one difference of ``key`` (a's group mean - b's) per matched group that has
    both, their mean and bootstrap 95% interval; ``a_better`` counts by ``mode``."""
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
        entry = _difference(diffs, mode, resamples, seed, seeds)
        out[f"{a}-{b}"] = {"a": a, "b": b, "n": entry.pop("n"), "differences": diffs, "groups": members, **entry}
    return out


def _show(value: Any) -> str:
    return "null" if value is None else value if isinstance(value, str) else json.dumps(value)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _levels(values: list) -> list[tuple[tuple, str]]:
    """(sort key, label) per value: the value itself, or with more than MAX_LEVELS distinct numbers, its
    quantile bin ``[min, max]`` (of the values that fall in it)."""
    distinct = {_show(v) for v in values}
    if len(distinct) <= MAX_LEVELS or not all(_is_number(v) for v in values):
        return [((0, float(v), "") if _is_number(v) else (1, 0.0, _show(v)), _show(v)) for v in values]
    x = np.asarray(values, dtype=float)
    edges = np.quantile(x, np.linspace(0, 1, BINS + 1))[1:-1]
    bins = np.searchsorted(edges, x, side="right")
    labels = {b: f"[{x[bins == b].min():.3g}, {x[bins == b].max():.3g}]" for b in set(bins.tolist())}
    return [((0, float(b), ""), labels[b]) for b in bins.tolist()]


def varied_settings(trials: list[TrialRecord]) -> list[str]:
    """Settings whose value differs among ``trials``, the seed, the kind and the kind-only settings aside."""
    out = []
    for path in dict.fromkeys(p for t in trials for p in t.flat):
        if path in ("seed", "modulation.kind") or path in KIND_ONLY or path.startswith(KIND_ONLY_PREFIXES):
            continue
        if len({json.dumps(t.flat.get(path), sort_keys=True, default=str) for t in trials}) > 1:
            out.append(path)
    return out


def by_setting(groups: dict, settings: list[str], metric: str, mode: str, resamples: int = RESAMPLES,
               seed: int = BOOTSTRAP_SEED) -> dict[str, list[dict]]:
    """Per varied setting, per value (or quantile bin): stochastic - deterministic of ``metric`` and test F1
    over the matched groups with that value (a group's trials share it)."""
    keys = list(dict.fromkeys([metric, "test/mean_f1"]))
    out: dict[str, list[dict]] = {}
    for path in settings:
        items = list(groups.values())
        levels = _levels([next(iter(g.values()))[0].flat.get(path) for g in items])
        split: dict[tuple, dict] = {}
        for i, (group, level) in enumerate(zip(items, levels)):
            split.setdefault(level, {})[str(i)] = group
        out[path] = [{"value": label, "paired": {
            k: paired_differences(sub, k, guess_mode(k) if k != metric else mode, resamples, seed,
                                  pairs=(("stochastic", "deterministic"),))["stochastic-deterministic"]
            for k in keys}} for (_, label), sub in sorted(split.items())]
    return out


def by_noise_scale(groups: dict, metric: str, mode: str, resamples: int = RESAMPLES,
                   seed: int = BOOTSTRAP_SEED) -> list[dict]:
    """Each stochastic trial minus its group's deterministic mean (``metric`` and test F1), split by
    ``modulation.noise_scale`` (quantile bins when it takes many values)."""
    keys = list(dict.fromkeys([metric, "test/mean_f1"]))
    rows = [(t, group["deterministic"]) for group in groups.values() if "deterministic" in group
            for t in group.get("stochastic", [])]
    levels = _levels([t.flat.get("modulation.noise_scale") for t, _ in rows])
    split: dict[tuple, list] = {}
    for row, level in zip(rows, levels):
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
    half = t_quantile(n - 1) * v.std(axis=0, ddof=1) / math.sqrt(n) if n > 1 else None
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


def efficiency(trials: list[TrialRecord], metric: str, mode: str, resamples: int = RESAMPLES,
               seed: int = BOOTSTRAP_SEED, fractions=FRACTIONS) -> dict:
    """Fine-tuning curves of ``finetune/<metric>`` of completed trials: per arm and kind the mean curve with a
    t 95% band; per matched group (a group's trials of one kind averaged into one curve) the normalised
    AUC and the steps to reach each fraction of deterministic's final value, with paired differences."""
    key = f"finetune/{metric}"
    notes: list[str] = []
    out = {"curve_key": key, "fractions": list(fractions), "arm_settings": [], "panels": [], "auc": None,
           "steps_to_fraction": None, "groups": [], "notes": notes,
           "band": "Student t 95% interval of the mean over the trials of the kind",
           "grid": "the curves' own fine-tuning steps when all of them have the same; else linear "
                   "interpolation onto the union of their steps within the range all of them cover"}
    have = [t for t in trials if t.curves.get(key)]
    if not have:
        notes.append(f"No completed trial has a fine-tuning curve of `{key}`: no efficiency comparison (runs "
                     f"log it per fine-tuning evaluation; older runs and metrics other than validation ones lack it).")
        return out
    if len(have) < len(trials):
        notes.append(f"{len(trials) - len(have)} of {len(trials)} completed trials have no `{key}` curve; left out.")

    arms = [p for p in varied_settings(have) if len({_show(t.flat.get(p)) for t in have}) <= MAX_LEVELS]
    out["arm_settings"] = arms
    panels: dict[tuple, dict] = {}
    for t in have:
        arm = tuple(_levels([t.flat.get(p)])[0][0] for p in arms)
        label = ", ".join(f"{p}={_show(t.flat.get(p))}" for p in arms) or "all trials"
        panels.setdefault(arm, {"arm": label, "values": {p: t.flat.get(p) for p in arms}, "trials": {}})
        panels[arm]["trials"].setdefault(t.kind, []).append(t.curves[key])
    for arm in sorted(panels):
        panel = panels[arm]
        curves = panel.pop("trials")
        panel["kinds"] = {k: c for k in KINDS if k in curves for c in [mean_curve(curves[k])] if c}
        out["panels"].append(panel)
        thin = [k for k, c in panel["kinds"].items() if c["n"] < 2]
        if thin:
            notes.append(f"{panel['arm']}: one trial only for {', '.join(thin)}: no band.")

    auc_of_trial = {k: [a for t in have if t.kind == k for a in [curve_auc(t.curves[key])] if a is not None]
                    for k in KINDS}
    rows, auc_diffs, step_diffs = [], {f"{a}-{b}": [] for a, b in COMPARISONS}, {}
    auc_seeds: dict[str, list] = {name: [] for name in auc_diffs}
    pairs = (("stochastic", "deterministic"), ("none", "deterministic"))
    reached = {f: {k: [] for k in KINDS} for f in fractions}
    for group in matched_groups(have).values():
        curves = {k: mean_curve([t.curves[key] for t in ts]) for k, ts in group.items()}
        row = {"trials": {k: [t.trial_id for t in ts] for k, ts in group.items()},
               "auc": {k: curve_auc(_pairs(c)) for k, c in curves.items()}, "steps": {}}
        for a, b in COMPARISONS:
            if curves.get(a) and curves.get(b):
                ca, cb = _pairs(curves[a]), _pairs(curves[b])
                aligned = align_curves([ca, cb])
                if aligned is not None and len(aligned[0]) >= 2:
                    x, v, _ = aligned
                    auc_diffs[f"{a}-{b}"].append(curve_auc(list(zip(x, v[0]))) - curve_auc(list(zip(x, v[1]))))
                    auc_seeds[f"{a}-{b}"].append(_group_seed(group))
                elif min(len(ca), len(cb)) == 1:  # a kind with nothing to fine-tune: its flat value
                    auc_diffs[f"{a}-{b}"].append(curve_auc(ca) - curve_auc(cb))
                    auc_seeds[f"{a}-{b}"].append(_group_seed(group))
        if curves.get("deterministic"):
            final = curves["deterministic"]["mean"][-1]
            for f in fractions:
                target = reach_target(final, f, mode)
                steps = {k: steps_to_reach(_pairs(c), target, mode) for k, c in curves.items()}
                row["steps"][f"{f:g}"] = steps
                for k, s in steps.items():
                    reached[f][k].append(s)
                for a, b in pairs:
                    if steps.get(a) is not None and steps.get(b) is not None:
                        step_diffs.setdefault((f, a, b), []).append(float(steps[a] - steps[b]))
        rows.append(row)
    out["groups"] = rows
    out["auc"] = {"per_kind": {k: _summary(v) for k, v in auc_of_trial.items()},
                  "paired": {name: {"a": name.split("-")[0], "b": name.split("-")[1],
                                    **_difference(d, mode, resamples, seed, auc_seeds[name])} for name, d in auc_diffs.items()}}
    out["steps_to_fraction"] = {f"{f:g}": {
        "per_kind": {k: {"groups": len(s), "reached": sum(x is not None for x in s),
                         "median": float(np.median([x for x in s if x is not None]))
                         if any(x is not None for x in s) else None} for k, s in reached[f].items()},
        "paired": {f"{a}-{b}": {"a": a, "b": b, **_difference(step_diffs.get((f, a, b), []), "min", resamples, seed)}
                   for a, b in pairs}} for f in fractions}
    present = {t.kind for t in have}
    for what, p in [("AUC", p) for p in out["auc"]["paired"].values()] + [
            (f"steps to {f}", p) for f, st in out["steps_to_fraction"].items() for p in st["paired"].values()]:
        if p["n"] < 2 and {p["a"], p["b"]} <= present:
            notes.append(f"{what}, {p['a']} - {p['b']}: {p['n']} matched group(s) with both: no interval.")
    if fractions and not any(reached[fractions[0]][k] for k in KINDS):
        notes.append("No matched group has a deterministic curve: no steps-to-fraction.")
    return out


# ----------------------------------------------------------------- pretraining

PLATEAU_WINDOW = 3
"""Pretraining evaluations per half of the plateau check: the mean of the last ones against the ones before."""


def pretraining(trials: list[TrialRecord], metric: str, mode: str) -> dict:
    """The validation curve of ``pretrain/<metric>`` per kind over pretraining epochs (each distinct
    pretraining once: trials that share one through the cache report the same curve), with a plateau
    check: the mean of the last :data:`PLATEAU_WINDOW` epochs minus the mean of the ones before, per
    pretraining, with a t 95% interval over them. A comparison is only as good as its budget: a kind
    still improving when pretraining ends is flagged."""
    key = f"pretrain/{metric}"
    out = {"curve_key": key, "window": PLATEAU_WINDOW, "kinds": {}, "plateau": {}, "notes": []}
    for kind in KINDS:
        seen, curves = set(), []
        for t in trials:
            c = t.curves.get(key)
            if t.kind == kind and c and tuple(v for _, v in c) not in seen:
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
        half = t_quantile(len(gains) - 1) * float(np.std(gains, ddof=1)) / math.sqrt(len(gains)) \
            if len(gains) > 1 else None
        ci = [mean - half, mean + half] if half is not None else None
        out["plateau"][kind] = {"pretrainings": len(gains), "gain": mean, "ci95": ci}
        improving = ci is not None and all(better(bound, 0, mode) for bound in ci)  # the whole interval
        if improving:
            out["notes"].append(f"{kind} was still improving when pretraining ended ({metric} "
                                f"{mean:+.4f} over its last {PLATEAU_WINDOW} epochs against the {PLATEAU_WINDOW} "
                                f"before, 95% CI [{ci[0]:+.4f}, {ci[1]:+.4f}]): consider longer pretraining.")
    return out


def compare(name: str, metric: str | None = None, out_dir: str | Path | None = None, home: Path | None = None,
            resamples: int = RESAMPLES, seed: int = BOOTSTRAP_SEED, log_artifact: bool = True) -> dict:
    """Compare the kinds of modulation in search ``name``; see the module docstring."""
    results = load_results(name, home)
    metric = metric or results.metric
    mode = results.mode if metric == results.metric else guess_mode(metric)
    out = Path(out_dir) if out_dir is not None else results.paths.root / "compare"
    out.mkdir(parents=True, exist_ok=True)

    known = {k for t in results.trials for k in t.final} | {results.metric}
    if metric not in known:
        close = sorted(k for k in known if "/mean_" in k)[:8]
        raise CompareError(f"metric {metric!r} is not among search {name!r}'s final metrics; "
                           f"e.g. {', '.join(close) or results.metric}")
    report = build_report(name, results.trials, metric, mode, resamples, seed)
    report["out_dir"] = str(out)
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
                 seed: int = BOOTSTRAP_SEED) -> dict:
    """The comparison of ``trials`` (a search's records, any state) as a JSON-ready dict: what
    :func:`compare` writes, without MLflow or files (``out_dir`` None)."""
    counted = (COMPLETED, PRUNED, FAILED, RUNNING)  # interrupted only where there are some
    counts = {k: {s: 0 for s in counted} for k in KINDS}
    for t in trials:
        counts.setdefault(t.kind or "unknown", {s: 0 for s in counted})
        counts[t.kind or "unknown"][t.state] = counts[t.kind or "unknown"].get(t.state, 0) + 1
    usable = _usable(trials, metric)
    by_kind = {k: [t for t in usable if t.kind == k] for k in KINDS}

    best = {}
    for kind, members in by_kind.items():
        if not members:
            best[kind] = None
            continue
        top = best_of(members, mode, key=lambda t: t.value(metric))
        best[kind] = {"trial_id": top.trial_id, "run_id": top.run_id, "value": top.value(metric),
                      "test": {k: v for k, v in sorted(top.final.items()) if k.startswith("test/mean_")}}
    distribution = {k: _summary([t.value(metric) for t in members]) for k, members in by_kind.items()}

    groups = matched_groups(usable)
    paired = paired_differences(groups, metric, mode, resamples, seed)
    paired_metrics = {k: paired_differences(groups, k, guess_mode(k), resamples, seed) for k in PAIRED_METRICS}

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
    notes = _notes(trials, usable, by_kind, paired)
    return {"search": name, "metric": metric, "mode": mode, "trials": len(trials),
            "completed": len(usable), "counts": counts, "best": best, "distribution": distribution,
            "paired": paired, "win_rates": win_rates, "resamples": resamples, "bootstrap_seed": seed,
            "notes": notes, "out_dir": None, "paired_metrics": paired_metrics, "varied_settings": varied,
            "by_setting": by_setting(groups, varied, metric, mode, resamples, seed),
            "by_noise_scale": by_noise_scale(groups, metric, mode, resamples, seed),
            "efficiency": efficiency(usable, metric, mode, resamples, seed),
            "pretraining": pretraining(usable, metric, mode)}


def _notes(trials: list[TrialRecord], usable, by_kind, paired) -> list[str]:
    notes = []
    c = {s: sum(t.state == s for t in trials) for s in (PRUNED, FAILED, RUNNING)}
    if not usable:
        notes.append(f"No completed trial has the metric ({len(trials)} trials: {c[PRUNED]} pruned, "
                     f"{c[FAILED]} failed, {c[RUNNING]} running); nothing to compare yet.")
    for kind, members in by_kind.items():
        if 0 < len(members) < 2:
            notes.append(f"Only one completed {kind} trial: its spread (std) is undefined.")
        elif not members:
            notes.append(f"No completed {kind} trial.")
    for key, p in paired.items():
        if p["n"] == 0:
            notes.append(f"No matched pairs for {p['a']} vs {p['b']}: no two completed trials of these kinds share "
                         f"every other setting (search modulation.kind over otherwise equal settings, e.g. the "
                         f"same seeds, to get pairs).")
        elif p["n"] == 1:
            notes.append(f"Only one matched pair for {p['a']} vs {p['b']}: no confidence interval.")
        elif p["n"] < 5:
            notes.append(f"Only {p['n']} matched pairs for {p['a']} vs {p['b']}: the bootstrap interval is rough.")
    return notes


def _f(v: Any, digits: int = 4) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _markdown(r: dict, images: list[str]) -> str:
    lines = [f"# Stochastic vs deterministic modulation: search `{r['search']}`", "",
             f"Metric `{r['metric']}` ({r['mode']}), {r['completed']} completed trials with it, "
             f"{r['trials']} trials in all.", "", "## Trials per kind", "",
             "| kind | completed | pruned | failed | running |", "|---|---|---|---|---|"]
    for kind, c in r["counts"].items():
        lines.append(f"| {kind} | {c.get('completed', 0)} | {c.get('pruned', 0)} | {c.get('failed', 0)} | "
                     f"{c.get('running', 0)} |")
    test_keys = sorted({k for b in r["best"].values() if b for k in b["test"]})
    lines += ["", "## Best trial of each kind", "",
              "| kind | trial | " + f"{r['metric']} | " + " | ".join(test_keys) + (" |" if test_keys else ""),
              "|---|---|---|" + "---|" * len(test_keys)]
    for kind, b in r["best"].items():
        if b is None:
            lines.append(f"| {kind} | none completed | n/a |" + " n/a |" * len(test_keys))
        else:
            lines.append(f"| {kind} | `{b['trial_id']}` | {_f(b['value'])} | "
                         + " | ".join(_f(b["test"].get(k)) for k in test_keys) + (" |" if test_keys else ""))
    lines += ["", "## Distribution per kind (completed trials)", "",
              "| kind | n | mean | std | median | min | max |", "|---|---|---|---|---|---|---|"]
    for kind, d in r["distribution"].items():
        lines.append(f"| {kind} | {d['n']} | {_f(d['mean'])} | {_f(d['std'])} | {_f(d['median'])} | "
                     f"{_f(d['min'])} | {_f(d['max'])} |")
    lines += ["", "## Paired differences", "",
              "Trials that share every setting except `modulation.kind` (and `modulation.noise_scale`, "
              "`modulation.gain_form`, `modulation.readout.*`) are matched; a group's trials of one kind are "
              f"averaged. Difference = first minus second kind; 95% interval: percentile bootstrap of the mean, "
              f"{r['resamples']} resamples, seed {r['bootstrap_seed']}.", "",
              "Where several groups share a training seed (and so its pretraining), \"by seed\" averages "
              "them per seed and bootstraps over seeds: the interval to read.", "",
              "| comparison | pairs | mean difference | 95% CI | first better | ties | by seed: seeds, mean, 95% CI |",
              "|---|---|---|---|---|---|---|"]
    for p in r["paired"].values():
        lines.append(f"| {p['a']} - {p['b']} | {p['n']} | {_f(p['mean'])} | {_ci(p)} | {p['a_better']} | {p['ties']} "
                     f"| {_by_seed(p)} |")
    lines += ["", "## Per-task win rates (stochastic vs deterministic, test F1)", ""]
    if any(w["n"] for w in r["win_rates"].values()):
        lines += ["| task | wins | ties | losses | pairs | win rate |", "|---|---|---|---|---|---|"]
        for task, w in r["win_rates"].items():
            lines.append(f"| {task} | {w['wins']} | {w['ties']} | {w['losses']} | {w['n']} | {_f(w['rate'], 3)} |")
    else:
        lines.append("No matched stochastic/deterministic pairs with per-task test F1: no win rates.")
    lines += _markdown_more(r)
    lines += _markdown_pretraining(r.get("pretraining"))
    lines += _markdown_importances(r.get("importances"))
    if r["notes"]:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in r["notes"]]
    if images:
        lines += ["", "## Plots", ""] + [f"![{Path(i).stem}]({i})" for i in images]
    return "\n".join(lines) + "\n"


def _ci(p: dict | None, digits: int = 4) -> str:
    return f"[{p['ci95'][0]:.{digits}f}, {p['ci95'][1]:.{digits}f}]" if p and p.get("ci95") else "n/a"


def _by_seed(p: dict | None) -> str:
    b = (p or {}).get("by_seed")
    return f"{b['n']}, {_f(b['mean'])}, {_ci(b)}" if b else "n/a"


def _markdown_pretraining(pre: dict | None) -> list[str]:
    if not pre or not pre["kinds"]:
        return []
    w = pre["window"]
    lines = ["", "## Pretraining", "",
             f"`{pre['curve_key']}` per pretraining epoch, each distinct pretraining once (trials that share one "
             f"through the cache count once). Plateau: the mean of the last {w} epochs minus the mean of the "
             f"{w} before, per pretraining, with a t 95% interval; a comparison is only as good as its budget.", "",
             "| kind | pretrainings | epochs | last epoch (mean) | plateau gain | 95% CI |", "|---|---|---|---|---|---|"]
    for kind, c in pre["kinds"].items():
        plateau = pre["plateau"].get(kind) or {}
        lines.append(f"| {kind} | {c['n']} | {len(c['steps'])} | {_f(c['mean'][-1])} | {_f(plateau.get('gain'))} | "
                     f"{_ci(plateau)} |")
    lines += [f"- {n}" for n in pre["notes"]]
    return lines


def _markdown_more(r: dict) -> list[str]:
    """The sections on the test metrics, the varied settings, the noise scale and fine-tuning efficiency."""
    lines = ["", "## Paired differences on the test metrics", "",
             "Same matched groups and bootstrap as above. Higher is better except for ECE (`test/mean_ece`, "
             "calibration error), where a negative difference favours the first kind; \"first better\" counts "
             "accordingly.", "",
             "| metric | comparison | pairs | mean difference | 95% CI | first better | by seed: seeds, mean, 95% CI |",
             "|---|---|---|---|---|---|---|"]
    for key, pairs in r.get("paired_metrics", {}).items():
        for p in pairs.values():
            lines.append(f"| `{key}` | {p['a']} - {p['b']} | {p['n']} | {_f(p['mean'])} | {_ci(p)} | "
                         f"{p['a_better'] if p['n'] else 'n/a'} | {_by_seed(p)} |")
    keys = list(dict.fromkeys([r["metric"], "test/mean_f1"]))
    lines += ["", "## Stochastic - deterministic per varied setting", ""]
    if r.get("by_setting"):
        lines += ["Matched groups split by the value of each setting the search varied (the seed, the kind and "
                  "kind-only settings aside; many numeric values: quantile bins).", "",
                  "| setting | value | " + " | ".join(f"pairs | `{k}` difference | 95% CI" for k in keys) + " |",
                  "|---|---|" + "---|---|---|" * len(keys)]
        for path, rows in r["by_setting"].items():
            for row in rows:
                cells = [f"{row['paired'][k]['n']} | {_f(row['paired'][k]['mean'])} | {_ci(row['paired'][k])}"
                         for k in keys]
                lines.append(f"| `{path}` | {row['value']} | " + " | ".join(cells) + " |")
    else:
        lines.append("The search varied no setting besides the seed, the kind and the kind-only settings.")
    lines += ["", "## Stochastic - deterministic by noise scale", ""]
    if r.get("by_noise_scale"):
        lines += ["Each stochastic trial minus the mean of its group's deterministic trials, split by "
                  "`modulation.noise_scale`.", "",
                  "| noise scale | " + " | ".join(f"trials | `{k}` difference | 95% CI | by seed" for k in keys)
                  + " |", "|---|" + "---|---|---|---|" * len(keys)]
        for row in r["by_noise_scale"]:
            lines.append(f"| {row['noise_scale']} | " + " | ".join(
                f"{row[k]['n']} | {_f(row[k]['mean'])} | {_ci(row[k])} | {_by_seed(row[k])}" for k in keys) + " |")
    else:
        lines.append("No stochastic trial with a deterministic trial in its matched group.")
    e = r.get("efficiency")
    if e is None:
        return lines
    lines += ["", "## Fine-tuning efficiency", "",
              f"Does one kind converge in less fine-tuning? Curve: `{e['curve_key']}` per fine-tuning step (step 0 "
              f"is the pretrained model, so a kind that starts higher gains area without learning faster). Curves "
              f"are averaged on {e['grid']}; band: {e['band']}."]
    if e["panels"]:
        lines += ["", "### Curves", "", "| arm | kind | trials | steps | grid | start | final | final 95% CI |",
                  "|---|---|---|---|---|---|---|---|"]
        for panel in e["panels"]:
            for kind, c in panel["kinds"].items():
                ci = f"[{c['lo'][-1]:.4f}, {c['hi'][-1]:.4f}]" if c["lo"] is not None else "n/a"
                lines.append(f"| {panel['arm']} | {kind} | {c['n']} | {c['steps'][-1]} | {c['grid']} | "
                             f"{_f(c['mean'][0])} | {_f(c['mean'][-1])} | {ci} |")
    if e["auc"]:
        lines += ["", "### Area under the fine-tuning curve", "",
                  "Normalised area: the trapezoid over fine-tuning steps divided by the step range, i.e. the mean "
                  "score over fine-tuning. Per kind over trials; paired over matched groups (a group's curves of "
                  "one kind averaged, the pair on their common steps), bootstrap 95% CI.", "",
                  "| kind | trials | mean | std | median |", "|---|---|---|---|---|"]
        for kind, d in e["auc"]["per_kind"].items():
            lines.append(f"| {kind} | {d['n']} | {_f(d['mean'])} | {_f(d['std'])} | {_f(d['median'])} |")
        lines += ["", "| comparison | groups | mean AUC difference | 95% CI | first better | by seed: seeds, mean, 95% CI |",
                  "|---|---|---|---|---|---|"]
        for p in e["auc"]["paired"].values():
            lines.append(f"| {p['a']} - {p['b']} | {p['n']} | {_f(p['mean'])} | {_ci(p)} | "
                         f"{p['a_better'] if p['n'] else 'n/a'} | {_by_seed(p)} |")
    if e["steps_to_fraction"]:
        lines += ["", "### Fine-tuning steps to reach a fraction of deterministic's final score", "",
                  "Per matched group, the first fine-tuning step at which a kind's curve reaches the fraction of "
                  "the final value of the group's deterministic curve (for a lower-is-better metric: the final "
                  "value divided by the fraction). Paired: difference in steps over the groups where both "
                  "reached it (negative: the first kind is faster).", "",
                  "| fraction | kind | groups | reached | median steps |", "|---|---|---|---|---|"]
        for f, st in e["steps_to_fraction"].items():
            for kind, k in st["per_kind"].items():
                if k["groups"]:
                    lines.append(f"| {f} | {kind} | {k['groups']} | {k['reached']} | {_f(k['median'], 1)} |")
        lines += ["", "| fraction | comparison | groups (both reached) | mean difference (steps) | 95% CI | "
                  "first faster |", "|---|---|---|---|---|---|"]
        for f, st in e["steps_to_fraction"].items():
            for p in st["paired"].values():
                lines.append(f"| {f} | {p['a']} - {p['b']} | {p['n']} | {_f(p['mean'], 1)} | {_ci(p, 1)} | "
                             f"{p['a_better'] if p['n'] else 'n/a'} |")
    if e["notes"]:
        lines += [""] + [f"- {n}" for n in e["notes"]]
    return lines


def _plots(r: dict, trials: list[TrialRecord], out: Path) -> list[str]:
    from matplotlib.figure import Figure  # no pyplot: the Agg canvas, no global backend

    metric = r["metric"]
    usable = _usable(trials, metric)
    by_kind = {k: [t for t in usable if t.kind == k] for k in KINDS}
    files = []
    kinds = [k for k, trials in by_kind.items() if trials]
    if kinds:
        fig = Figure(figsize=(5.5, 3.8), dpi=110)
        ax = fig.subplots()
        data = [[t.value(metric) for t in by_kind[k]] for k in kinds]
        ax.boxplot(data, showmeans=True)
        ax.set_xticks(range(1, len(kinds) + 1), [f"{k}\n(n={len(d)})" for k, d in zip(kinds, data)])
        rng = np.random.default_rng(0)
        for i, values in enumerate(data, 1):
            ax.scatter(i + rng.uniform(-0.08, 0.08, len(values)), values, s=14, alpha=0.7, zorder=3)
        ax.set_ylabel(metric)
        ax.set_title(f"{metric} per modulation kind (completed trials)")
        fig.tight_layout()
        path = out / "distribution.png"
        fig.savefig(path)
        files.append(str(path))
    shown = [p for p in r["paired"].values() if p["n"]]
    if shown:
        fig = Figure(figsize=(5.5, 3.8), dpi=110)
        ax = fig.subplots()
        rng = np.random.default_rng(0)
        for i, p in enumerate(shown):
            ax.scatter(i + rng.uniform(-0.08, 0.08, p["n"]), p["differences"], s=14, alpha=0.6)
            lo, hi = p["ci95"] if p["ci95"] else (p["mean"], p["mean"])
            ax.errorbar([i + 0.25], [p["mean"]], yerr=[[p["mean"] - lo], [hi - p["mean"]]], fmt="o", color="k",
                        capsize=4)
        ax.axhline(0.0, color="grey", lw=0.8, ls="--")
        ax.set_xticks(range(len(shown)), [f"{p['a']} - {p['b']}\n(n={p['n']})" for p in shown])
        ax.set_ylabel(f"difference in {metric}")
        ax.set_title("paired differences (mean, bootstrap 95% CI)")
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
        colour = KIND_COLOURS.get(kind)
        ax.plot(c["steps"], c["mean"], marker="o", ms=3, color=colour, label=f"{kind} (n={c['n']})")
        if c["lo"] is not None:
            ax.fill_between(c["steps"], c["lo"], c["hi"], color=colour, alpha=0.2, lw=0)
    ax.set(xlabel="pretraining epoch", ylabel=r["metric"], title=f"{pre['curve_key']}: mean and t 95% band")
    ax.title.set_fontsize(9)
    ax.legend(fontsize=8)
    fig.savefig(path)
    return path


def _curves_plot(r: dict, path: Path) -> Path | None:
    """One panel per arm: each kind's mean fine-tuning curve with its 95% band."""
    from matplotlib.figure import Figure

    panels = [p for p in (r.get("efficiency") or {}).get("panels", []) if p["kinds"]]
    if not panels:
        return None
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig = Figure(figsize=(4.6 * cols, 3.4 * rows + 0.4), dpi=100)
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    fig.subplots_adjust(**MARGINS)
    for ax, panel in zip(axes, panels):
        last = max(c["steps"][-1] for c in panel["kinds"].values())
        for kind, c in panel["kinds"].items():
            colour = KIND_COLOURS.get(kind)
            steps, mean, lo, hi = c["steps"], c["mean"], c["lo"], c["hi"]
            if len(steps) == 1:  # nothing fine-tuned: the value holds over the panel's steps
                steps, mean = [0, last], mean * 2
                lo, hi = (lo * 2, hi * 2) if lo is not None else (None, None)
            ax.plot(steps, mean, marker="o" if len(steps) < 30 else None, ms=3, color=colour,
                    ls="--" if len(c["steps"]) == 1 else "-", label=f"{kind} (n={c['n']})")
            if lo is not None:
                ax.fill_between(steps, lo, hi, color=colour, alpha=0.2, lw=0)
        ax.set(xlabel="fine-tuning step", ylabel=r["metric"], title=panel["arm"] if len(panel["arm"]) < 60
               else panel["arm"][:57] + "...")
        ax.title.set_fontsize(9)
        ax.legend(fontsize=8)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    fig.suptitle(f"{r['efficiency']['curve_key']} over fine-tuning: mean and Student t 95% interval over trials",
                 fontsize=10)
    fig.savefig(path)
    return path


__all__ = ["CompareError", "compare", "build_report", "bootstrap_ci", "match_key", "matched_groups",
           "paired_differences", "varied_settings", "by_setting", "by_noise_scale", "efficiency", "curve_auc",
           "align_curves", "mean_curve", "steps_to_reach", "reach_target", "t_quantile", "FRACTIONS",
           "PAIRED_METRICS", "importances", "param_importances", "IMPORTANCE_MIN_TRIALS"]
