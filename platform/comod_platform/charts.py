"""SVG charts written straight from the numbers: line charts and heatmaps.

A trial's plots are drawn at its end, between its last epoch and the next
trial, so they must cost next to nothing: matplotlib's Agg renderer takes
about 50 ms a figure here (laying out ticks and text, rasterising), which
is most of what a short trial slot waits between two trials. An SVG chart is
text: the browser (the MLflow UI's artifact view shows SVG) lays out the
labels and draws the shapes. matplotlib still provides what it does well:
tick positions (``MaxNLocator``) and the colour map.
"""
from __future__ import annotations

import base64
import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence
from xml.sax.saxutils import escape

FONT = 'font-family="DejaVu Sans, Arial, sans-serif"'
COLOURS = {"tab:blue": "#1f77b4", "tab:orange": "#ff7f0e", "tab:green": "#2ca02c", "tab:red": "#d62728"}


@dataclass
class Series:
    label: str
    colour: str
    xs: Sequence[float]
    ys: Sequence[float]


@dataclass
class Panel:
    title: str
    xlabel: str
    ylabel: str
    series: list[Series] = field(default_factory=list)


def _ticks(lo: float, hi: float, bins: int = 5) -> list[float]:
    from matplotlib.ticker import MaxNLocator

    if not (math.isfinite(lo) and math.isfinite(hi)):
        return []
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    return [t for t in MaxNLocator(nbins=bins).tick_values(lo, hi) if lo - 1e-12 <= t <= hi + 1e-12]


def _label(value: float) -> str:
    return f"{value:.4g}"


def _limits(values: list[float]) -> tuple[float, float]:
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return 0.0, 1.0
    lo, hi = min(finite), max(finite)
    pad = (hi - lo) * 0.05 or (abs(hi) * 0.05 or 0.5)
    return lo - pad, hi + pad


def _text(x: float, y: float, text: str, size: int = 11, anchor: str = "middle", extra: str = "") -> str:
    return (f'<text x="{x:.1f}" y="{y:.1f}" font-size="{size}" text-anchor="{anchor}" {FONT} {extra}>'
            f"{escape(text)}</text>")


def _panel(panel: Panel, left: float, top: float, width: float, height: float) -> list[str]:
    xs = [float(x) for s in panel.series for x in s.xs]
    ys = [float(y) for s in panel.series for y in s.ys]
    (x0, x1), (y0, y1) = _limits(xs), _limits(ys)

    def px(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * width

    def py(y: float) -> float:
        return top + height - (y - y0) / (y1 - y0) * height

    out = [f'<rect x="{left:.1f}" y="{top:.1f}" width="{width:.1f}" height="{height:.1f}" fill="white" '
           f'stroke="black" stroke-width="0.8"/>']
    for t in _ticks(x0, x1):
        out.append(f'<line x1="{px(t):.1f}" y1="{top + height:.1f}" x2="{px(t):.1f}" y2="{top + height + 4:.1f}" '
                   f'stroke="black" stroke-width="0.8"/>')
        out.append(_text(px(t), top + height + 16, _label(t), 10))
    for t in _ticks(y0, y1):
        out.append(f'<line x1="{left - 4:.1f}" y1="{py(t):.1f}" x2="{left:.1f}" y2="{py(t):.1f}" '
                   f'stroke="black" stroke-width="0.8"/>')
        out.append(_text(left - 6, py(t) + 3.5, _label(t), 10, "end"))
    for s in panel.series:
        colour = COLOURS.get(s.colour, s.colour)
        points = [(px(float(x)), py(float(y))) for x, y in zip(s.xs, s.ys) if math.isfinite(float(y))]
        if len(points) > 1:
            path = " ".join(f"{x:.1f},{y:.1f}" for x, y in points)
            out.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="1.5"/>')
        out += [f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3" fill="{colour}"/>' for x, y in points]
    for i, s in enumerate(panel.series):  # legend, top right inside the axes
        y = top + 14 + 15 * i
        colour = COLOURS.get(s.colour, s.colour)
        out.append(f'<line x1="{left + width - 92:.1f}" y1="{y - 4:.1f}" x2="{left + width - 72:.1f}" '
                   f'y2="{y - 4:.1f}" stroke="{colour}" stroke-width="1.5"/>')
        out.append(_text(left + width - 68, y, s.label, 10, "start"))
    out.append(_text(left + width / 2, top - 8, panel.title, 12))
    out.append(_text(left + width / 2, top + height + 32, panel.xlabel, 11))
    out.append(_text(left - 44, top + height / 2, panel.ylabel, 11,
                     extra=f'transform="rotate(-90 {left - 44:.1f} {top + height / 2:.1f})"'))
    return out


def _svg(width: float, height: float, body: list[str]) -> str:
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height:.0f}" '
            f'viewBox="0 0 {width:.0f} {height:.0f}">\n<rect width="100%" height="100%" fill="white"/>\n'
            + "\n".join(body) + "\n</svg>\n")


def line_charts(panels: list[Panel], path: Path, panel_width: float = 380, panel_height: float = 220) -> Path:
    """``panels`` side by side, each with its own axes, written to ``path`` (SVG)."""
    left, gap, top = 70.0, 80.0, 36.0
    body: list[str] = []
    for i, panel in enumerate(panels):
        body += _panel(panel, left + i * (panel_width + gap), top, panel_width, panel_height)
    width = left + len(panels) * panel_width + (len(panels) - 1) * gap + 20
    Path(path).write_text(_svg(width, top + panel_height + 46, body))
    return Path(path)


def _hex(rgba) -> str:
    return "#" + "".join(f"{round(255 * c):02x}" for c in rgba[:3])


def heatmap(matrix, title: str, xlabel: str, ylabel: str, path: Path, row_names: Sequence[str] = ()) -> Path:
    """A matrix (rows x columns, numbers) as coloured cells (viridis) with a colour bar, written to ``path``."""
    import numpy as np
    from matplotlib import colormaps
    from PIL import Image

    values = np.asarray(matrix, dtype=float)
    if values.ndim == 1:
        values = values[None, :]
    rows, cols = values.shape
    finite = values[np.isfinite(values)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    span = hi - lo or 1.0
    cmap = colormaps["viridis"]
    names = list(row_names) if len(row_names) == rows and rows <= 40 else []
    left = 20.0 + (7.0 * max((len(n) for n in names), default=3)) + 40
    top, width = 34.0, 620.0
    cell_h = max(6.0, min(24.0, 400.0 / rows))
    height = cell_h * rows
    cell_w = width / cols
    # the cells as one image, one pixel per cell, scaled up without smoothing (small and fast to write)
    pixels = (cmap(np.nan_to_num((values - lo) / span, nan=0.0)) * 255).round().astype("uint8")
    pixels[~np.isfinite(values)] = 255
    buffer = io.BytesIO()
    Image.fromarray(pixels, "RGBA").save(buffer, format="PNG")
    cells = base64.b64encode(buffer.getvalue()).decode()
    body = [f'<image x="{left:.1f}" y="{top:.1f}" width="{width:.1f}" height="{height:.1f}" '
            f'preserveAspectRatio="none" style="image-rendering:pixelated" href="data:image/png;base64,{cells}"/>']
    body += [_text(left - 6, top + (r + 0.5) * cell_h + 3, name, 8, "end") for r, name in enumerate(names)]
    body.append(f'<rect x="{left:.1f}" y="{top:.1f}" width="{width:.1f}" height="{height:.1f}" fill="none" '
                f'stroke="black" stroke-width="0.8"/>')
    for t in _ticks(-0.5, cols - 0.5, 8):
        if float(t).is_integer():
            x = left + (t + 0.5) * cell_w
            body.append(_text(x, top + height + 14, str(int(t)), 10))
    body.append(_text(left + width / 2, top - 10, title, 12))
    body.append(_text(left + width / 2, top + height + 30, xlabel, 11))
    if not names:
        body.append(_text(left - 10, top + height / 2, ylabel, 11, "end"))
    bar = left + width + 24  # the colour bar: a vertical gradient with its value ticks
    stops = "".join(f'<stop offset="{i / 10:.1f}" stop-color="{_hex(cmap(1 - i / 10))}"/>' for i in range(11))
    body.append(f'<defs><linearGradient id="cbar" x1="0" y1="0" x2="0" y2="1">{stops}</linearGradient></defs>')
    body.append(f'<rect x="{bar:.1f}" y="{top:.1f}" width="14" height="{height:.1f}" fill="url(#cbar)" '
                f'stroke="black" stroke-width="0.5"/>')
    for t in _ticks(lo, hi, 4) if hi > lo else [lo]:
        y = top + height - (t - lo) / span * height
        body.append(_text(bar + 18, y + 3.5, _label(t), 9, "start"))
    Path(path).write_text(_svg(bar + 70, top + height + 44, body))
    return Path(path)
