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
