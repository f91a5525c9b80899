"""Learning curves in a comparison: fine-tuning efficiency and the pretraining's plateau."""
from __future__ import annotations

import numpy as np

from comod.names import KINDS
from comod_platform.conditions import (comparisons, condition, condition_order, group_unit, levels, binned,
                                       matched_groups, varied_settings)
from comod_platform.conventions import better, reaches
from comod_platform.results import TrialRecord
from comod_platform.stats import BOOTSTRAP_SEED, RESAMPLES, paired_stats, summary, t_half_width, t_interval

FRACTIONS = (0.9, 0.95)
"""Steps to reach these fractions of the deterministic trial's final score."""
MAX_PANELS = 12
"""Most panels of the curves: settings with the most levels stop being arms beyond it."""
PLATEAU_WINDOW = 3
"""Pretraining evaluations per half of the plateau check: the last ones against the ones before."""


def curve_auc(curve: list[tuple[int, float]]) -> float | None:
    """Trapezoid area over the steps divided by their range (one point: its value; none: None)."""
    if not curve:
        return None
    if len(curve) == 1:
        return float(curve[0][1])
    x, y = np.asarray(curve, dtype=float).T
    return float(((y[1:] + y[:-1]) / 2 * np.diff(x)).sum() / (x[-1] - x[0]))


def align_curves(curves: list[list[tuple[int, float]]]) -> tuple[np.ndarray, np.ndarray, str] | None:
    """(steps, values [curve, step], ``common`` or ``interpolated`` onto the union of their steps within
    the range all cover); None for no curve or no step all cover."""
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
    """Mean of the aligned curves and its t 95% interval over them (``lo``/``hi`` None with one curve)."""
    aligned = align_curves(curves)
    if aligned is None:
        return None
    steps, v, how = aligned
    n, m = v.shape[0], v.mean(axis=0)
    half = t_half_width(v.std(axis=0, ddof=1), n) if n > 1 else None
    return {"n": n, "steps": [int(s) for s in steps], "mean": m.tolist(), "grid": how,
            "lo": (m - half).tolist() if half is not None else None,
            "hi": (m + half).tolist() if half is not None else None}


def steps_to_reach(curve: list[tuple[int, float]], target: float, mode: str = "max") -> int | None:
    """First step at which the curve reaches ``target`` (>= for max, <= for min); None if never."""
    return next((int(s) for s, v in curve if reaches(v, target, mode)), None)


def reach_target(final: float, fraction: float, mode: str = "max") -> float:
    """``fraction`` of a final score: ``fraction * final``, or ``final / fraction`` when lower is better."""
    return fraction * final if mode == "max" else final / fraction


def _paired(a: str, b: str, rows: list[tuple[float, str]], mode: str, resamples: int, seed: int, **kw) -> dict:
    """:func:`stats.paired_stats` of a - b over (difference, unit) ``rows``."""
    return {"a": a, "b": b, **paired_stats([d for d, _ in rows], mode, resamples, seed, [u for _, u in rows], **kw)}


def _panels(have: list[TrialRecord], key: str, ranges, out: dict) -> None:
    """The curves per arm (a value or bin of each varied setting) and condition, into ``out``."""
    arms = varied_settings(have)
    in_bins = {p: binned([t.flat.get(p) for t in have], p in ranges) for p in arms}
    found = {p: levels([t.flat.get(p) for t in have], in_bins[p]) for p in arms}
    dropped = []
    while len({tuple(found[p][i][0] for p in arms) for i in range(len(have))}) > MAX_PANELS:
        dropped.append(max(reversed(arms), key=lambda p: len({k for k, _ in found[p]})))
        arms.remove(dropped[-1])
    out["arm_settings"], out["binned_settings"] = arms, [p for p in arms if in_bins[p]]
    if dropped:
        out["notes"].append(f"Not split into panels (more than {MAX_PANELS} panels otherwise): "
                            f"{', '.join(f'`{p}`' for p in dropped)}.")
    panels: dict[tuple, dict] = {}
    for i, t in enumerate(have):
        label = ", ".join(f"{p} in {found[p][i][1]}" if in_bins[p] else f"{p}={found[p][i][1]}" for p in arms)
        panel = panels.setdefault(tuple(found[p][i][0] for p in arms), {
            "arm": label or "all trials", "values": {p: found[p][i][1] for p in arms}, "trials": {}})
        panel["trials"].setdefault(condition(t), []).append(t.curves[key])
    for panel in (panels[arm] for arm in sorted(panels)):
        curves = panel.pop("trials")
        panel["kinds"] = {k: c for k in sorted(curves, key=condition_order) for c in [mean_curve(curves[k])] if c}
        out["panels"].append(panel)
        if thin := [k for k, c in panel["kinds"].items() if c["n"] < 2]:
            out["notes"].append(f"{panel['arm']}: one trial only for {', '.join(thin)}: no band.")


def efficiency(trials: list[TrialRecord], metric: str, mode: str, resamples: int = RESAMPLES,
               seed: int = BOOTSTRAP_SEED, ranges=(), pairs=None) -> dict:
    """``finetune/<metric>`` curves per arm and condition; per matched group the paired AUC (``pairs``) and
    the steps to each fraction of deterministic's final value."""
    key = f"finetune/{metric}"
    notes: list[str] = []
    out = {"curve_key": key, "fractions": list(FRACTIONS), "arm_settings": [], "binned_settings": [], "panels": [],
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
    _panels(have, key, ranges, out)

    present = sorted({condition(t) for t in have}, key=condition_order)
    pairs = comparisons(present) if pairs is None else pairs
    to_det = [(c, "deterministic") for c in sorted({"stochastic", "none", *present}, key=condition_order)
              if c != "deterministic"]
    auc: dict[tuple, list] = {p: [] for p in pairs}  # (difference, unit) per matched group
    steps_paired: dict[tuple, list] = {(f, a, b): [] for f in FRACTIONS for a, b in to_det}
    reached = {f: {k: [] for k in present} for f in FRACTIONS}
    for group in matched_groups(have):
        unit = group_unit(group)
        means = {k: mean_curve([t.curves[key] for t in ts]) for k, ts in group.items()}
        curves = {k: list(zip(m["steps"], m["mean"])) if m else [] for k, m in means.items()}
        row = {"trials": {k: [t.trial_id for t in ts] for k, ts in group.items()},
               "auc": {k: curve_auc(c) for k, c in curves.items()}, "steps": {}}
        for a, b in pairs:
            if curves.get(a) and curves.get(b):
                ca, cb = curves[a], curves[b]
                aligned = align_curves([ca, cb])
                if aligned is not None and len(aligned[0]) >= 2:
                    x, v, _ = aligned
                    ca, cb = list(zip(x, v[0])), list(zip(x, v[1]))
                elif min(len(ca), len(cb)) != 1:  # one point: a condition with nothing to fine-tune, its value
                    continue
                auc[(a, b)].append((curve_auc(ca) - curve_auc(cb), unit))
        if curves.get("deterministic"):
            for f in FRACTIONS:
                target = reach_target(curves["deterministic"][-1][1], f, mode)
                steps = row["steps"][f"{f:g}"] = {k: steps_to_reach(c, target, mode) for k, c in curves.items()}
                for k, s in steps.items():
                    reached[f][k].append(s)
                for a, b in to_det:
                    if steps.get(a) is not None and steps.get(b) is not None:
                        steps_paired[(f, a, b)].append((float(steps[a] - steps[b]), unit))
        out["groups"].append(row)
    out["auc"] = {"per_kind": {k: summary([curve_auc(t.curves[key]) for t in have if condition(t) == k])
                               for k in present},
                  "paired": {f"{a}-{b}": _paired(a, b, auc[(a, b)], mode, resamples, seed) for a, b in pairs}}
    out["steps_to_fraction"] = {f"{f:g}": {
        "per_kind": {k: {"groups": len(s), "reached": sum(x is not None for x in s),
                         "median": float(np.median(hit)) if (hit := [x for x in s if x is not None]) else None}
                     for k, s in reached[f].items()},
        "paired": {f"{a}-{b}": _paired(a, b, steps_paired[(f, a, b)], "min", resamples, seed, half_width=None)
                   for a, b in to_det}} for f in FRACTIONS}
    for what, p in [("AUC", p) for p in out["auc"]["paired"].values()] + [
            (f"steps to {f}", p) for f, st in out["steps_to_fraction"].items() for p in st["paired"].values()]:
        if p["n"] < 2 and {p["a"], p["b"]} <= set(present):
            notes.append(f"{what}, {p['a']} - {p['b']}: {p['n']} matched group(s) with both: no interval.")
    if not any(reached[FRACTIONS[0]].values()):
        notes.append("No matched group has a deterministic curve: no steps-to-fraction.")
    return out


def pretrained_with(trial: TrialRecord) -> str:
    """``shared <pretrain.modulation_kind>`` where set, else the trial's own kind."""
    design = trial.flat.get("pretrain.modulation_kind", "same")
    return f"shared {design}" if design not in (None, "same") else (trial.kind or "unknown")


def pretraining(trials: list[TrialRecord], metric: str, mode: str) -> dict:
    """Mean ``pretrain/<metric>`` curve per :func:`pretrained_with` (each pretraining once) and a plateau
    check: the last :data:`PLATEAU_WINDOW` epochs minus the ones before, with a t 95% interval."""
    key = f"pretrain/{metric}"
    out = {"curve_key": key, "window": PLATEAU_WINDOW, "kinds": {}, "plateau": {}, "notes": []}
    w = PLATEAU_WINDOW
    labels = sorted({pretrained_with(t) for t in trials}, key=lambda m: (
        m.startswith("shared"), KINDS.index(m.split()[-1]) if m.split()[-1] in KINDS else 9, m))
    for kind in labels:
        mine = [t.curves.get(key) for t in trials if pretrained_with(t) == kind]
        found = list(dict.fromkeys(tuple(v for _, v in c) for c in mine if c))  # a shared pretraining once
        if not found:
            continue
        out["kinds"][kind] = mean_curve([list(enumerate(values, 1)) for values in found])  # one evaluation per epoch
        gains = [float(np.mean(c[-w:]) - np.mean(c[-2 * w:-w])) for c in found if len(c) >= 2 * w]
        if not gains:
            out["notes"].append(f"{kind}: pretraining shorter than {2 * w} epochs: no plateau check.")
            continue
        mean, ci = float(np.mean(gains)), t_interval(gains)
        out["plateau"][kind] = {"pretrainings": len(gains), "gain": mean, "ci95": list(ci) if ci else None}
        if ci is not None and all(better(bound, 0, mode) for bound in ci):  # the whole interval
            out["notes"].append(f"{kind} was still improving when pretraining ended ({metric} {mean:+.4f} over its "
                                f"last {w} epochs against the {w} before, 95% CI [{ci[0]:+.4f}, {ci[1]:+.4f}]): "
                                f"consider longer pretraining.")
    return out
