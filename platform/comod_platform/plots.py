"""Plots of one run, drawn from its checkpoint: learning curves, the couplings
per site and the readout gains per task (what the mechanism learned)."""
from __future__ import annotations

from pathlib import Path

from comod.checkpoint import CHECKPOINT, Checkpoint
from comod.model import task_gains
from comod.train import load_checkpoint
from comod_platform.charts import Panel, Series, heatmap, line_charts


def _learning_curves(history: list[dict], path: Path) -> Path | None:
    epochs = [h for h in history if h.get("phase") in ("pretrain", "finetune")]
    if not epochs:
        return None
    loss = Panel("loss", "step", "training loss")
    f1 = Panel("validation F1", "step", "validation mean F1")
    for phase, colour in (("pretrain", "tab:blue"), ("finetune", "tab:orange")):
        rows = [h for h in epochs if h["phase"] == phase]
        if not rows:
            continue
        steps = [h["step"] for h in rows]
        loss.series.append(Series(phase, colour, steps, [h[f"{phase}/train_loss"] for h in rows]))
        f1.series.append(Series(phase, colour, steps, [h.get(f"{phase}/val/mean_f1", float("nan")) for h in rows]))
    return line_charts([loss, f1], path)


def plot_run(run_dir: str | Path, out_dir: str | Path | None = None, checkpoint: Checkpoint | None = None
             ) -> list[Path]:
    """Write the run's plots (SVG, :mod:`charts`) next to its checkpoint (or into ``out_dir``); returns their
    paths. ``checkpoint`` is the run's last checkpoint when the caller holds it (a trial, which writes
    the plots at its end, between its last epoch and the next trial: about 2 ms); else it is read from
    the run's folder (about 20 ms here, most of it ``torch.load``)."""
    run_dir = Path(run_dir)
    ckpt_path = run_dir / CHECKPOINT
    if checkpoint is None and not ckpt_path.exists():
        return []
    out = Path(out_dir or run_dir / "plots")
    out.mkdir(parents=True, exist_ok=True)
    ckpt = checkpoint if checkpoint is not None else load_checkpoint(ckpt_path)
    written = [_learning_curves(ckpt["history"], out / "learning_curves.svg")]
    task_names = list(ckpt.get("task_names", []))
    gains = task_gains(ckpt["model"], coupling=ckpt["config"]["modulation"]["coupling"])
    for site, couplings in gains.couplings.items():
        written.append(heatmap(couplings.float().numpy(), f"couplings at {site}", "channel", "task",
                               out / f"couplings_{site}.svg", task_names))
    if gains.readout is not None:
        written.append(heatmap(gains.readout.float().numpy(), "readout gain per task", "decoder unit", "task",
                               out / "readout_gains.svg", task_names))
    return [p for p in written if p is not None]
