"""Reproduce the Upsample Guidance claims (SPEC §7, reference/upsample-guidance_su-2024) with numbers.

    python experiments/upsample_guidance.py pixel  --low runs/mnist_unet_14/model --high runs/mnist_unet/model
    python experiments/upsample_guidance.py latent --low runs/mnist_ldm/model
    python experiments/upsample_guidance.py dit    --low runs/mnist_dit_14/model

For each method the same seeds give the same initial noise; samples are measured against real digits
in the feature space of the shipped MNIST classifier (Frechet distance, KID, precision / recall) and by
the share classified as the requested digit, and by their high-frequency "detail" (energy of x - U[D[x]]
relative to real digits: blur lowers it, noise raises it). Writes <out>/<experiment>.json, a markdown table and one
PNG grid per method (a row per digit).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from diffusekit.evaluation import evaluate_samples, load_mnist_classifier
from diffusekit.guidance import UpsampleGuidance, downsample, upsample
from diffusekit.images import save_grid
from diffusekit.pipelines import Pipeline, generate, load_pipeline
from diffusekit.data import MNIST

Method = Callable[[torch.Tensor, torch.Generator], torch.Tensor]  # labels, generator -> images


def sampler_kw(args) -> dict:
    return dict(sampler=args.sampler, steps=args.steps, cfg=args.cfg)


def detail(images: torch.Tensor) -> float:
    """Mean energy of the 2x2 high-frequency part x - U[D[x]] per image: what blurring removes."""
    return (images - upsample(downsample(images, 2), 2)).pow(2).mean().item()


def run_methods(methods: dict[str, Method], labels: torch.Tensor, args, measure: Callable[[torch.Tensor], torch.Tensor],
                real: torch.Tensor, out: Path, name: str) -> list[dict]:
    """Sample every method on the same seeds, time it, score it, save its grid."""
    classifier, rows, real_detail = load_mnist_classifier(), [], detail(real)
    Path(args.samples).mkdir(parents=True, exist_ok=True)
    for method, fn in methods.items():
        slug = "".join(c if c.isalnum() or c == "." else "_" for c in method).strip("_")
        t0 = time.perf_counter()
        images = torch.cat([fn(chunk, torch.Generator().manual_seed(args.seed + i))
                            for i, chunk in enumerate(labels.split(args.batch))])
        seconds = time.perf_counter() - t0
        measured = measure(images)
        metrics = evaluate_samples(measured, real, labels, classifier)
        metrics["detail"] = detail(measured) / real_detail
        rows.append({"method": method, **{k: round(v, 4) for k, v in metrics.items()}, "seconds": round(seconds, 1)})
        torch.save((images.add(1).mul(127.5).round().to(torch.uint8), labels), Path(args.samples) / f"{name}_{slug}.pt")
        print(json.dumps(rows[-1]), flush=True)
        pick = torch.cat([images[labels == c][:args.grid] for c in range(10)])
        save_grid(pick, out / f"{name}_{slug}.png", nrow=args.grid,
                  row_labels=[str(c) for c in range(10)], scale=2)
    return rows


@torch.no_grad()
def flops_per_step(pipe: Pipeline, height: int, width: int, s: int, batch: int = 2) -> tuple[float, float]:
    """FLOPs of one guided denoiser evaluation at height x width, without and with Upsample Guidance."""
    shape = pipe.latent_shape(height, width)
    x = torch.randn(batch, *shape)
    t = torch.full((batch,), float(pipe.schedule.t_max) * 0.5, dtype=torch.float64)
    cond = {"class_labels": torch.zeros(batch, dtype=torch.long)} if pipe.num_classes else {}
    counts = []
    for den in (pipe.denoiser(), UpsampleGuidance(pipe.denoiser(), pipe.schedule, s)):
        with FlopCounterMode(display=False) as counter:
            den(x, t, cond)
        counts.append(counter.get_total_flops())
    return counts[0], counts[1]


def bicubic(images: torch.Tensor, s: int) -> torch.Tensor:
    return F.interpolate(images, scale_factor=s, mode="bicubic", align_corners=False).clamp(-1, 1)


def experiment(args) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    low = load_pipeline(args.low)
    h, w = low.resolution
    s = args.s
    H, W = h * s, w * s
    labels = torch.arange(10).repeat_interleave(args.per_class)
    kw = sampler_kw(args)

    def at(pipe, height, width, **extra) -> Method:
        return lambda lab, g: generate(pipe, len(lab), labels=lab, height=height, width=width, generator=g, **kw, **extra)

    methods: dict[str, Method] = {f"low-res model at {H}x{W}, no UG": at(low, H, W),
                                  f"{h}x{w} samples, bicubic x{s}": lambda lab, g: bicubic(at(low, h, w)(lab, g), s)}
    for weight in args.w:
        methods[f"UG w={weight}"] = at(low, H, W, upsample_guidance=weight)
    for eta in args.eta:
        methods[f"UG w={args.eta_w} eta={eta}"] = at(low, H, W, upsample_guidance=args.eta_w, ug_eta=eta)
    if args.high:
        methods[f"{H}x{W}-trained model"] = at(load_pipeline(args.high), H, W)

    if args.experiment == "latent":  # measured after downsampling to the training size, against real digits there
        data = MNIST(h, pad=args.pad)
        measure = lambda x: F.interpolate(x, size=(h, w), mode="area")  # noqa: E731
    else:
        data = MNIST(H)
        measure = lambda x: x  # noqa: E731
    real, spare = data.images[:8000], data.images[8000:]  # the reference row: as many real digits, per class
    picks = torch.cat([torch.nonzero(data.labels[8000:] == c)[:args.per_class, 0] for c in range(10)])
    chunks = iter(picks.split(args.batch))  # consumed in the order run_methods splits the labels
    methods = {"real digits (reference)": lambda lab, g: spare[next(chunks)]} | methods
    rows = run_methods(methods, labels, args, measure, real, out, args.experiment)
    plain, guided = flops_per_step(low, H, W, s)
    ts = low.settings.grid(low.schedule, args.steps)[:-1]
    for r in rows:  # FLOP overhead of the whole sampling run: the low-res call only runs while UG is on
        eta = float(r["method"].split("eta=")[1]) if "eta=" in r["method"] else 1.0
        active = (ts >= (1 - eta) * low.schedule.t_max).double().mean().item() if "UG w=" in r["method"] else 0.0
        r["ug_steps"], r["flop_overhead"] = round(active, 3), round(active * (guided / plain - 1), 4)
    report = {"experiment": args.experiment, "model": args.low, "trained": [h, w], "generated": [H, W], "s": s,
              "samples": len(labels), **kw, "rows": rows,
              "flops": {"plain_step": plain, "ug_step": guided, "overhead": guided / plain - 1, "bound": 1 / s**2}}
    (out / f"{args.experiment}.json").write_text(json.dumps(report, indent=1))
    base = next(r["seconds"] for r in rows if "no UG" in r["method"])
    lines = ["| method | Frechet | KID | precision | recall | class accuracy | detail vs real | time (s) | time vs no UG "
             "| FLOPs vs no UG |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['frechet']:.3f} | {r['kid']:.4f} | {r['precision']:.3f} | {r['recall']:.3f} "
                     f"| {r['class_accuracy']:.3f} | {r['detail']:.2f} | {r['seconds']} | {r['seconds'] / base:.2f} | "
                     f"{'+' + format(100 * r['flop_overhead'], '.1f') + '%' if r['ug_steps'] else ''} |")
    lines.append(f"\nFLOPs per guided step: {plain / 1e6:.1f} M without UG, {guided / 1e6:.1f} M with UG "
                 f"(+{100 * (guided / plain - 1):.1f}%; the 1/s^2 bound is {100 / s**2:.1f}%).")
    (out / f"{args.experiment}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("experiment", choices=["pixel", "latent", "dit"])
    ap.add_argument("--low", required=True, help="the model trained at the low resolution")
    ap.add_argument("--high", help="a model of the same size trained at the high resolution (pixel)")
    ap.add_argument("--s", type=int, default=2)
    ap.add_argument("--w", type=float, nargs="*", default=[0.0, 0.2, 0.5, 1.0])
    ap.add_argument("--eta", type=float, nargs="*", default=[], help="latent: UG only while t >= (1 - eta) T")
    ap.add_argument("--eta-w", type=float, default=0.2)
    ap.add_argument("--pad", type=int, default=2, help="latent: MNIST padding of the training data")
    ap.add_argument("--per-class", type=int, default=40)
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--sampler", default="ddim")
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--cfg", type=float, default=3.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--grid", type=int, default=6, help="samples per digit in the PNG grids")
    ap.add_argument("--out", default="docs/ug")
    ap.add_argument("--samples", default="runs/ug_samples", help="where all samples are saved (uint8 tensors)")
    experiment(ap.parse_args())


if __name__ == "__main__":
    main()
