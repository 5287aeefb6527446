"""Fewer network evaluations (issue 24.3): what CFG-until, DeepCache and fewer steps cost in quality on the bundled
MNIST model, and what they buy in time at Stable Diffusion 1.5 scale.

    python experiments/fewer_evaluations.py quality --n 100          # 1,000 digits per method (MNIST, CFG 3)
    python experiments/fewer_evaluations.py flops                    # their network GFLOP per digit
    python experiments/fewer_evaluations.py speed /tmp/sd15 --size 256   # the same methods, SD-1.5-shaped folder
    python experiments/fewer_evaluations.py plot                     # Frechet distance against SD-scale time

quality: n samples per digit for each method (the same seeds), class accuracy and Frechet distance in the
shipped classifier's feature space against the 10k real digits with 95% bootstrap intervals, beside the
real-vs-real floor at the same count, and the seconds per 1,000 digits here. speed: one 20-step text-to-image
generation per method (prompt, CFG 7.5, dpmpp_2m) on a Stable Diffusion folder (benchmarks/sd15_folder.py builds
one with random weights), timed whole (text encoder, steps, decode) after a warm-up generation, alternating
methods over --rounds (the best round counts; methods not run keep their earlier figures in speed.json). Results go
to <out>/quality.json and speed.json; plot draws docs/fewer_evaluations/curve.png from both.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from diffusekit.evaluation import (extract, load_mnist_classifier, real_floor, sample_classes, save_class_grid,
                                   score_classes)
from diffusekit.data import MNIST
from diffusekit.pipelines import generate
from diffusekit.plots import points_png
from diffusekit.requests import load_model

METHODS = {  # name -> generate keywords; all dpmpp_2m from the same noise
    "exact (20 steps)": {},
    "cache 2": dict(cache=2),
    "cache 3": dict(cache=3),
    "cache 5": dict(cache=5),
    "cache 3 depth 0": dict(cache=3, cache_depth=0),
    "cfg until 0.5": dict(cfg_until=0.5),
    "cfg until 0.25": dict(cfg_until=0.25),
    "cache 3 + cfg until 0.5": dict(cache=3, cfg_until=0.5),
    "10 steps": dict(steps=10),
}


def quality(a: argparse.Namespace) -> None:
    pipe, dtype = load_model("mnist")
    judge = load_mnist_classifier()
    real = extract(judge.features, MNIST().images)
    floor = real_floor(real, 10 * a.n)
    rows = {}
    print(f"| method ({10 * a.n} digits, dpmpp_2m, CFG 3, {dtype}) | class accuracy (95% CI) | Frechet (95% CI) "
          f"| s / 1,000 digits |\n| --- | --- | --- | --- |", flush=True)
    for name in a.methods:
        kw = dict(dict(steps=20), **METHODS[name])
        t0 = time.perf_counter()
        images, labels = sample_classes(pipe, a.n, seed=0, sampler="dpmpp_2m", **kw)
        seconds = (time.perf_counter() - t0) * 1000 / len(images)
        scores = score_classes(judge, images, labels, real, a.rounds)
        rows[name] = dict(scores._asdict(), seconds=seconds)
        print(f"| {name} | {scores} | {seconds:.0f} |", flush=True)
        save_class_grid(images, a.n, Path(a.out) / f"{re.sub(r'[^a-z0-9.]+', '_', name).strip('_')}.png")
    print(f"\nreal-vs-real floor: {10 * a.n} real digits against all 10k: Frechet {floor:.1f}")
    write(Path(a.out) / "quality.json", dict(samples=10 * a.n, floor=floor, dtype=dtype, methods=rows))


def flops(a: argparse.Namespace) -> None:
    """Network GFLOP per image of each method on the bundled model (torch.utils.flop_counter: exact, noise-free)."""
    pipe, _ = load_model("mnist", dtype="fp32")
    per_image = {}
    for name in a.methods:
        with FlopCounterMode(display=False) as counter:
            generate(pipe, 10, labels=torch.arange(10), sampler="dpmpp_2m", generator=torch.Generator().manual_seed(0),
                     **dict(dict(steps=20), **METHODS[name]))
        per_image[name] = counter.get_total_flops() / 10 / 1e9
        print(f"{name}: {per_image[name]:.2f} GFLOP per image", flush=True)
    write(Path(a.out) / "flops.json", per_image)


def speed(a: argparse.Namespace) -> None:
    torch.set_num_threads(a.threads)
    pipe, dtype = load_model(a.folder, dtype=a.dtype)

    def run(**kw) -> float:
        t0 = time.perf_counter()
        generate(pipe, 1, prompts=[a.prompt], height=a.size, width=a.size, cfg=7.5, sampler="dpmpp_2m",
                 generator=torch.Generator().manual_seed(0), **kw)
        return time.perf_counter() - t0

    run(steps=1)  # warm-up: the first call pages the weights in and builds the kernels' plans
    seconds: dict[str, list[float]] = {name: [] for name in a.methods}
    for _ in range(a.rounds):
        for name in a.methods:
            seconds[name].append(run(**dict(dict(steps=20), **METHODS[name])))
            print(f"{name}: {seconds[name][-1]:.1f} s", flush=True)
    path = Path(a.out) / "speed.json"  # methods not run keep their earlier figures
    earlier = json.loads(path.read_text())["seconds"] if path.is_file() else {}
    best = {**earlier, **{name: min(s) for name, s in seconds.items()}}
    exact = best.get("exact (20 steps)")
    print(f"\n| method ({a.size}x{a.size}, {dtype}, {a.threads} threads) | generation s | speed-up |\n| --- | --- | --- |")
    for name, s in best.items():
        print(f"| {name} | {s:.1f} | {f'{exact / s:.2f}x' if exact else '-'} |")
    write(path, dict(size=a.size, dtype=dtype, threads=a.threads, seconds=best))


def plot(a: argparse.Namespace) -> None:
    q = json.loads((Path(a.out) / "quality.json").read_text())
    s = json.loads((Path(a.out) / "speed.json").read_text())
    points = [(name, s["seconds"][name], m["frechet"], tuple(m["frechet_ci"])) for name, m in q["methods"].items()
              if name in s["seconds"]]
    path = points_png(Path(a.out) / "curve.png", points,
                      x_label=f"seconds per SD-1.5 generation ({s['size']}x{s['size']}, {s['dtype']}, CPU)",
                      y_label=f"Frechet distance, {q['samples']} MNIST digits (floor {q['floor']:.1f})")
    print(path)


def write(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    q = sub.add_parser("quality")
    q.add_argument("--n", type=int, default=100, help="samples per digit")
    q.add_argument("--rounds", type=int, default=200, help="bootstrap resamples")
    s = sub.add_parser("speed")
    s.add_argument("folder", help="a Stable Diffusion folder (benchmarks/sd15_folder.py)")
    s.add_argument("--size", type=int, default=256)
    s.add_argument("--rounds", type=int, default=1)
    s.add_argument("--threads", type=int, default=2)
    s.add_argument("--dtype", default="fp32")
    s.add_argument("--prompt", default="a photograph of an astronaut riding a horse")
    f = sub.add_parser("flops")
    sub.add_parser("plot")
    for c in (q, s, f):
        c.add_argument("--methods", nargs="*", choices=list(METHODS), default=list(METHODS))
    p.add_argument("--out", default="docs/fewer_evaluations")
    a = p.parse_args()
    {"quality": quality, "flops": flops, "speed": speed, "plot": plot}[a.what](a)


if __name__ == "__main__":
    main()
