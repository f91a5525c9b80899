"""Plots of one run, drawn from its checkpoint: learning curves, the couplings
per site and the readout gains per task (what the mechanism learned)."""
from __future__ import annotations

from pathlib import Path

import torch
from matplotlib.figure import Figure

from comod.checkpoint import CHECKPOINT
from comod.model import task_gains
from comod.train import load_checkpoint

# Figures are made without pyplot (no global figure registry, no GUI backend) and laid out with fixed
# margins: matplotlib's tight layout measures every tick label and cost more than the drawing itself,
# on the trial's own CPU, once per trial.
MARGINS = {"left": 0.1, "right": 0.97, "bottom": 0.15, "top": 0.88, "wspace": 0.3}


def _learning_curves(history: list[dict], path: Path) -> Path | None:
    epochs = [h for h in history if h.get("phase") in ("pretrain", "finetune")]
    if not epochs:
        return None
    fig = Figure(figsize=(10, 3.5))
    loss_ax, f1_ax = fig.subplots(1, 2)
    fig.subplots_adjust(**MARGINS)
    for phase, colour in (("pretrain", "tab:blue"), ("finetune", "tab:orange")):
        rows = [h for h in epochs if h["phase"] == phase]
        if not rows:
            continue
        steps = [h["step"] for h in rows]
        loss_ax.plot(steps, [h[f"{phase}/train_loss"] for h in rows], "o-", color=colour, label=phase)
        f1_ax.plot(steps, [h.get(f"{phase}/val/mean_f1", float("nan")) for h in rows], "o-", color=colour,
                   label=phase)
    loss_ax.set(xlabel="step", ylabel="training loss", title="loss")
    f1_ax.set(xlabel="step", ylabel="validation mean F1", title="validation F1")
    loss_ax.legend(), f1_ax.legend()
    fig.savefig(path, dpi=90)
    return path


def _heatmap(matrix: torch.Tensor, title: str, xlabel: str, path: Path, task_names: list[str]) -> Path:
    height = max(2.0, 0.25 * matrix.shape[0] + 1)
    fig = Figure(figsize=(8, height))
    ax = fig.subplots()
    # room in inches for the title, the x label and the task names, whatever the height
    fig.subplots_adjust(left=0.16, right=0.98, bottom=0.55 / height, top=1 - 0.35 / height)
    image = ax.imshow(matrix.numpy(), aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set(title=title, xlabel=xlabel, ylabel="task")
    if len(task_names) == matrix.shape[0] and matrix.shape[0] <= 40:
        ax.set_yticks(range(len(task_names)), task_names, fontsize=7)
    fig.colorbar(image, ax=ax)
    fig.savefig(path, dpi=90)
    return path


def plot_run(run_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Write the run's plots (PNG) next to its checkpoint (or into ``out_dir``); returns their paths."""
    run_dir = Path(run_dir)
    ckpt_path = run_dir / CHECKPOINT
    if not ckpt_path.exists():
        return []
    out = Path(out_dir or run_dir / "plots")
    out.mkdir(parents=True, exist_ok=True)
    ckpt = load_checkpoint(ckpt_path)
    written = [_learning_curves(ckpt["history"], out / "learning_curves.png")]
    task_names = list(ckpt.get("task_names", []))
    gains = task_gains(ckpt["model"], coupling=ckpt["config"]["modulation"]["coupling"])
    for site, couplings in gains.couplings.items():
        written.append(_heatmap(couplings, f"couplings at {site}", "channel", out / f"couplings_{site}.png",
                                task_names))
    if gains.readout is not None:
        written.append(_heatmap(gains.readout, "readout gain per task", "decoder unit", out / "readout_gains.png",
                                task_names))
    return [p for p in written if p is not None]
