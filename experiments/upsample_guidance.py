"""Upsample Guidance measured (issue 25): every way to get 28x28 digits from the bundled 14x14 model, on the same
seeds, 100 per class, judged by two classifiers with bootstrap intervals and the real-vs-real floor beside them.

    python experiments/upsample_guidance.py sample --cfg 2 --methods ug0 bicubic native naive ug0.2 ug0.5
    python experiments/upsample_guidance.py report          # docs/upsample_guidance/{results.json,tables.md,*.png}

Methods (s = 2): `naive` (the 14x14 model run at 28x28), `bicubic` / `sr` (14x14 samples upscaled bicubically /
by the bundled super-resolution model: the cascade), `hires<S>` (A1111's hires fix: 14x14 samples, bicubic x2,
then image-to-image at 28x28 with the same model at strength S), `hires<S>+ug<W>` (the same with Upsample Guidance
in the second pass), `ug<W>` / `ugauto` (Upsample Guidance), `native` (the bundled 28x28 model). The 14x14 samples
are drawn once per CFG scale and shared by bicubic, sr and hires (paired comparisons); every 28x28 pass draws its
noise from its own seed. `sample` skips methods already saved, so a study can be built up across runs; it stores
uint8 samples, labels and the seconds of each stage in <samples>/cfg<c>/<method>.npz.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode
from tqdm.auto import tqdm

from diffusekit import evaluation as ev
from diffusekit.bundled import model_folder
from diffusekit.cli import ug_weight_or_auto
from diffusekit.pipelines import generate, load_pipeline

Stage = Callable[[torch.Tensor, torch.Generator], torch.Tensor]  # labels, generator -> images in [-1, 1]
METHOD = re.compile(r"^(naive|bicubic|sr|native|ug(auto|-?[0-9.]+)|hires([0-9.]+)(\+ug(auto|-?[0-9.]+))?)$")


def to_uint8(x: torch.Tensor) -> np.ndarray:
    return x.add(1).mul(127.5).round().clamp(0, 255).to(torch.uint8).numpy()


def from_uint8(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(a).float().div(127.5).sub(1)


def run(stage: Stage, labels: torch.Tensor, seed: int, batch: int, desc: str) -> tuple[torch.Tensor, float]:
    """A stage over all labels in batches (batch i seeded seed + i) -> images and seconds."""
    t0, out = time.perf_counter(), []
    for i, chunk in enumerate(tqdm(labels.split(batch), desc=desc)):
        out.append(stage(chunk, torch.Generator().manual_seed(seed + i)))
    return torch.cat(out), time.perf_counter() - t0


class Methods:
    """The methods' stages on the 14x14 model `low`, the 28x28 model `high` and the super-resolution model `sr`;
    the second stages of bicubic, sr and hires run on the 14x14 samples `first` hands them, batch by batch."""

    def __init__(self, args):
        self.low, self.sr, self.high = (load_pipeline(model_folder(m)) for m in (args.low, args.sr, args.high))
        self.h, self.s = self.low.resolution[0], 2
        self.kw = dict(sampler=args.sampler, steps=args.steps, cfg=args.cfg)
        self.first: Iterator[torch.Tensor] = iter(())

    def at(self, pipe, size: int, **extra) -> Stage:
        return lambda lab, g: generate(pipe, len(lab), labels=lab, height=size, width=size, generator=g, **self.kw,
                                       **extra)

    def small(self) -> Stage:
        return self.at(self.low, self.h)

    def bicubic(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, scale_factor=self.s, mode="bicubic", align_corners=False).clamp(-1, 1)

    def stage(self, method: str) -> tuple[Stage, bool]:
        """The second (or only) stage of `method`, and whether it runs on the shared 14x14 samples."""
        m = METHOD.match(method)
        if not m:
            raise SystemExit(f"unknown method {method!r} (naive, bicubic, sr, native, ug<W>, ugauto, hires<S>[+ug<W>])")
        H = self.h * self.s
        if method in ("naive", "native"):
            return self.at(self.low if method == "naive" else self.high, H), False
        if m.group(2):
            return self.at(self.low, H, upsample_guidance=ug_weight_or_auto(m.group(2))), False
        if method == "bicubic":
            then = lambda x, lab, g: self.bicubic(x)  # noqa: E731
        elif method == "sr":
            then = lambda x, lab, g: generate(self.sr, len(lab), low_res=x, sampler=self.kw["sampler"],  # noqa: E731
                                              steps=self.kw["steps"], generator=g)
        else:
            extra = {"upsample_guidance": ug_weight_or_auto(m.group(5))} if m.group(5) else {}
            then = lambda x, lab, g: self.at(self.low, H, image=self.bicubic(x), strength=float(m.group(3)),  # noqa: E731
                                             **extra)(lab, g)
        return (lambda lab, g: then(next(self.first), lab, g)), True

    @torch.no_grad()
    def gflops(self, method: str, labels: torch.Tensor) -> float:
        """GFLOP per sample of the whole method (both stages), counted on one batch of `labels`."""
        stage, uses_small = self.stage(method)
        g = torch.Generator().manual_seed(0)
        with FlopCounterMode(display=False) as counter:
            self.first = iter([self.small()(labels, g)] if uses_small else [])
            stage(labels, g)
        return counter.get_total_flops() / len(labels) / 1e9


def sample(args) -> None:
    methods = Methods(args)
    labels = torch.arange(10).repeat_interleave(args.per_class)
    folder = Path(args.samples) / f"cfg{args.cfg:g}"
    folder.mkdir(parents=True, exist_ok=True)
    small_file = folder / "14x14.npz"  # the shared first stage
    if not small_file.exists():
        small, seconds = run(methods.small(), labels, args.seed, args.batch, "14x14 samples")
        np.savez_compressed(small_file, images=to_uint8(small), labels=labels.numpy(), seconds=seconds)
    stored = np.load(small_file)
    small, small_seconds = from_uint8(stored["images"]), float(stored["seconds"])
    for method in args.methods:
        stage, uses_small = methods.stage(method)
        path = folder / f"{method}.npz"
        if path.exists():
            print(f"{path} exists, skipped")
            continue
        methods.first = iter(small.split(args.batch))
        images, seconds = run(stage, labels, args.seed + 1000, args.batch, method)
        np.savez_compressed(path, images=to_uint8(images), labels=labels.numpy(),
                            seconds=seconds + (small_seconds if uses_small else 0.0), stage_seconds=seconds)
        print(f"{method}: {seconds:.1f} s", flush=True)


# ----------------------------------------------------------------------------- report

def cell(row: dict, metric: str, fmt: str) -> str:
    lo, hi = row[f"{metric}_ci"]
    mark = "**" if row.get(f"{metric}_ties_best") else ""
    return f"{mark}{row[metric]:{fmt}}{mark} ({lo:{fmt}}-{hi:{fmt}})"


def markdown(table: dict, costs: dict[str, float], seconds: dict[str, float]) -> str:
    """One judge's table: the floor row, then the methods by Frechet distance; bold: ties the best."""
    lines = ["| method | Frechet | KID | class accuracy | GFLOP / digit | seconds / 1,000 |",
             "| --- | --- | --- | --- | --- | --- |"]
    floor = table[ev.FLOOR]
    lines.append(f"| real digits (floor) | {cell(floor, 'frechet', '.1f')} | {cell(floor, 'kid', '.1f')} | "
                 f"{cell(floor, 'accuracy', '.1%')} | | |")
    names = sorted((n for n in table if n not in (ev.FLOOR, "_best")), key=lambda n: table[n]["frechet"])
    for name in names:
        row = table[name]
        lines.append(f"| {name} | {cell(row, 'frechet', '.1f')} | {cell(row, 'kid', '.1f')} | "
                     f"{cell(row, 'accuracy', '.1%')} | {costs.get(name, float('nan')):.2f} | {seconds[name]:.0f} |")
    return "\n".join(lines)


def report(args) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    judges = {"shipped classifier": ev.load_mnist_classifier(),
              "independent judge": ev.load_mnist_classifier(args.judge)}
    real, floor, floor_labels = ev.judge_sets(per_class=args.per_class)
    results, text = {"per_class": args.per_class, "judges": list(judges), "scales": {}}, []
    for folder in sorted(Path(args.samples).glob("cfg*"), key=lambda p: float(p.name[3:])):
        runs = {p.stem: np.load(p) for p in sorted(folder.glob("*.npz")) if p.stem != "14x14"}
        if not runs:
            continue
        cfg = float(folder.name[3:])
        if args.cfg and cfg not in args.cfg:
            continue
        samples = {name: from_uint8(r["images"]) for name, r in runs.items()}
        labels = torch.from_numpy(next(iter(runs.values()))["labels"])
        methods = Methods(argparse.Namespace(**{**vars(args), "cfg": cfg}))
        costs = {name: methods.gflops(name, torch.arange(10)) for name in samples}
        seconds = {name: float(r["seconds"]) * 1000 / len(labels) for name, r in runs.items()}
        scale = {"gflops": costs, "seconds": seconds}
        for judge_name, judge in judges.items():
            scale[judge_name] = ev.judge_table(judge.features, samples, labels, real, floor, floor_labels,
                                               judge.head, args.rounds)
            text += [f"### CFG {cfg:g}, {judge_name}\n", markdown(scale[judge_name], costs, seconds), ""]
            print(text[-2], flush=True)
        for n in args.subsets:  # the same ranking from the first n per class of each set (the earlier protocols)
            pick = torch.cat([torch.nonzero(labels == c)[:n, 0] for c in range(10)])
            sub_floor = torch.cat([torch.nonzero(floor_labels == c)[:n, 0] for c in range(10)])
            judge = judges["shipped classifier"]
            scale[f"shipped classifier, {n} per class"] = table = ev.judge_table(
                judge.features, {k: v[pick] for k, v in samples.items()}, labels[pick], real, floor[sub_floor],
                floor_labels[sub_floor], judge.head, args.rounds)
            text += [f"### CFG {cfg:g}, shipped classifier, {10 * n} samples per method\n",
                     markdown(table, costs, seconds), ""]
        results["scales"][f"{cfg:g}"] = scale
        for name, images in samples.items():
            ev.save_class_grid(images, args.per_class, out / f"cfg{cfg:g}_{name}.png")
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "tables.md").write_text("Written by `python experiments/upsample_guidance.py report`. Each cell: the "
                                   "estimate and its 95% bootstrap interval; bold: ties the best of its column (the "
                                   "paired difference's interval holds 0).\n\n" + "\n".join(text) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    a = sub.add_parser("sample", help="sample the methods not yet saved")
    a.add_argument("--methods", nargs="+", required=True)
    a.add_argument("--low", default="mnist14")
    a.add_argument("--high", default="mnist")
    a.add_argument("--sr", default="mnist_sr")
    a.add_argument("--cfg", type=float, default=2.0)
    a.add_argument("--sampler", default="dpmpp_2m")
    a.add_argument("--steps", type=int, default=20)
    a.add_argument("--per-class", type=int, default=100)
    a.add_argument("--batch", type=int, default=250)
    a.add_argument("--seed", type=int, default=0)
    b = sub.add_parser("report", help="score every saved method")
    b.add_argument("--judge", default="docs/upsample_guidance/judge", help="the independent classifier's folder")
    b.add_argument("--per-class", type=int, default=100)
    b.add_argument("--rounds", type=int, default=200, help="bootstrap resamples")
    b.add_argument("--subsets", type=int, nargs="*", default=[20], help="also rank the first N per class")
    for name, default in (("--low", "mnist14"), ("--high", "mnist"), ("--sr", "mnist_sr"), ("--sampler", "dpmpp_2m")):
        b.add_argument(name, default=default)
    b.add_argument("--steps", type=int, default=20)
    b.add_argument("--cfg", type=float, nargs="*", default=[], help="only these CFG scales (default: all sampled)")
    b.add_argument("--out", default="docs/upsample_guidance")
    for p in (a, b):
        p.add_argument("--samples", default="docs/upsample_guidance/samples")
    args = ap.parse_args()
    sample(args) if args.command == "sample" else report(args)


if __name__ == "__main__":
    main()
