"""How well a layout -> image model puts the requested shapes in the requested boxes, and how well a text model
of the same scenes does from captions that say what words can of the same layouts.

    python experiments/layouts.py --n 500 --cfg 1 2 4 --text-model runs/shape_captions/model

Held-out ShapeLayouts scenes (a seed training never saw): one sample per layout at each CFG scale (dpmpp_2m,
20 steps, seed 0), segmented with the segmenter that reads the real scenes exactly (the real-image baseline).
A requested box is a hit when a shape of its class (type and colour; or only its colour) has a bounding box of
IoU >= 0.5 with it; a place hit when a shape of its class is centred in the 3 x 3 grid cell of the box's centre
(all a caption says; evaluation.layout_hits). Reports the hit rates with 95% bootstrap intervals over layouts,
against the real scenes, against the same samples scored with another scene's layout (chance) and, at the
largest scale, by the number of shapes in the scene; writes a grid per model and scale to --out. With
--text-model, the same layouts' captions (data.ShapeCaptions) go to that model and are scored the same way.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image, ImageDraw

from diffusekit.data import COLOURS, LAYOUT_CLASSES, ShapeCaptions
from diffusekit.evaluation import bootstrap, layout_hits, segment_shapes
from diffusekit.images import save_grid
from diffusekit.pipelines import Pipeline, generate
from diffusekit.requests import load_model

HELD_OUT = 1_000_003  # ShapeLayouts seed of the evaluation layouts (training draws seed 0)


def score(images: torch.Tensor, layouts: torch.Tensor, rounds: int) -> str:
    """'hits (CI) | colour hits (CI) | place hits (CI)', bootstrapped over layouts (each layout's boxes stay together)."""
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


def sweep(pipe: Pipeline, name: str, condition: Callable[[slice], dict[str, Any]], layouts: torch.Tensor,
          real: torch.Tensor, a: argparse.Namespace) -> None:
    """One table row per CFG scale of `pipe`, conditioned on the layouts of a slice by `condition(slice)`
    (generate's layout= or prompts=)."""
    for w in a.cfg:
        g, t0 = torch.Generator().manual_seed(0), time.perf_counter()
        images = torch.cat([generate(pipe, len(layouts[k:k + a.batch]), **condition(slice(k, k + a.batch)), cfg=w,
                                     sampler="dpmpp_2m", steps=20, generator=g) for k in range(0, a.n, a.batch)])
        seconds = (time.perf_counter() - t0) / a.n
        print(f"| {name}, CFG {w:g} | {score(images, layouts, a.rounds)} | {seconds:.3f} |", flush=True)
        if w == a.cfg[-1]:
            print(f"| {name}, CFG {w:g}, scored against another scene's layout (chance) "
                  f"| {score(images, layouts.roll(1, 0), a.rounds)} | - |")
            count = (layouts[:, :, 0] >= 0).sum(1)
            for k in count.unique().tolist():
                print(f"| {name}, CFG {w:g}, the {int((count == k).sum())} scenes of {k} shape{'s' * (k > 1)} "
                      f"| {score(images[count == k], layouts[count == k], a.rounds)} | - |")
        kind = name.split()[0]
        save_grid(torch.cat([draw_layouts(layouts[:8], real.shape[-1]), real[:8], images[:8]]),
                  Path(a.out) / f"{kind}_cfg_{w:g}.png", nrow=min(8, a.n),
                  row_labels=["layout", "real", f"{kind} CFG {w:g}"], scale=4)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="shape_layouts")
    p.add_argument("--text-model", help="a text model of the same scenes (configs/shape_captions.toml)")
    p.add_argument("--n", type=int, default=1000, help="held-out layouts")
    p.add_argument("--cfg", type=float, nargs="+", default=[1.0, 2.0, 4.0])
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--rounds", type=int, default=200, help="bootstrap resamples")
    p.add_argument("--out", default="docs/layouts")
    a = p.parse_args()
    pipe, dtype = load_model(a.model)
    data = ShapeCaptions(pipe.resolution[0], a.n, HELD_OUT, max_boxes=pipe.net.config.layout_boxes)
    real = torch.stack([data[i]["image"] for i in range(a.n)])
    layouts = torch.stack([data.layout(i) for i in range(a.n)])
    print(f"| images ({a.n} held-out layouts, {int((layouts[:, :, 0] >= 0).sum())} boxes; dpmpp_2m 20 steps, {dtype}) "
          f"| boxes hit: class (95% CI) | boxes hit: colour (95% CI) | places hit: class (95% CI) | s / image |\n"
          f"| --- | --- | --- | --- | --- |")
    print(f"| real scenes (the segmenter's baseline) | {score(real, layouts, a.rounds)} | - |")
    sweep(pipe, "layout model", lambda k: {"layout": layouts[k]}, layouts, real, a)
    if a.text_model:
        captions = [data.caption(i) for i in range(a.n)]
        sweep(load_model(a.text_model)[0], "text model", lambda k: {"prompts": captions[k]}, layouts, real, a)


if __name__ == "__main__":
    main()
