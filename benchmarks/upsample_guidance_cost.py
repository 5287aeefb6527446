"""Cost of Upsample Guidance: wall-clock and FLOPs of sampling at s x the trained size with UG against
plain sampling at that size, run alternately in the same process on the same seeds.

UG adds one denoiser call on an image s^2 times smaller per step (batched with the CFG batch), so its
FLOP overhead is bounded by about 1/s^2 (+25% at s = 2) and by eta / s^2 when it acts only while
t >= (1 - eta) T.

    python benchmarks/upsample_guidance_cost.py --model runs/mnist_unet_14/model --batch 20 --steps 10
    python benchmarks/upsample_guidance_cost.py --model runs/mnist_ldm/model --eta 1.0 0.6 0.3
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from diffusekit.pipelines import generate, load_pipeline

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
from upsample_guidance import flops_per_step  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="model folder trained at the low resolution")
    ap.add_argument("--s", type=int, default=2)
    ap.add_argument("--w", type=float, default=0.2)
    ap.add_argument("--eta", type=float, nargs="+", default=[1.0])
    ap.add_argument("--batch", type=int, default=20)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--cfg", type=float, default=3.0)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    pipe = load_pipeline(args.model, args.device)
    H, W = (r * args.s for r in pipe.resolution)
    labels = torch.arange(args.batch) % pipe.num_classes if pipe.num_classes else None

    def run(ug: float | None, eta: float = 1.0) -> float:
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        generate(pipe, args.batch, labels=labels, height=H, width=W, steps=args.steps, cfg=args.cfg,
                 upsample_guidance=ug, ug_eta=eta, generator=torch.Generator().manual_seed(0))
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    run(None)  # warm-up
    plain_flops, ug_flops = flops_per_step(pipe, H, W, args.s)
    print(f"{args.model}: {pipe.resolution[0]}x{pipe.resolution[1]} -> {H}x{W}, batch {args.batch}, "
          f"{args.steps} DDIM steps, CFG {args.cfg}, {args.rounds} alternating rounds, device {args.device}")
    print(f"FLOPs per step: +{100 * (ug_flops / plain_flops - 1):.1f}% with UG (1/s^2 = {100 / args.s**2:.1f}%)")
    print("| eta | plain (s) | UG (s) | wall-clock overhead (median) | range |")
    print("| --- | --- | --- | --- | --- |")
    for eta in args.eta:
        plain, guided = [], []
        for _ in range(args.rounds):
            plain.append(run(None))
            guided.append(run(args.w, eta))
        ratios = [g / p - 1 for g, p in zip(guided, plain)]
        print(f"| {eta} | {statistics.median(plain):.2f} | {statistics.median(guided):.2f} | "
              f"+{100 * statistics.median(ratios):.1f}% | {100 * min(ratios):+.1f}% .. {100 * max(ratios):+.1f}% |",
              flush=True)


if __name__ == "__main__":
    main()
