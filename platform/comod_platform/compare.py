"""Modulation conditions compared across a search's trials (docs/method.md, "Claims to test").

:func:`build_report`: per condition the counts, best trial and distribution; paired differences over
matched groups, Holm-adjusted per family; per-task win rates; the curves; the study's cost; parameter
importances. :func:`compare` writes it as ``compare.md``, ``compare.json``, ``importances.json`` and
plots, logged to the search's parent MLflow run. With too few trials the report says so.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np

from comod.names import KINDS
from comod.pretrain_cache import DETERMINING
from comod_platform.conditions import (HEADLINE, VARIANTS, binned, canonical, comparisons, condition,
                                       condition_order, group_unit, levels, matched_groups, mean_of, varied_settings)
from comod_platform.conventions import COMPLETED, FAILED, PRUNED, RUNNING, WALL, best_of
from comod_platform.curves import efficiency, pretraining
from comod_platform.importances import IMPORTANCES_FILE, importances
from comod_platform.results import TrialRecord, guess_mode, load_results, log_to_parent
from comod_platform.stats import (BOOTSTRAP_SEED, EXACT_MAX_N, HALF_WIDTH, LEVEL, RESAMPLES, ROUGH_N, holm,
                                  paired_stats, summary)

ARTIFACT_PATH = "compare"
PAIRED_METRICS = ("test/mean_f1", "test/mean_recall", "test/mean_precision", "test/mean_ece", "test/mean_accuracy")
"""Test metrics every comparison reports besides the search metric (``paired_metrics``)."""
COST_METRICS = ("pretrain_wait_seconds", "pretrain_seconds", WALL)
"""A trial's seconds waiting for another's pretraining, pretraining itself (0 from the cache), in all."""
WAIT_SHARE_TARGET = 0.10
PER_KIND_RATIO_TARGET = 0.4
HOLM_FAMILIES = {
    "conditions": "the search metric, every pair of conditions (the paired-differences table)",
    "test metrics": "each test metric, every pair of conditions (one family per metric)",
    "settings": "the headline pair per value of each varied setting and per noise scale",
    "efficiency": "the paired fine-tuning AUC and steps to each fraction",
}
STATES = (COMPLETED, PRUNED, FAILED, RUNNING)
_TASK_F1 = re.compile(r"^test/([^/]+)/f1$")


class CompareError(RuntimeError):
    """The comparison cannot be made; the message says why."""


def paired_differences(groups: list[dict], key: str, mode: str, resamples: int, seed: int, pairs) -> dict[str, dict]:
    """Per pair ``a-b`` of ``pairs``: ``key``'s a - b group means over the matched groups with both."""
    out = {}
    for a, b in pairs:
        rows = [(g, va - vb) for g in groups if a in g and b in g
                for va, vb in [(mean_of(g[a], key), mean_of(g[b], key))] if va is not None and vb is not None]
        out[f"{a}-{b}"] = {"a": a, "b": b, "groups": [{c: [t.trial_id for t in g[c]] for c in (a, b)} for g, _ in rows],
                           **paired_stats([d for _, d in rows], mode, resamples, seed,
                                          [group_unit(g) for g, _ in rows])}
    return out


def _keys(metric: str, mode: str) -> dict[str, str]:
    """The search metric and test F1, with the mode of each."""
    return {metric: mode, "test/mean_f1": mode if metric == "test/mean_f1" else guess_mode("test/mean_f1")}


def _split(rows: list, values: list, ranged: bool) -> list[tuple[str, list]]:
    """(label, rows) per level of ``values`` (one per row; quantile bins where :func:`binned`), in order."""
    split: dict[tuple, list] = {}
    for row, level in zip(rows, levels(values, binned(values, ranged))):
        split.setdefault(level, []).append(row)
    return [(label, members) for (_, label), members in sorted(split.items())]


def by_setting(groups: list[dict], settings: list[str], metric: str, mode: str, resamples: int = RESAMPLES,
               seed: int = BOOTSTRAP_SEED, ranges=(), headline=HEADLINE) -> dict[str, list[dict]]:
    """Per varied setting, per value or quantile bin (``ranges``: settings sampled from a float range): the
    ``headline`` pair's difference of ``metric`` and test F1 over the matched groups with it."""
    out: dict[str, list[dict]] = {}
    for path in settings:
        values = [next(iter(g.values()))[0].flat.get(path) for g in groups]
        out[path] = [{"value": label, "paired": {
            k: paired_differences(sub, k, m, resamples, seed, [headline])["-".join(headline)]
            for k, m in _keys(metric, mode).items()}} for label, sub in _split(groups, values, path in ranges)]
    return out


def by_noise_scale(groups: list[dict], metric: str, mode: str, resamples: int = RESAMPLES,
                   seed: int = BOOTSTRAP_SEED, ranges=(), headline=HEADLINE) -> list[dict]:
    """Each trial of the ``headline``'s stochastic condition minus its group's mean of the other (``metric``
    and test F1), split by ``modulation.noise_scale`` (quantile bins when it takes many or sampled values)."""
    first, second = headline
    rows = [(t, g[second]) for g in groups if second in g for t in g.get(first, [])]
    values = [t.flat.get("modulation.noise_scale") for t, _ in rows]
    out = []
    for label, members in _split(rows, values, "modulation.noise_scale" in ranges):
        entry = {"noise_scale": label, "trials": [t.trial_id for t, _ in members]}
        for k, m in _keys(metric, mode).items():
            kept = [(a - b, t.flat.get("seed")) for t, det in members
                    for a, b in [(t.value(k), mean_of(det, k))] if a is not None and b is not None]
            entry[k] = paired_stats([d for d, _ in kept], m, resamples, seed, [s for _, s in kept])
        out.append(entry)
    return out


def win_rates(groups: list[dict], trials: list[TrialRecord], headline=HEADLINE) -> dict[str, dict]:
    """Per task, the matched groups where the ``headline``'s first condition beats, ties or loses on test F1."""
    a, b, out = *headline, {}
    for task in sorted({m.group(1) for t in trials for k in t.final for m in [_TASK_F1.match(k)] if m}):
        pairs = [(mean_of(g[a], f"test/{task}/f1"), mean_of(g[b], f"test/{task}/f1"))
                 for g in groups if a in g and b in g]
        pairs = [(s, d) for s, d in pairs if s is not None and d is not None]
        wins = sum(s > d for s, d in pairs)
        out[task] = {"wins": wins, "ties": sum(s == d for s, d in pairs), "losses": sum(s < d for s, d in pairs),
                     "n": len(pairs), "rate": wins / len(pairs) if pairs else None}
    return out


def _pretraining_key(trial: TrialRecord) -> str:
    """The pretraining the trial would need had every kind pretrained its own network."""
    kept = {p: v for p, v in trial.flat.items() if p.split(".")[0] in DETERMINING and p != "pretrain.modulation_kind"}
    kept["modulation.kind"] = trial.kind or trial.flat.get("modulation.kind")
    return canonical(kept)


def study_cost(trials: list[TrialRecord], max_concurrent: int | None = None) -> dict:
    """From the completed trials' :data:`COST_METRICS`: share of slot time spent waiting for a pretraining,
    pretrainings made, study wall time and an estimate of it had every kind pretrained its own network."""
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
        out["study_wall_seconds"] = max(t.start_time + t.wall_seconds for t in timed) - min(t.start_time for t in timed)
        out["study_wall_from"] = "first trial start to last trial end"
    elif max_concurrent:
        out["study_wall_seconds"] = sum(t.wall_seconds for t in trials if t.wall_seconds is not None) / max_concurrent
        out["study_wall_from"] = f"estimate: sum of trial wall times / max_concurrent ({max_concurrent})"
    out["per_kind_pretrainings"] = distinct = len({_pretraining_key(t) for t in have})
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
    """The trials whose settings equal every ``{dotted.path: value}`` of ``where``, else CompareError."""
    for path, value in where.items():
        values, wanted = {canonical(t.flat[path]) for t in trials if path in t.flat}, canonical(value)
        if not values:
            raise CompareError(f"--where {path}: not a setting of this search's trials; use a dotted setting "
                               f"such as pretrain.modulation_kind")
        if wanted not in values:
            raise CompareError(f"--where {path}={value!r}: no trial has it; its values: {', '.join(sorted(values))}")
        trials = [t for t in trials if canonical(t.flat.get(path)) == wanted]
    return trials


def _best(trials: list[TrialRecord], metric: str, mode: str) -> dict | None:
    if not trials:
        return None
    top = best_of(trials, mode, key=lambda t: t.value(metric))
    return {"trial_id": top.trial_id, "run_id": top.run_id, "value": top.value(metric),
            "test": {k: v for k, v in sorted(top.final.items()) if k.startswith("test/mean_")}}


def build_report(name: str, trials: list[TrialRecord], metric: str, mode: str, resamples: int = RESAMPLES,
                 seed: int = BOOTSTRAP_SEED, ranges=(), max_concurrent: int | None = None) -> dict:
    """The comparison of ``trials`` (any state) as a JSON-ready dict; ``ranges``: float-range settings (binned)."""
    done = [t for t in trials if t.completed and t.value(metric) is not None]
    present = sorted({condition(t) for t in done}, key=condition_order)
    listed = sorted(set(KINDS) | set(present), key=condition_order)
    counts = {c: dict.fromkeys(STATES, 0) for c in listed}  # interrupted: where seen
    for t in trials:
        by_state = counts.setdefault(condition(t), dict.fromkeys(STATES, 0))
        by_state[t.state] = by_state.get(t.state, 0) + 1
    by_cond = {c: [t for t in done if condition(t) == c] for c in listed}
    groups, pairs = matched_groups(done), comparisons(present)
    paired = paired_differences(groups, metric, mode, resamples, seed, pairs)
    varied = varied_settings(done)
    report = {"search": name, "metric": metric, "mode": mode, "trials": len(trials), "completed": len(done),
              "conditions": present, "comparisons": [list(p) for p in pairs], "variant_settings": list(VARIANTS),
              "counts": counts, "best": {c: _best(members, metric, mode) for c, members in by_cond.items()},
              "distribution": {c: summary([t.value(metric) for t in members]) for c, members in by_cond.items()},
              "paired": paired, "win_rates": win_rates(groups, done, pairs[0]), "resamples": resamples,
              "bootstrap_seed": seed, "level": LEVEL, "exact_max_n": EXACT_MAX_N, "rough_n": ROUGH_N,
              "half_width": HALF_WIDTH, "notes": _notes(trials, done, by_cond, paired), "out_dir": None,
              "paired_metrics": {k: paired_differences(groups, k, guess_mode(k), resamples, seed, pairs)
                                 for k in PAIRED_METRICS},
              "varied_settings": varied,
              "by_setting": by_setting(groups, varied, metric, mode, resamples, seed, ranges, pairs[0]),
              "by_noise_scale": by_noise_scale(groups, metric, mode, resamples, seed, ranges, pairs[0]),
              "efficiency": efficiency(done, metric, mode, resamples, seed, ranges=ranges, pairs=pairs),
              "pretraining": pretraining(done, metric, mode), "cost": study_cost(trials, max_concurrent)}
    report["holm"] = apply_holm(report)
    return report


def apply_holm(r: dict) -> dict:
    """Sets ``p_holm`` on each unit entry (``by_seed``, else the entry itself) of report ``r``'s paired
    comparisons, Holm within each family; returns the families."""
    metric, e, headline = r["metric"], r["efficiency"], " - ".join(r["comparisons"][0])
    found = {"conditions": [(f"`{metric}` {p['a']} - {p['b']}", p) for p in r["paired"].values()]}
    found.update({f"test metrics: {k}": [(f"`{k}` {p['a']} - {p['b']}", p) for p in ps.values()]
                  for k, ps in r["paired_metrics"].items() if k != metric})
    found["settings"] = [(f"`{k}` {headline} at {path}={row['value']}", p)
                         for path, rows in r["by_setting"].items() for row in rows for k, p in row["paired"].items()]
    found["settings"] += [(f"`{k}` {headline} at noise scale {row['noise_scale']}", p)
                          for row in r["by_noise_scale"] for k, p in row.items() if isinstance(p, dict)]
    found["efficiency"] = [(f"AUC of `{e['curve_key']}` {p['a']} - {p['b']}", p)
                           for p in (e["auc"] or {"paired": {}})["paired"].values()]
    found["efficiency"] += [(f"steps to {f} of deterministic's final {p['a']} - {p['b']}", p)
                            for f, st in (e["steps_to_fraction"] or {}).items() for p in st["paired"].values()]
    families = {}
    for name, items in found.items():
        family = [(label, u) for label, p in items for u in [p.get("by_seed") or p]
                  if u["n"] >= 2 and u["p_sign_flip"] is not None]
        for (_, u), adjusted in zip(family, holm([u["p_sign_flip"] for _, u in family])):
            u["p_holm"] = adjusted
        families[name] = {"m": len(family), "members": [label for label, _ in family]}
    return {"families": families, "rule": "Holm's step-down adjustment within each family: "
            + "; ".join(f"{k}: {v}" for k, v in HOLM_FAMILIES.items())}


def _notes(trials: list[TrialRecord], done, by_cond, paired) -> list[str]:
    notes = []
    if not done:
        c = {s: sum(t.state == s for t in trials) for s in (PRUNED, FAILED, RUNNING)}
        notes.append(f"No completed trial has the metric ({len(trials)} trials: {c[PRUNED]} pruned, "
                     f"{c[FAILED]} failed, {c[RUNNING]} running); nothing to compare yet.")
    for cond, members in by_cond.items():
        if len(members) == 1:
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


def compare(name: str, metric: str | None = None, out_dir: str | Path | None = None, home: Path | None = None,
            resamples: int = RESAMPLES, seed: int = BOOTSTRAP_SEED, log_artifact: bool = True,
            where: dict[str, Any] | None = None) -> dict:
    """Compare the modulation conditions in search ``name`` (only its trials matching ``where``)."""
    from comod_platform.compare_plots import draw
    from comod_platform.report import markdown

    results = load_results(name, home)
    if where:
        results.trials = select_trials(results.trials, where)
    metric = metric or results.metric
    mode = results.mode if metric == results.metric else guess_mode(metric)
    known = {k for t in results.trials for k in t.final} | {results.metric}
    if metric not in known:
        close = sorted(k for k in known if "/mean_" in k)[:8]
        raise CompareError(f"metric {metric!r} is not among search {name!r}'s final metrics; "
                           f"e.g. {', '.join(close) or results.metric}")
    out = Path(out_dir) if out_dir is not None else results.paths.root / "compare"
    out.mkdir(parents=True, exist_ok=True)
    search = getattr(results, "search", None)  # a search file; absent where the records are given alone
    ranges = {p for p, d in getattr(search, "space", {}).items() if getattr(d, "type", None) == "float"}
    report = build_report(name, results.trials, metric, mode, resamples, seed, ranges=ranges,
                          max_concurrent=getattr(getattr(search, "search", None), "max_concurrent", None))
    report.update(out_dir=str(out), where=dict(where or {}), importances=importances(results, metric))
    images = draw(report, results.trials, out)
    md, js, imp = out / "compare.md", out / "compare.json", out / IMPORTANCES_FILE
    md.write_text(markdown(report, [p.name for p in images]))
    imp.write_text(json.dumps(report["importances"], indent=2))
    report["files"] = [str(md), str(js), *map(str, images), str(imp)]
    js.write_text(json.dumps(report, indent=2))
    if log_artifact:
        report["notes"] += log_to_parent(results, report["files"], ARTIFACT_PATH)
    return report


__all__ = ["CompareError", "compare", "build_report", "paired_differences", "by_setting", "by_noise_scale",
           "win_rates", "study_cost", "select_trials", "apply_holm", "importances", "PAIRED_METRICS",
           "HOLM_FAMILIES"]
