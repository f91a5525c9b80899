"""Plots of one run, drawn from its checkpoint with matplotlib (PNG): learning curves, the couplings
per site and the readout gains per task (what the mechanism learned). A search trial writes only the
gain matrices, as bare images (:func:`gain_images`); its curves are MLflow's charts of its metrics."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from comod.checkpoint import CHECKPOINT, Checkpoint
from comod.model import task_gains
from comod.train import load_checkpoint

PHASES = {"pretrain": "tab:blue", "finetune": "tab:orange"}
CELL = 6
"""Pixels per side of one task-and-channel cell in :func:`gain_images`."""


def learning_curves(history: list[dict]):
    """Training loss and validation F1 over steps, a line per phase (missing values left out); a figure,
    or None without an epoch."""
    from matplotlib.figure import Figure  # no pyplot: no global backend

    epochs = [h for h in history if h.get("phase") in PHASES]
    if not epochs:
        return None
    fig = Figure(figsize=(9.5, 3.4), dpi=100)
    loss, f1 = fig.subplots(1, 2)
    for phase, colour in PHASES.items():
        for ax, key in ((loss, f"{phase}/train_loss"), (f1, f"{phase}/val/mean_f1")):
            points = [(h["step"], h[key]) for h in epochs
                      if h["phase"] == phase and math.isfinite(h.get(key, math.nan))]
            if points:
                ax.plot(*zip(*points), marker="o", ms=4, color=colour, label=phase)
    for ax, title, ylabel in ((loss, "loss", "training loss"), (f1, "validation F1", "validation mean F1")):
        ax.set(title=title, xlabel="step", ylabel=ylabel)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def heatmap(matrix, title: str, xlabel: str, ylabel: str, row_names=()):
    """A matrix (rows x columns) as coloured cells (viridis) with a colour bar; a figure."""
    from matplotlib.figure import Figure

    values = np.atleast_2d(np.asarray(matrix, dtype=float))
    rows = values.shape[0]
    fig = Figure(figsize=(8.0, 1.2 + min(4.0, 0.25 * rows)), dpi=100)
    ax = fig.subplots()
    fig.colorbar(ax.imshow(values, aspect="auto", cmap="viridis", interpolation="nearest"), ax=ax)
    ax.set(title=title, xlabel=xlabel)
    if len(row_names) == rows <= 40:  # more rows than that: no row names
        ax.set_yticks(range(rows), list(row_names), fontsize=7)
    else:
        ax.set_ylabel(ylabel)
    fig.tight_layout()
    return fig


def _matrices(run_dir: Path, checkpoint: Checkpoint | None):
    """The run's checkpoint (``checkpoint``, else the one in its folder; None without one) and its gain
    matrices by plot name, each with its title and column name."""
    if checkpoint is None and not (run_dir / CHECKPOINT).exists():
        return None, {}
    ckpt = checkpoint if checkpoint is not None else load_checkpoint(run_dir / CHECKPOINT)
    gains = task_gains(ckpt["model"], coupling=ckpt["config"]["modulation"]["coupling"])
    matrices = {f"couplings_{site}": (c.numpy(), f"couplings at {site}", "channel")
                for site, c in gains.couplings.items()}
    if gains.readout is not None:
        matrices["readout_gains"] = (gains.readout.numpy(), "readout gain per task", "decoder unit")
    return ckpt, matrices


def plot_run(run_dir: str | Path, out_dir: str | Path | None = None, checkpoint: Checkpoint | None = None
             ) -> list[Path]:
    """Write the run's plots into ``out_dir`` (default its ``plots/``) from its checkpoint; their paths."""
    run_dir = Path(run_dir)
    ckpt, matrices = _matrices(run_dir, checkpoint)
    if ckpt is None:
        return []
    out = Path(out_dir or run_dir / "plots")
    out.mkdir(parents=True, exist_ok=True)
    names = list(ckpt.get("task_names", []))
    figures = {"learning_curves": learning_curves(ckpt["history"]), **{
        name: heatmap(matrix, title, xlabel, "task", names) for name, (matrix, title, xlabel) in matrices.items()}}
    figures = {name: fig for name, fig in figures.items() if fig is not None}
    for name, fig in figures.items():
        fig.savefig(out / f"{name}.png")
    return [out / f"{name}.png" for name in figures]


def gain_images(run_dir: str | Path, out_dir: str | Path | None = None, checkpoint: Checkpoint | None = None
                ) -> list[Path]:
    """A search trial's plots: each gain matrix as a bare PNG, a :data:`CELL`-pixel square of viridis per
    task (row) and channel or unit (column), the largest value brightest; far cheaper than a figure with axes."""
    from matplotlib.image import imsave

    run_dir = Path(run_dir)
    matrices = _matrices(run_dir, checkpoint)[1]
    out = Path(out_dir or run_dir / "plots")
    if matrices:
        out.mkdir(parents=True, exist_ok=True)
    for name, (matrix, _, _) in matrices.items():
        imsave(out / f"{name}.png", np.kron(np.atleast_2d(matrix), np.ones((CELL, CELL))), cmap="viridis")
    return [out / f"{name}.png" for name in matrices]
