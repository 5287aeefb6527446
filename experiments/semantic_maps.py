"""How well a map -> image model follows its map, at the trained size and convolutionally beyond it.

    python experiments/semantic_maps.py --n 100 --ug 0 0.5

Held-out ShapeMaps scenes (a seed training never saw) at the trained 32x32, then on maps 2x and 4x the trained
size two ways: "wider" (2x2 / 4x4 canvases of shapes of the trained size: more of the same scene) and "zoomed"
(one canvas whose shapes are 2x / 4x the trained size). Each setting samples one image per map (dpmpp_2m,
20 steps, seed 0) plainly (the network applied convolutionally) and with Upsample Guidance at each --ug weight
(beyond the trained size), segments the samples with the same segmenter as the real scenes (exact on them:
the real-image baseline), and reports mIoU against the requested map over the 13 classes (shape type x
colour + background) and over colours alone, and the PSNR to the real scene the map was drawn from (a map
fixes its scene but for nothing; real scenes score 100, the clamp), with 95% bootstrap intervals over maps.
Writes the table (docs/semantic_maps.md) to stdout and, per setting, a grid of maps, real scenes and samples to --out.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from diffusekit.data import COLOURS, MAP_CLASSES, ShapeMaps
from diffusekit.evaluation import bootstrap, colour_classes, iou_counts, iou_of_counts, segment_shapes
from diffusekit.images import map_colours, save_grid
from diffusekit.pipelines import generate
from diffusekit.requests import load_model

HELD_OUT = 1_000_003  # ShapeMaps seed of the evaluation maps (training draws seed 0)
SETTINGS = {"trained size": (32, 1), "2x wider": (64, 2), "4x wider": (128, 4), "2x zoomed": (64, 1),
            "4x zoomed": (128, 1)}  # name -> (resolution, tiles)


def score(images: torch.Tensor, maps: torch.Tensor, real: torch.Tensor, rounds: int) -> str:
    """'mIoU (CI) | colour mIoU (CI) | PSNR (CI)' of the images against their maps (segmented), and against the
    real scenes the maps were drawn from (a map fixes its scene but for nothing, so the scene is the target)."""
    pred = segment_shapes(images)
    cells = []
    for counts in (iou_counts(pred, maps, len(MAP_CLASSES)),
                   iou_counts(colour_classes(pred), colour_classes(maps), 1 + len(COLOURS))):
        miou = iou_of_counts(counts.sum(0))[0]
        lo, hi = bootstrap(lambda i: iou_of_counts(counts[i].sum(0))[0], len(maps), rounds)
        cells.append(f"{miou:.3f} ({lo:.3f}-{hi:.3f})")
    mse = ((images - real) / 2).pow(2).flatten(1).mean(1)  # per image, on [0, 1]

    def psnr(i: torch.Tensor) -> float:
        return (-10 * mse[i].mean().clamp(min=1e-10).log10()).item()

    lo, hi = bootstrap(psnr, len(mse), rounds)
    cells.append(f"{psnr(torch.arange(len(mse))):.1f} ({lo:.1f}-{hi:.1f})")
    return " | ".join(cells)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="shape_maps")
    p.add_argument("--n", type=int, default=200, help="maps per setting")
    p.add_argument("--ug", type=float, nargs="*", default=[0.0, 0.5], help="Upsample Guidance weights beyond 32")
    p.add_argument("--settings", nargs="*", default=list(SETTINGS), choices=list(SETTINGS))
    p.add_argument("--batch", type=int, default=50)
    p.add_argument("--rounds", type=int, default=200, help="bootstrap resamples")
    p.add_argument("--out", default="docs/semantic_maps")
    a = p.parse_args()
    pipe, dtype = load_model(a.model)
    print(f"| maps ({a.n} held out, dpmpp_2m 20 steps, {dtype}) | size | sampling | mIoU, 13 classes (95% CI) "
          f"| mIoU, colours (95% CI) | PSNR to the real scene, dB (95% CI) | s / image |\n"
          f"| --- | --- | --- | --- | --- | --- | --- |")
    for name in a.settings:
        resolution, tiles = SETTINGS[name]
        data = ShapeMaps(resolution, a.n, HELD_OUT, tiles)
        scenes = [data[i] for i in range(a.n)]
        real, maps = torch.stack([s["image"] for s in scenes]), torch.stack([s["map"] for s in scenes])
        size = f"{resolution}x{resolution}"
        print(f"| {name} | {size} | real scenes (the segmenter's baseline) | {score(real, maps, real, a.rounds)} "
              f"| - |")
        rows = [map_colours(len(MAP_CLASSES))[maps[:8]].permute(0, 3, 1, 2) / 127.5 - 1, real[:8]]
        for w in [None] + (a.ug if resolution > pipe.resolution[0] else []):
            g, t0 = torch.Generator().manual_seed(0), time.perf_counter()
            images = torch.cat([generate(pipe, len(m), semantic_map=m, sampler="dpmpp_2m", steps=20,
                                         upsample_guidance=w, generator=g) for m in maps.split(a.batch)])
            seconds = (time.perf_counter() - t0) / a.n
            how = "plain (convolutional)" if w is None else f"Upsample Guidance w = {w:g}"
            print(f"| {name} | {size} | {how} | {score(images, maps, real, a.rounds)} | {seconds:.3f} |", flush=True)
            rows.append(images[:8])
        save_grid(torch.cat(rows), Path(a.out) / f"{name.replace(' ', '_')}.png", nrow=min(8, a.n),
                  row_labels=["map", "real"] + ["plain"] + [f"UG {w:g}" for w in a.ug][:len(rows) - 3],
                  scale=max(1, 128 // resolution))


if __name__ == "__main__":
    main()
