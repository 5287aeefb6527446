"""How well a layout -> image model puts the requested shapes in the requested boxes.

    python experiments/layouts.py --n 500 --cfg 1 2 4

Held-out ShapeLayouts scenes (a seed training never saw): one sample per layout at each CFG scale (dpmpp_2m,
20 steps, seed 0), segmented with the segmenter that reads the real scenes exactly (the real-image baseline).
A requested box is a hit when a shape of its class (type and colour; or only its colour) has a bounding box of
IoU >= 0.5 with it. Reports the hit rates with 95% bootstrap intervals over layouts, against the real scenes and
against the same samples scored with another scene's layout (chance), and writes a grid per scale to --out.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from diffusekit.data import COLOURS, LAYOUT_CLASSES, ShapeLayouts
from diffusekit.evaluation import bootstrap, layout_hits, segment_shapes
from diffusekit.images import save_grid
from diffusekit.pipelines import generate
from diffusekit.requests import load_model

HELD_OUT = 1_000_003  # ShapeLayouts seed of the evaluation layouts (training draws seed 0)


def score(images: torch.Tensor, layouts: torch.Tensor, rounds: int) -> str:
    """'hits (CI) | colour hits (CI)', bootstrapped over layouts (each layout's boxes stay together)."""
    per_layout = (layouts[:, :, 0] >= 0).sum(1)
    owner = torch.repeat_interleave(torch.arange(len(layouts)), per_layout)
    cells = []
    for hits in layout_hits(segment_shapes(images), layouts):
        counts = torch.zeros(len(layouts)).index_add_(0, owner, hits.float())

        def rate(i: torch.Tensor) -> float:
            return (counts[i].sum() / per_layout[i].sum()).item()

        lo, hi = bootstrap(rate, len(layouts), rounds)
        cells.append(f"{hits.float().mean():.1%} ({lo:.1%}-{hi:.1%})")
    return " | ".join(cells)


def draw_layouts(layouts: torch.Tensor, size: int) -> torch.Tensor:
    """Each layout's boxes outlined in their shapes' colours on white [N, 3, size, size] in [-1, 1]."""
    out = []
    for layout in layouts:
        img = Image.new("RGB", (size, size), "white")
        draw = ImageDraw.Draw(img)
        for cls, x0, y0, x1, y1 in layout[layout[:, 0] >= 0].tolist():
            colour = COLOURS[LAYOUT_CLASSES[int(cls)].split()[0]]
            draw.rectangle((x0 * size, y0 * size, x1 * size - 1, y1 * size - 1), outline=colour)
        out.append(torch.from_numpy(np.asarray(img, dtype=np.float32).copy()).permute(2, 0, 1) / 127.5 - 1)
    return torch.stack(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="shape_layouts")
    p.add_argument("--n", type=int, default=1000, help="held-out layouts")
    p.add_argument("--cfg", type=float, nargs="+", default=[1.0, 2.0, 4.0])
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--rounds", type=int, default=200, help="bootstrap resamples")
    p.add_argument("--out", default="docs/layouts")
    a = p.parse_args()
    pipe, dtype = load_model(a.model)
    data = ShapeLayouts(pipe.resolution[0], a.n, HELD_OUT, max_boxes=pipe.net.config.layout_boxes)
    scenes = [data[i] for i in range(a.n)]
    real, layouts = torch.stack([s["image"] for s in scenes]), torch.stack([s["layout"] for s in scenes])
    print(f"| images ({a.n} held-out layouts, {int((layouts[:, :, 0] >= 0).sum())} boxes; dpmpp_2m 20 steps, {dtype}) "
          f"| boxes hit: class (95% CI) | boxes hit: colour (95% CI) | s / image |\n| --- | --- | --- | --- |")
    print(f"| real scenes (the segmenter's baseline) | {score(real, layouts, a.rounds)} | - |")
    for w in a.cfg:
        g, t0 = torch.Generator().manual_seed(0), time.perf_counter()
        images = torch.cat([generate(pipe, len(lay), layout=lay, cfg=w, sampler="dpmpp_2m", steps=20, generator=g)
                            for lay in layouts.split(a.batch)])
        seconds = (time.perf_counter() - t0) / a.n
        print(f"| samples, CFG {w:g} | {score(images, layouts, a.rounds)} | {seconds:.3f} |", flush=True)
        if w == a.cfg[-1]:
            print(f"| samples, CFG {w:g}, scored against another scene's layout (chance) "
                  f"| {score(images, layouts.roll(1, 0), a.rounds)} | - |")
        save_grid(torch.cat([draw_layouts(layouts[:8], real.shape[-1]), real[:8], images[:8]]),
                  Path(a.out) / f"cfg_{w:g}.png", nrow=min(8, a.n), row_labels=["layout", "real", f"CFG {w:g}"],
                  scale=4)


if __name__ == "__main__":
    main()
