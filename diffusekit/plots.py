"""Minimal PNG plots drawn with Pillow (no plotting library needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from PIL import Image, ImageDraw

COLORS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189), (140, 86, 75)]


def scatter_png(path: str | Path, series: Sequence[tuple[str, torch.Tensor]], size: int = 512, title: str = "") -> Path:
    """Scatter 2-D point sets [N, 2], each in its own colour with a legend; returns the path."""
    pts = torch.cat([p for _, p in series]).double()
    lo, hi = pts.min(0).values, pts.max(0).values
    span = (hi - lo).max().clamp(min=1e-9) * 1.1
    centre = (lo + hi) / 2
    img = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(img)
    for k, (name, p) in enumerate(series):
        colour = COLORS[k % len(COLORS)]
        uv = ((p.double() - centre) / span + 0.5) * size
        for u, v in uv.tolist():
            draw.point((u, size - v), fill=colour)
        draw.text((8, 8 + 14 * k), name, fill=colour)
    if title:
        draw.text((8, size - 18), title, fill="black")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def line_png(path: str | Path, x: Sequence[float], series: Sequence[tuple[str, Sequence[float]]], size: tuple[int, int] = (640, 360),
             title: str = "", log_y: bool = False) -> Path:
    """Line plot of one or more series over x (e.g. a loss curve); returns the path."""
    W, H, m = size[0], size[1], 40
    ys = torch.tensor([v for _, s in series for v in s], dtype=torch.float64)
    ys = ys.log10() if log_y else ys
    lo, hi = ys.min().item(), ys.max().item()
    x0, x1 = min(x), max(x)
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    draw.rectangle((m, m // 2, W - m // 2, H - m), outline="black")

    def to_px(xv: float, yv: float) -> tuple[float, float]:
        yv = torch.tensor(yv).log10().item() if log_y else yv
        u = m + (xv - x0) / max(x1 - x0, 1e-12) * (W - 1.5 * m)
        return u, H - m - (yv - lo) / max(hi - lo, 1e-12) * (H - 1.5 * m)

    for k, (name, s) in enumerate(series):
        colour = COLORS[k % len(COLORS)]
        draw.line([to_px(a, b) for a, b in zip(x, s)], fill=colour, width=2)
        draw.text((m + 6, m // 2 + 4 + 12 * k), name, fill=colour)
    fmt = (lambda v: f"1e{v:.1f}") if log_y else (lambda v: f"{v:.3g}")
    draw.text((2, m // 2), fmt(hi), fill="black")
    draw.text((2, H - m - 10), fmt(lo), fill="black")
    draw.text((m, H - m + 4), f"{x0:g}", fill="black")
    draw.text((W - m - 20, H - m + 4), f"{x1:g}", fill="black")
    if title:
        draw.text((W // 2 - 3 * len(title), H - 16), title, fill="black")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def points_png(path: str | Path, points: Sequence[tuple[str, float, float, tuple[float, float]]],
               size: tuple[int, int] = (720, 440), x_label: str = "", y_label: str = "") -> Path:
    """Labelled points (name, x, y, (y_lo, y_hi)) with vertical interval bars, e.g. quality against cost."""
    W, H, m = size[0], size[1], 48
    xs = [p[1] for p in points]
    ys = [v for p in points for v in (p[2], *p[3])]
    x0, x1, y0, y1 = min(0.0, *xs), max(xs) * 1.2, min(0.0, *ys), max(ys) * 1.05  # room for the labels
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    draw.rectangle((m, m // 2, W - m // 2, H - m), outline="black")

    def to_px(xv: float, yv: float) -> tuple[float, float]:
        return (m + (xv - x0) / max(x1 - x0, 1e-12) * (W - 1.5 * m),
                H - m - (yv - y0) / max(y1 - y0, 1e-12) * (H - 1.5 * m))

    for k, (name, xv, yv, (lo, hi)) in enumerate(points):
        colour = COLORS[k % len(COLORS)]
        (u, v), (_, v_lo), (_, v_hi) = to_px(xv, yv), to_px(xv, lo), to_px(xv, hi)
        draw.line([(u, v_lo), (u, v_hi)], fill=colour, width=1)
        draw.ellipse((u - 3, v - 3, u + 3, v + 3), fill=colour)
        draw.text((u + 5, v - 6), name, fill=colour)
    draw.text((2, m // 2), f"{y1:.3g}", fill="black")
    draw.text((2, H - m - 10), f"{y0:.3g}", fill="black")
    draw.text((m, H - m + 4), f"{x0:g}", fill="black")
    draw.text((W - m - 30, H - m + 4), f"{x1:.3g}", fill="black")
    draw.text((W // 2 - 3 * len(x_label), H - 16), x_label, fill="black")
    draw.text((m + 4, m // 2 + 4), y_label, fill="black")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path
