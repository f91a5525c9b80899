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
  ``test/<task>/f1`` beats deterministic's.

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

from comod_platform.results import KINDS, SearchResults, TrialRecord, guess_mode, load_results

log = logging.getLogger(__name__)

KIND_ONLY = ("modulation.noise_scale", "modulation.gain_form")
KIND_ONLY_PREFIXES = ("modulation.readout.",)
"""Settings that matter for one kind only; left out when matching trials."""
COMPARISONS = (("stochastic", "deterministic"), ("stochastic", "none"), ("deterministic", "none"))
RESAMPLES = 10_000
BOOTSTRAP_SEED = 0
ARTIFACT_PATH = "compare"
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

    counts = {k: {s: 0 for s in ("completed", "pruned", "failed", "running")} for k in KINDS}
    for t in results.trials:
        counts.setdefault(t.kind or "unknown", {s: 0 for s in ("completed", "pruned", "failed", "running")})
        counts[t.kind or "unknown"][t.state] = counts[t.kind or "unknown"].get(t.state, 0) + 1
    usable = [t for t in results.trials if t.completed and t.value(metric) is not None]
    by_kind = {k: [t for t in usable if t.kind == k] for k in KINDS}

    best = {}
    for kind, trials in by_kind.items():
        if not trials:
            best[kind] = None
            continue
        pick = max if mode == "max" else min
        top = pick(trials, key=lambda t: t.value(metric))
        best[kind] = {"trial_id": top.trial_id, "run_id": top.run_id, "value": top.value(metric),
                      "test": {k: v for k, v in sorted(top.final.items()) if k.startswith("test/mean_")}}
    distribution = {k: _summary([t.value(metric) for t in trials]) for k, trials in by_kind.items()}

    groups: dict[str, dict[str, list[TrialRecord]]] = {}
    for t in usable:
        groups.setdefault(match_key(t), {}).setdefault(t.kind, []).append(t)

    def mean_of(trials: list[TrialRecord], key: str) -> float | None:
        values = [t.final[key] for t in trials if key in t.final and not math.isnan(t.final[key])]
        return float(np.mean(values)) if values else None

    paired: dict[str, dict] = {}
    for a, b in COMPARISONS:
        diffs, members = [], []
        for group in groups.values():
            if a in group and b in group:
                diffs.append(mean_of(group[a], metric) - mean_of(group[b], metric))
                members.append({a: [t.trial_id for t in group[a]], b: [t.trial_id for t in group[b]]})
        ci = bootstrap_ci(diffs, resamples, seed)
        sign = 1 if mode == "max" else -1
        paired[f"{a}-{b}"] = {
            "a": a, "b": b, "n": len(diffs), "differences": diffs, "groups": members,
            "mean": float(np.mean(diffs)) if diffs else None, "ci95": list(ci) if ci else None,
            "a_better": sum(sign * d > 0 for d in diffs), "ties": sum(d == 0 for d in diffs)}

    tasks = sorted({m.group(1) for t in usable for k in t.final for m in [_TASK_F1.match(k)] if m})
    win_rates: dict[str, dict] = {}
    for task in tasks:
        key = f"test/{task}/f1"
        wins = ties = losses = 0
        for group in groups.values():
            if "stochastic" in group and "deterministic" in group:
                s, d = mean_of(group["stochastic"], key), mean_of(group["deterministic"], key)
                if s is None or d is None:
                    continue
                wins, ties, losses = wins + (s > d), ties + (s == d), losses + (s < d)
        n = wins + ties + losses
        win_rates[task] = {"wins": wins, "ties": ties, "losses": losses, "n": n, "rate": wins / n if n else None}

    notes = _notes(results, usable, by_kind, paired)
    report = {"search": name, "metric": metric, "mode": mode, "trials": len(results.trials),
              "completed": len(usable), "counts": counts, "best": best, "distribution": distribution,
              "paired": paired, "win_rates": win_rates, "resamples": resamples, "bootstrap_seed": seed,
              "notes": notes, "out_dir": str(out)}
    files = _plots(report, by_kind, metric, out)
    md = out / "compare.md"
    md.write_text(_markdown(report, [Path(f).name for f in files]))
    js = out / "compare.json"
    report["files"] = [str(md), str(js), *files]
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


def _notes(results: SearchResults, usable, by_kind, paired) -> list[str]:
    notes = []
    c = results.counts()
    if not usable:
        notes.append(f"No completed trial has the metric ({len(results.trials)} trials: {c['pruned']} pruned, "
                     f"{c['failed']} failed, {c['running']} running); nothing to compare yet.")
    for kind, trials in by_kind.items():
        if 0 < len(trials) < 2:
            notes.append(f"Only one completed {kind} trial: its spread (std) is undefined.")
        elif not trials:
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
              "| comparison | pairs | mean difference | 95% CI | first better | ties |", "|---|---|---|---|---|---|"]
    for p in r["paired"].values():
        ci = f"[{p['ci95'][0]:.4f}, {p['ci95'][1]:.4f}]" if p["ci95"] else "n/a"
        lines.append(f"| {p['a']} - {p['b']} | {p['n']} | {_f(p['mean'])} | {ci} | {p['a_better']} | {p['ties']} |")
    lines += ["", "## Per-task win rates (stochastic vs deterministic, test F1)", ""]
    if any(w["n"] for w in r["win_rates"].values()):
        lines += ["| task | wins | ties | losses | pairs | win rate |", "|---|---|---|---|---|---|"]
        for task, w in r["win_rates"].items():
            lines.append(f"| {task} | {w['wins']} | {w['ties']} | {w['losses']} | {w['n']} | {_f(w['rate'], 3)} |")
    else:
        lines.append("No matched stochastic/deterministic pairs with per-task test F1: no win rates.")
    if r["notes"]:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in r["notes"]]
    if images:
        lines += ["", "## Plots", ""] + [f"![{Path(i).stem}]({i})" for i in images]
    return "\n".join(lines) + "\n"


def _plots(r: dict, by_kind: dict, metric: str, out: Path) -> list[str]:
    from matplotlib.figure import Figure  # no pyplot: the Agg canvas, no global backend

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
    return files


__all__ = ["CompareError", "compare", "bootstrap_ci", "match_key"]
