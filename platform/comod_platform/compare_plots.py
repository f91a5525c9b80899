"""The comparison's figures (PNG, matplotlib's Agg canvas, no pyplot): the metric per condition, the
paired differences, per-task win rates, the fine-tuning curves per arm and the pretraining curves."""
from __future__ import annotations

import math
from itertools import cycle
from pathlib import Path

import numpy as np

from comod_platform.conditions import condition, condition_order, kind_of
from comod_platform.results import TrialRecord

KIND_COLOURS = {"none": "tab:grey", "deterministic": "tab:blue", "stochastic": "tab:orange"}
SPARE_COLOURS = ("tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan")
JITTER = 0.08
"""Half-width of the random horizontal offset of a plotted point, so equal values stay apart."""


def _figure(width: float, height: float, dpi: int = 110, **grid):
    from matplotlib.figure import Figure  # no pyplot: no global backend

    fig = Figure(figsize=(width, height), dpi=dpi)
    return fig, fig.subplots(**grid)


def _save(fig, path: Path, tight: bool = True) -> Path:
    if tight:
        fig.tight_layout()
    fig.savefig(path)
    return path


def _band(ax, c: dict, colour, label: str, **style) -> None:
    """Mean curve ``c`` over its steps, with its 95% band where it has one."""
    ax.plot(c["steps"], c["mean"], ms=3, color=colour, label=label, **style)
    if c["lo"] is not None:
        ax.fill_between(c["steps"], c["lo"], c["hi"], color=colour, alpha=0.2, lw=0)


def draw(r: dict, trials: list[TrialRecord], out: Path) -> list[Path]:
    """Every figure report ``r`` has data for, written into ``out``; their paths."""
    metric, conds, files = r["metric"], r["conditions"], []
    if conds:
        fig, ax = _figure(max(5.5, 1.1 * len(conds) + 2), 3.8)
        data = [[t.value(metric) for t in trials if t.completed and t.value(metric) is not None and condition(t) == c]
                for c in conds]
        ax.boxplot(data, showmeans=True)
        ax.set_xticks(range(1, len(conds) + 1), [f"{c}\n(n={len(d)})" for c, d in zip(conds, data)])
        rng = np.random.default_rng(0)
        for i, values in enumerate(data, 1):
            ax.scatter(i + rng.uniform(-JITTER, JITTER, len(values)), values, s=14, alpha=0.7, zorder=3)
        ax.set(ylabel=metric, title=f"{metric} per condition (completed trials)")
        files.append(_save(fig, out / "distribution.png"))
    if shown := [p for p in r["paired"].values() if p["n"]]:
        fig, ax = _figure(max(5.5, 1.4 * len(shown) + 2), 3.8)
        rng = np.random.default_rng(0)
        for i, p in enumerate(shown):
            ax.scatter(i + rng.uniform(-JITTER, JITTER, p["n"]), p["differences"], s=14, alpha=0.6)
            lo, hi = p["ci95"] or (p["mean"], p["mean"])
            ax.errorbar([i + 0.25], [p["mean"]], yerr=[[p["mean"] - lo], [hi - p["mean"]]], fmt="o", color="k",
                        capsize=4)
        ax.axhline(0.0, color="grey", lw=0.8, ls="--")
        ax.set_xticks(range(len(shown)), [f"{p['a']} -\n{p['b']}\n(n={p['n']})" for p in shown], fontsize=7)
        ax.set(ylabel=f"difference in {metric}", title="paired differences (mean, Student t 95% CI)")
        files.append(_save(fig, out / "paired.png"))
    if rates := {t: w for t, w in r["win_rates"].items() if w["n"]}:
        fig, ax = _figure(max(4.0, 0.6 * len(rates) + 2), 3.5)
        ax.bar(range(len(rates)), [w["rate"] for w in rates.values()])
        ax.axhline(0.5, color="grey", lw=0.8, ls="--")
        ax.set_xticks(range(len(rates)), list(rates), rotation=45, ha="right")
        ax.set(ylim=(0, 1), ylabel="stochastic win rate (test F1)", title="per-task win rate vs deterministic")
        files.append(_save(fig, out / "win_rates.png"))
    if made := curves_figure(r):
        files.append(_save(made[0], out / "curves.png", tight=False))
    if (pre := r["pretraining"])["kinds"]:  # each kind's mean validation curve over pretraining epochs
        fig, ax = _figure(5.5, 3.8, dpi=100)
        fig.subplots_adjust(left=0.13, right=0.97, bottom=0.14, top=0.9)
        for kind, c in pre["kinds"].items():
            colour = None if kind.startswith("shared") else KIND_COLOURS.get(kind)
            _band(ax, c, colour, f"{kind} (n={c['n']})", marker="o")
        ax.set(xlabel="pretraining epoch", ylabel=metric)
        ax.set_title(f"{pre['curve_key']}: mean and t 95% band", fontsize=9)
        ax.legend(fontsize=8)
        files.append(_save(fig, out / "pretraining.png", tight=False))
    return files


def curves_figure(r: dict):
    """A panel per arm of each condition's mean fine-tuning curve and 95% band, one y scale; (figure, axes) or None."""
    panels = [p for p in r["efficiency"]["panels"] if p["kinds"]]
    if not panels:
        return None
    spare = cycle(SPARE_COLOURS)  # plain kinds keep their colour, other conditions take the next spare one
    conds = sorted({c for p in panels for c in p["kinds"]}, key=condition_order)
    colour = {c: KIND_COLOURS.get(c) or next(spare) for c in conds}
    cols, rows = min(3, len(panels)), math.ceil(len(panels) / 3)
    height = 3.4 * rows + 0.4
    fig, axes = _figure(4.6 * cols, height, 100, nrows=rows, ncols=cols, squeeze=False, sharey=True)
    axes = axes.ravel()
    # room for the two-line title above the panels
    fig.subplots_adjust(left=0.08, right=0.98, bottom=0.14, top=1 - 0.8 / height, wspace=0.25, hspace=0.45)
    for ax, panel in zip(axes, panels):
        last = max(c["steps"][-1] for c in panel["kinds"].values())
        for cond, c in panel["kinds"].items():
            if len(c["steps"]) == 1:  # nothing fine-tuned: the value holds over the panel's steps
                c, style = {**c, "steps": [0, last], **{k: 2 * c[k] for k in ("mean", "lo", "hi") if c[k]}}, "--"
            else:
                style = ":" if "shuffled" in cond else "-." if cond != kind_of(cond) else "-"
            _band(ax, c, colour[cond], f"{cond} (n={c['n']})", ls=style, marker="o" if len(c["steps"]) < 30 else None)
        ax.set_title(panel["arm"] if len(panel["arm"]) < 60 else panel["arm"][:57] + "...", fontsize=9)
        ax.set_xlabel("fine-tuning step")
        ax.legend(fontsize=7)
        ax.yaxis.set_tick_params(labelleft=True)
    for ax in axes[::cols]:
        ax.set_ylabel(r["metric"])
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    fig.suptitle(f"{r['efficiency']['curve_key']} over fine-tuning\n(step 0: the pretrained model; mean and t 95% "
                 f"interval)", fontsize=9)
    return fig, list(axes[:len(panels)])
