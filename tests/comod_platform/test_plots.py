"""A run's plots: matplotlib figures written as PNG from its checkpoint, checked for what they show."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from comod.checkpoint import CHECKPOINT
from comod.config import load_config
from comod.model import task_gains
from comod.train import load_checkpoint, run_experiment
from comod_platform.plots import CELL, gain_images, heatmap, learning_curves, plot_run

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    # pretrained with its readout and kept: the selected model (epoch 0 when fine-tuning does not beat it)
    # holds a learned readout gain, not the ones a restart leaves
    overrides = ["pretrain.modulation_kind=same", "finetune.readout_reset=false"]
    run_experiment(load_config(REPO / "configs" / "tiny.yaml", overrides), out)
    return out


def _texts(fig) -> set[str]:
    return {t.get_text() for t in fig.findobj(lambda o: hasattr(o, "get_text"))}


def test_a_stochastic_run_plots_its_curves_couplings_and_readout_gains(run_dir):
    written = plot_run(run_dir)
    assert sorted(p.name for p in written) == ["couplings_layer3.png", "learning_curves.png", "readout_gains.png"]
    for path in written:
        assert Image.open(path).format == "PNG" and path.parent == run_dir / "plots"
    ckpt = load_checkpoint(run_dir / CHECKPOINT)
    gains = task_gains(ckpt["model"], coupling=ckpt["config"]["modulation"]["coupling"])
    names = list(ckpt["task_names"])

    curves = learning_curves(ckpt["history"])
    assert {"loss", "validation F1", "pretrain", "finetune", "training loss"} <= _texts(curves)
    # one marker per epoch and panel: 2 pretraining + 2 fine-tuning epochs, in the loss and the F1 panel
    assert sum(len(line.get_xdata()) for ax in curves.axes for line in ax.get_lines()) == 2 * 4

    for matrix in (gains.couplings["layer3"], gains.readout):
        fig = heatmap(matrix.numpy(), "t", "x", "y", names)
        (image,) = fig.axes[0].get_images()
        assert image.get_array().shape == tuple(matrix.shape)  # one cell per task and channel (or unit)
        shown = _texts(fig)
        assert names[0] in shown and names[-1] in shown
        # the brightest cell is the largest value: viridis' yellow end
        flat = int(torch.argmax(matrix))
        r, g, b, _ = image.to_rgba(image.get_array())[flat // matrix.shape[1], flat % matrix.shape[1]]
        assert r > 200 / 255 and g > 200 / 255 and b < 80 / 255


def test_curves_span_the_data_and_skip_missing_values(tmp_path):
    history = [{"phase": "pretrain", "step": s, "pretrain/train_loss": 1.0, "pretrain/val/mean_f1": f1}
               for s, f1 in ((0, 0.2), (10, float("nan")), (20, 0.8))]
    fig = learning_curves(history)
    (line,) = fig.axes[1].get_lines()
    assert len(line.get_xdata()) == 2  # the missing value leaves no point
    (x0, x1), (y0, y1) = fig.axes[1].get_xlim(), fig.axes[1].get_ylim()
    assert x0 <= 0 and x1 >= 20 and y0 <= 0.2 and y1 >= 0.8
    flat = heatmap(np.full((2, 3), 0.5), "t", "x", "y")
    assert flat.axes[0].get_images()[0].get_array().shape == (2, 3)  # a constant matrix still draws
    flat.savefig(tmp_path / "h.png")
    assert Image.open(tmp_path / "h.png").format == "PNG"


def test_plots_from_the_checkpoint_in_memory_are_the_plots_from_disk(run_dir, tmp_path):
    """A trial passes its final checkpoint as it holds it (no second ``torch.load``): the same files."""
    from_disk = {p.name: p.read_bytes() for p in plot_run(run_dir, tmp_path / "disk")}
    held = load_checkpoint(run_dir / CHECKPOINT)
    (run_dir / CHECKPOINT).rename(run_dir / "moved.pt")  # nothing can be read from the folder now
    try:
        from_memory = {p.name: p.read_bytes() for p in plot_run(run_dir, tmp_path / "memory", checkpoint=held)}
    finally:
        (run_dir / "moved.pt").rename(run_dir / CHECKPOINT)
    assert from_memory == from_disk and len(from_memory) == 3


def test_a_search_trial_writes_its_gains_as_bare_images(run_dir, tmp_path):
    """A trial's plots: one image per gain matrix, a CELL x CELL square per task and channel (or unit),
    the largest value yellow; from the checkpoint in memory as from disk."""
    written = gain_images(run_dir, tmp_path / "trial")
    assert sorted(p.name for p in written) == ["couplings_layer3.png", "readout_gains.png"]
    ckpt = load_checkpoint(run_dir / CHECKPOINT)
    gains = task_gains(ckpt["model"], coupling=ckpt["config"]["modulation"]["coupling"])
    for path, matrix in zip(sorted(written), (gains.couplings["layer3"], gains.readout)):
        image = np.asarray(Image.open(path).convert("RGB"))
        assert image.shape[:2] == (matrix.shape[0] * CELL, matrix.shape[1] * CELL)
        flat = int(torch.argmax(matrix))
        r, g, b = image[(flat // matrix.shape[1]) * CELL, (flat % matrix.shape[1]) * CELL]
        assert r > 200 and g > 200 and b < 80
    again = gain_images(run_dir, tmp_path / "memory", checkpoint=ckpt)
    assert [p.read_bytes() for p in sorted(again)] == [p.read_bytes() for p in sorted(written)]
    assert gain_images(tmp_path / "no-run") == []
