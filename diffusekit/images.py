"""Image tensors <-> PIL images and labelled PNG grids."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import Tensor


def to_uint8(x: Tensor) -> np.ndarray:
    """[N, C, H, W] in [-1, 1] -> uint8 [N, H, W, C]."""
    return ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()


def to_pil(x: Tensor) -> list[Image.Image]:
    """[N, C, H, W] in [-1, 1] -> PIL images (L for 1 channel, RGB for 3)."""
    arr = to_uint8(x)
    return [Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a) for a in arr]


def from_pil(images: Sequence[Image.Image], channels: int = 3) -> Tensor:
    """PIL images of one size -> [N, C, H, W] in [-1, 1]."""
    mode = "L" if channels == 1 else "RGB"
    arr = np.stack([np.asarray(im.convert(mode), dtype=np.uint8) for im in images])
    x = torch.from_numpy(arr).float().div(127.5).sub(1)
    return x[:, None] if channels == 1 else x.permute(0, 3, 1, 2)


def save_grid(x: Tensor, path: str | Path, nrow: int, row_labels: Sequence[str] | None = None,
              scale: int = 1, pad: int = 2) -> Path:
    """Write images [N, C, H, W] in [-1, 1] as a PNG grid of rows of `nrow`, optionally labelled on the left."""
    tiles = [im.convert("RGB") for im in to_pil(x)]
    if scale != 1:
        tiles = [im.resize((im.width * scale, im.height * scale), Image.Resampling.NEAREST) for im in tiles]
    w, h = tiles[0].size
    rows = (len(tiles) + nrow - 1) // nrow
    margin = 8 + 7 * max((len(s) for s in row_labels), default=0) if row_labels else 0
    grid = Image.new("RGB", (margin + nrow * (w + pad) + pad, rows * (h + pad) + pad), "white")
    draw = ImageDraw.Draw(grid)
    for i, tile in enumerate(tiles):
        r, c = divmod(i, nrow)
        grid.paste(tile, (margin + pad + c * (w + pad), pad + r * (h + pad)))
    for r, label in enumerate(row_labels or []):
        draw.text((4, pad + r * (h + pad) + h // 2 - 5), label, fill="black")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path
