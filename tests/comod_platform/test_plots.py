"""A run's plots: SVG charts written from its checkpoint, checked for what they show."""
from __future__ import annotations

import base64
import io
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch
from PIL import Image

from comod.checkpoint import CHECKPOINT
from comod.config import load_config
from comod.model import task_gains
from comod.train import load_checkpoint, run_experiment
from comod_platform.charts import Panel, Series, heatmap, line_charts
from comod_platform.plots import plot_run

REPO = Path(__file__).resolve().parents[2]
SVG = "{http://www.w3.org/2000/svg}"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    # pretrained with its readout and kept: the selected model (epoch 0 when fine-tuning does not beat it)
    # holds a learned readout gain, not the ones a restart leaves
    overrides = ["pretrain.modulation_kind=same", "finetune.readout_reset=false"]
    run_experiment(load_config(REPO / "configs" / "tiny.yaml", overrides), out)
    return out


def _cells(svg: ET.Element) -> Image.Image:
    (image,) = svg.iter(f"{SVG}image")
    data = image.get("href").removeprefix("data:image/png;base64,")
    return Image.open(io.BytesIO(base64.b64decode(data)))


def test_a_stochastic_run_plots_its_curves_couplings_and_readout_gains(run_dir):
    written = plot_run(run_dir)
    assert sorted(p.name for p in written) == ["couplings_layer3.svg", "learning_curves.svg", "readout_gains.svg"]
    ckpt = load_checkpoint(run_dir / CHECKPOINT)
    gains = task_gains(ckpt["model"], coupling=ckpt["config"]["modulation"]["coupling"])
    names = list(ckpt["task_names"])

    curves = ET.parse(run_dir / "plots" / "learning_curves.svg").getroot()
    texts = [t.text for t in curves.iter(f"{SVG}text")]
    assert {"loss", "validation F1", "pretrain", "finetune", "training loss"} <= set(texts)
    # one marker per epoch and panel: 2 pretraining + 2 fine-tuning epochs, in the loss and the F1 panel
    assert len(list(curves.iter(f"{SVG}circle"))) == 2 * 4

    for name, matrix in (("couplings_layer3.svg", gains.couplings["layer3"]), ("readout_gains.svg", gains.readout)):
        svg = ET.parse(run_dir / "plots" / name).getroot()
        cells = _cells(svg)
        assert cells.size == (matrix.shape[1], matrix.shape[0])  # one pixel per task and channel (or unit)
        shown = [t.text for t in svg.iter(f"{SVG}text")]
        assert names[0] in shown and names[-1] in shown
        # the brightest cell is the largest value: viridis' yellow end
        flat = int(torch.argmax(matrix))
        r, g, b, _ = cells.getpixel((flat % matrix.shape[1], flat // matrix.shape[1]))
        assert r > 200 and g > 200 and b < 80


def test_charts_ticks_span_the_data_and_skip_missing_values(tmp_path):
    path = line_charts([Panel("p", "step", "value", [Series("a", "tab:blue", [0, 10, 20], [0.2, float("nan"), 0.8])])],
                       tmp_path / "c.svg")
    svg = ET.parse(path).getroot()
    (line,) = svg.iter(f"{SVG}polyline")
    assert len(line.get("points").split()) == 2  # the missing value leaves no point
    labels = [float(t.text) for t in svg.iter(f"{SVG}text") if re.fullmatch(r"-?[\d.]+(e-?\d+)?", t.text or "")]
    assert min(labels) <= 0.2 and max(labels) >= 0.8 and max(labels) >= 20
    flat = heatmap(torch.full((2, 3), 0.5).numpy(), "t", "x", "y", tmp_path / "h.svg")
    assert _cells(ET.parse(flat).getroot()).size == (3, 2)  # a constant matrix still draws


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
