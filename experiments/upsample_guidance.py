"""Upsample Guidance measured (issue 25): every way to get twice the trained size from a low-resolution model, on
the same seeds, 100 per class, judged by two classifiers with bootstrap intervals and the real-vs-real floor beside.

    python experiments/upsample_guidance.py sample --cfg 2 --methods ug0 bicubic native naive ug0.2 ug0.5
    python experiments/upsample_guidance.py sample --family dit --methods naive naive+pi ug0 ug0+pi bicubic
    python experiments/upsample_guidance.py report    # docs/upsample_guidance/{results,tables}_<family>.*, PNGs
    python experiments/upsample_guidance.py mismatch  # the LDM autoencoder's latent of a pooled image vs pooled latent
    python experiments/upsample_guidance.py consistency  # the judge-free rules for `auto`, on the stored UNet samples
    python experiments/upsample_guidance.py time --methods naive bicubic sr ug0.5  # seconds per 1,000 digits, idle

Families (the low-resolution model): `unet` (bundled mnist14, 14x14 -> 28x28), `dit` (runs/mnist_dit_14/model from
configs/mnist_dit_14.toml, 7x7 -> 14x14 tokens), `latent` (runs/mnist_ldm/model from configs/mnist_ldm.toml,
32x32 padded digits = 8x8 latents -> 64x64, judged after area pooling to 32x32 and cropping the 28x28 digit).
Methods (s = 2): `naive` (the model run at twice its size), `bicubic` / `sr` (its samples upscaled bicubically /
by the bundled super-resolution model: the cascade), `hires<S>` (A1111's hires fix: the samples, bicubic x2, then
image-to-image at twice the size with the same model at strength S), `ug<W>[e<ETA>]` / `ugauto` (Upsample Guidance,
acting over the first fraction ETA of the steps), `hires<S>+ug<W>` (hires fix with UG in its second pass), `native`
(the bundled 28x28 model); `+pi` runs a DiT with its positions interpolated to the trained grid. The low-resolution
samples are drawn once per family and CFG scale and shared by bicubic, sr and hires (paired comparisons); every
large pass draws its noise from its own seed. `sample` skips methods already saved, so a study is built up across
runs; it stores the judged uint8 samples, labels and seconds in <samples>/<family>/cfg<c>/<method>.npz.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from dataclasses import dataclass
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
from diffusekit.data import MNIST
from diffusekit.pipelines import generate, load_pipeline

Stage = Callable[[torch.Tensor, torch.Generator], torch.Tensor]  # labels, generator -> images in [-1, 1]
FAMILIES = {"unet": "mnist14", "dit": "runs/mnist_dit_14/model", "latent": "runs/mnist_ldm/model"}  # low model
SAMPLER = "dpmpp_2m"  # the default sampler, the study's
SMALL = "small.npz"  # the low-resolution samples of a family and CFG scale, shared by bicubic, sr and hires
BASES = ("naive", "bicubic", "sr", "native", "hires", "ug")
TOKEN = re.compile(r"^(naive|bicubic|sr|native|hires[0-9.]+|ug(?:auto|-?[0-9.]+)(?:e[0-9.]+)?|pi)$")


@dataclass
class Method:
    """A method's name parsed: `base` [+ ug<W>[e<eta>]] [+ pi]; hires carries its strength, ug its weight and eta
    (the fraction of the steps it acts on), pi interpolates a DiT's positions to its trained grid."""

    base: str
    strength: float | None = None
    w: float | None = None
    eta: float = 1.0
    pi: bool = False

    @classmethod
    def parse(cls, name: str) -> Method:
        tokens = name.split("+")
        if not all(TOKEN.match(t) for t in tokens) or tokens[0] == "pi" or len(set(tokens)) < len(tokens):
            raise SystemExit(f"unknown method {name!r}: one of naive, bicubic, sr, native, hires<S>, ug<W>[e<ETA>] "
                             "(W a number or auto), then optionally +ug<W>[e<ETA>] (after hires) and +pi")
        m = cls(re.match("|".join(BASES), tokens[0])[0])
        for t in tokens:
            if t.startswith("hires"):
                m.strength = float(t[5:])
            elif t.startswith("ug"):
                if m.w is not None or m.base not in ("ug", "hires"):
                    raise SystemExit(f"{name!r}: Upsample Guidance goes alone or after hires")
                w, _, eta = t[2:].partition("e")
                m.w, m.eta = ug_weight_or_auto(w), float(eta or 1.0)
            elif t == "pi":
                m.pi = True
        return m

    @property
    def options(self) -> dict:
        """generate's Upsample Guidance keywords."""
        return {} if self.w is None else {"upsample_guidance": self.w, "ug_eta": self.eta}


def to_uint8(x: torch.Tensor) -> np.ndarray:
    return x.add(1).mul(127.5).round().clamp(0, 255).to(torch.uint8).numpy()


def from_uint8(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(a).float().div(127.5).sub(1)


def judged(x: torch.Tensor) -> torch.Tensor:
    """The 28x28 digits the judges see: 28x28 samples as they are; larger ones (the LDM's 64x64 of digits padded
    by 2 at 32x32) area-pooled to 32x32 and cropped to the 28x28 digit."""
    if x.shape[-1] == 28:
        return x
    return F.interpolate(x, size=32, mode="area")[..., 2:30, 2:30]


def run(stage: Stage, labels: torch.Tensor, seed: int, batch: int, desc: str) -> tuple[torch.Tensor, float]:
    """A stage over all labels in batches (batch i seeded seed + i) -> images and seconds."""
    t0, out = time.perf_counter(), []
    for i, chunk in enumerate(tqdm(labels.split(batch), desc=desc)):
        out.append(stage(chunk, torch.Generator().manual_seed(seed + i)))
    return torch.cat(out), time.perf_counter() - t0


class Methods:
    """The methods' stages for a family's low-resolution model `low` (run at s = 2 times its size), the 28x28
    model `high` and the super-resolution model `sr` (both for 14x14 models only); the second stages of bicubic,
    sr and hires run on the low-resolution samples `first` hands them, batch by batch."""

    def __init__(self, args):
        self.low = load_pipeline(model_folder(args.low or FAMILIES[args.family]))
        self.h, self.s = self.low.resolution[0], 2
        self.sr, self.high = ((load_pipeline(model_folder(m)) for m in (args.sr, args.high)) if self.h == 14
                              else (None, None))
        self.kw = dict(sampler=args.sampler, steps=args.steps, cfg=args.cfg)
        self.first: Iterator[torch.Tensor] = iter(())

    def at(self, pipe, size: int, pi: bool = False, **extra) -> Stage:
        return lambda lab, g: generate(pipe, len(lab), labels=lab, height=size, width=size, generator=g,
                                       interpolate_positions=pi, **self.kw, **extra)

    def small(self) -> Stage:
        return self.at(self.low, self.h)

    def bicubic(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, scale_factor=self.s, mode="bicubic", align_corners=False).clamp(-1, 1)

    def stage(self, name: str) -> tuple[Stage, bool]:
        """The second (or only) stage of method `name` (its output judged()), and whether it runs on the shared
        low-resolution samples."""
        m, H = Method.parse(name), self.h * self.s
        if m.base in ("sr", "native") and self.sr is None:
            raise SystemExit(f"{name}: the super-resolution and 28x28 models go with a 14x14 model only")
        if m.base in ("naive", "native", "ug"):
            pipe = self.high if m.base == "native" else self.low
            stage = self.at(pipe, H, m.pi, **m.options)
            return (lambda lab, g: judged(stage(lab, g))), False
        if m.base == "bicubic":
            then = lambda x, lab, g: self.bicubic(x)  # noqa: E731
        elif m.base == "sr":
            then = lambda x, lab, g: generate(self.sr, len(lab), low_res=x, sampler=self.kw["sampler"],  # noqa: E731
                                              steps=self.kw["steps"], generator=g)
        else:
            then = lambda x, lab, g: self.at(self.low, H, m.pi, image=self.bicubic(x), strength=m.strength,  # noqa: E731
                                             **m.options)(lab, g)
        return (lambda lab, g: judged(then(next(self.first), lab, g))), True

    @torch.no_grad()
    def gflops(self, method: str, labels: torch.Tensor) -> float:
        """GFLOP per sample of the whole method (both stages), counted on one batch of `labels`."""
        stage, uses_small = self.stage(method)
        g = torch.Generator().manual_seed(0)
        with FlopCounterMode(display=False) as counter:
            self.first = iter([self.small()(labels, g)] if uses_small else [])
            stage(labels, g)
        return counter.get_total_flops() / len(labels) / 1e9


def setting(cfg: float, sampler: str) -> str:
    """The folder of a CFG scale and sampler: cfg<C>, with _<sampler> unless it is the default."""
    return f"cfg{cfg:g}" + ("" if sampler == SAMPLER else f"_{sampler}")


def parse_setting(name: str) -> tuple[float, str]:
    cfg, _, sampler = name[3:].partition("_")
    return float(cfg), sampler or SAMPLER


def setting_order(folder: Path) -> tuple[bool, float, str]:
    """Settings with the default sampler first, then by CFG scale."""
    cfg, sampler = parse_setting(folder.name)
    return sampler != SAMPLER, cfg, sampler


def sample(args) -> None:
    methods = Methods(args)
    labels = torch.arange(10).repeat_interleave(args.per_class)
    folder = Path(args.samples) / args.family / setting(args.cfg, args.sampler)
    folder.mkdir(parents=True, exist_ok=True)
    small_file = folder / SMALL  # the shared first stage
    if not small_file.exists():
        small, seconds = run(methods.small(), labels, args.seed, args.batch, f"{methods.h}x{methods.h} samples")
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


def timing(args) -> None:
    """Wall-clock seconds per 1,000 digits of each method as a whole (both stages), on an otherwise idle machine:
    `rounds` runs of 10 x per_class digits each, the methods in alternating order -> <out>/timing_<family>.json."""
    methods = Methods(args)
    labels = torch.arange(10).repeat_interleave(args.per_class)
    stages, small = {m: methods.stage(m) for m in args.methods}, methods.small()
    seconds: dict[str, list[float]] = {m: [] for m in args.methods}
    for r in tqdm(range(args.rounds), desc="rounds"):
        for m in args.methods if r % 2 == 0 else args.methods[::-1]:
            (stage, uses_small), g = stages[m], torch.Generator().manual_seed(r)
            t0 = time.perf_counter()
            if uses_small:
                methods.first = iter([small(labels, g)])
            stage(labels, g)
            seconds[m].append((time.perf_counter() - t0) * 1000 / len(labels))
    result = {"setting": setting(args.cfg, args.sampler), "digits_per_run": len(labels),
              "threads": torch.get_num_threads(), "seconds_per_1000": {
                  m: {"median": float(np.median(v)), "rounds": v} for m, v in seconds.items()}}
    print("\n".join(f"{m}: {v['median']:.1f} s / 1,000 digits" for m, v in result["seconds_per_1000"].items()))
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / f"timing_{args.family}.json").write_text(json.dumps(result, indent=1))


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
    """Score every stored method of the chosen families and CFG scales -> <out>/{tables,results}_<family>.*
    and a class grid per method."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    judges = {"shipped classifier": ev.load_mnist_classifier(),
              "independent judge": ev.load_mnist_classifier(args.judge)}
    real, floor, floor_labels = ev.judge_sets(per_class=args.per_class)
    for family in args.family or [f for f in FAMILIES if (Path(args.samples) / f).is_dir()]:
        results, text = {"per_class": args.per_class, "judges": list(judges), "scales": {}}, []
        for folder in sorted((Path(args.samples) / family).glob("cfg*"), key=setting_order):
            cfg, sampler = parse_setting(folder.name)
            runs = {p.stem: np.load(p) for p in sorted(folder.glob("*.npz")) if p.name != SMALL}
            if runs and (not args.cfg or cfg in args.cfg):
                results["scales"][folder.name[3:]] = score(
                    argparse.Namespace(**{**vars(args), "cfg": cfg, "sampler": sampler, "family": family}),
                    folder.name, runs, judges, real, floor, floor_labels, text)
        text[:0] = [across_settings(results["scales"], list(judges)), ""]
        name = family + "".join(f"_cfg{c:g}" for c in args.cfg)  # a partial report beside the whole one
        (out / f"results_{name}.json").write_text(json.dumps(results, indent=1))
        (out / f"tables_{name}.md").write_text(
            f"Written by `python experiments/upsample_guidance.py report --family {family}`. Each cell: the estimate "
            "and its 95% bootstrap interval; bold: ties the best of its column (the paired difference's interval "
            "holds 0).\n\n" + "\n".join(text) + "\n")


def across_settings(scales: dict, judges: list[str]) -> str:
    """One table of every method (rows, in the order of the setting with the most methods) across the settings
    (columns): the first judge's Frechet distance and interval, the second's in brackets; bold: ties the best of
    its column."""
    first, second = judges[0], judges[-1]
    names = {n for scale in scales.values() for n in scale[first] if n not in (ev.FLOOR, "_best")}
    order = max((s[first] for s in scales.values()), key=len)  # the setting with the most methods
    names = sorted(names, key=lambda n: order[n]["frechet"])
    lines = [f"### Frechet distance at every setting: {first} (interval) [{second}]\n",
             "| method | " + " | ".join(f"CFG {k.replace('_', ', ')}" for k in scales) + " |",
             "| --- " * (1 + len(scales)) + "|",
             "| real digits (floor) | " + " | ".join(
                 f"{s[first][ev.FLOOR]['frechet']:.1f} [{s[second][ev.FLOOR]['frechet']:.1f}]" for s in scales.values())
             + " |"]
    for n in names:
        cells = [f"{cell(s[first][n], 'frechet', '.1f')} [{s[second][n]['frechet']:.1f}]" if n in s[first] else ""
                 for s in scales.values()]
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def score(args, folder: str, runs: dict, judges: dict, real: torch.Tensor, floor: torch.Tensor,
          floor_labels: torch.Tensor, text: list[str]) -> dict:
    """One family's setting (CFG scale, sampler), stored in `folder`: each judge's table (and the shipped judge's
    on the first --subsets per class), appended to `text` as markdown; the class grids written."""
    title = f"{args.family}, CFG {args.cfg:g}" + ("" if args.sampler == SAMPLER else f", {args.sampler}")
    samples = {name: from_uint8(r["images"]) for name, r in runs.items()}
    labels = torch.from_numpy(next(iter(runs.values()))["labels"])
    methods = Methods(args)
    costs = {name: methods.gflops(name, torch.arange(10)) for name in samples}
    seconds = {name: float(r["seconds"]) * 1000 / len(labels) for name, r in runs.items()}
    scale = {"gflops": costs, "seconds": seconds}
    for judge_name, judge in judges.items():
        scale[judge_name] = ev.judge_table(judge.features, samples, labels, real, floor, floor_labels,
                                           judge.head, args.rounds)
        text += [f"### {title}, {judge_name}\n", markdown(scale[judge_name], costs, seconds), ""]
        print(text[-2], flush=True)
    for n in args.subsets:  # the same ranking from the first n per class of each set (the earlier protocols)
        pick = torch.cat([torch.nonzero(labels == c)[:n, 0] for c in range(10)])
        sub_floor = torch.cat([torch.nonzero(floor_labels == c)[:n, 0] for c in range(10)])
        judge = judges["shipped classifier"]
        scale[f"shipped classifier, {n} per class"] = table = ev.judge_table(
            judge.features, {k: v[pick] for k, v in samples.items()}, labels[pick], real, floor[sub_floor],
            floor_labels[sub_floor], judge.head, args.rounds)
        text += [f"### {title}, shipped classifier, {10 * n} samples per method\n",
                 markdown(table, costs, seconds), ""]
    for method, images in samples.items():
        ev.save_class_grid(images, args.per_class, Path(args.out) / f"{args.family}_{folder}_{method}.png")
    return scale


def pooled_pixels(x: torch.Tensor) -> torch.Tensor:
    """The features of the consistency rules: a 28x28 digit 2x2-pooled to 14x14 (a 14x14 one as it is), as pixels."""
    return (F.avg_pool2d(x, 2) if x.shape[-1] == 28 else x).flatten(1)


def consistency(args) -> None:
    """The rules for `auto` that need no judge, measured: pick the UG weight whose 28x28 samples, 2x2-pooled, are
    distributed most like (a) the 14x14 model's own samples at the same CFG scale (the model's consistency, all a
    user of a new model has) or (b) real digits pooled to 14x14 (the training data's low frequencies). Each is
    Frechet distance and KID in pooled pixels over the 1,000 paired samples, with bootstrap intervals, beside both
    judges' ranking of the weights alone (ties to the best weight) -> <out>/consistency_unet.md and .json."""
    real, floor, floor_labels = ev.judge_sets(per_class=args.per_class)
    classifiers = {"shipped classifier": ev.load_mnist_classifier(),
                   "independent judge": ev.load_mnist_classifier(args.judge)}
    result, text = {}, []
    for folder in sorted((Path(args.samples) / "unet").glob("cfg*"), key=setting_order):
        weights = sorted((p.stem for p in folder.glob("ug*.npz") if re.fullmatch(r"ug[0-9.]+", p.stem)),
                         key=lambda n: float(n[2:]))
        if not weights:
            continue
        samples = {n: from_uint8(np.load(folder / f"{n}.npz")["images"]) for n in weights}
        small = from_uint8(np.load(folder / SMALL)["images"])
        rules = {"the 14x14 model's samples": ev.judge_table(pooled_pixels, samples, None, small, floor,
                                                              rounds=args.rounds),
                 "real digits, pooled": ev.judge_table(pooled_pixels, samples, None, real, floor,
                                                       rounds=args.rounds)}
        labels = torch.from_numpy(np.load(folder / f"{weights[0]}.npz")["labels"])
        judges = {name: ev.judge_table(j.features, samples, labels, real, floor, floor_labels, j.head, args.rounds)
                  for name, j in classifiers.items()}
        result[folder.name] = {"rules": rules, "judges": judges, "weights": weights}
        lines = [f"### unet, {folder.name}\n", "| w | " + " | ".join(
            f"pooled vs {r}: Frechet | KID" for r in rules) + " | " + " | ".join(f"{j}: Frechet" for j in judges)
            + " |", "| --- " * (1 + 2 * len(rules) + len(judges)) + "|"]
        for n in weights:
            cells = [cell(t[n], m, f) for t in rules.values() for m, f in (("frechet", ".2f"), ("kid", ".4f"))]
            cells += [cell(j[n], "frechet", ".1f") for j in judges.values()]
            lines.append(f"| {n[2:]} | " + " | ".join(cells) + " |")
        floor_row = rules["the 14x14 model's samples"][ev.FLOOR]
        lines += ["", f"Real digits pooled vs the 14x14 model's samples (the low model's own gap): Frechet "
                  f"{floor_row['frechet']:.2f}.", ""]
        text += lines
        print("\n".join(lines), flush=True)
    (Path(args.out) / "consistency_unet.json").write_text(json.dumps(result, indent=1))
    (Path(args.out) / "consistency_unet.md").write_text(
        "Written by `python experiments/upsample_guidance.py consistency`. Pooled pixels: the 28x28 samples "
        "2x2-pooled to 14x14, values in [-1, 1]; each cell the estimate and its 95% bootstrap interval, bold: ties "
        "the best of its column. The judges' columns rank the weights alone (bold: ties the best weight).\n\n"
        + "\n".join(text) + "\n")


@torch.no_grad()
def mismatch(args) -> None:
    """How far latent UG's premise is from the LDM's autoencoder: UG takes the 2x2-pooled 16x16 latent of a 64x64
    image for the 8x8 latent of the pooled 32x32 image (exact in pixel space). For real digits x (32x32, padded) and
    X = bicubic x2 of x: the relative error |D[E(X)] - E(D[X])| / |E(D[X])|, the same between two different digits
    (the scale of "unrelated"), and what each latent decodes to against D[X] (pixel RMSE in [-1, 1] units)."""
    pipe = load_pipeline(model_folder(args.low or FAMILIES["latent"]))
    x = MNIST(32, pad=2).images[: args.n]
    X = F.interpolate(x, scale_factor=2, mode="bicubic", align_corners=False).clamp(-1, 1)
    small = F.avg_pool2d(X, 2)
    z_small, z_pooled = pipe.encode(small), F.avg_pool2d(pipe.encode(X), 2)

    def rel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:  # per sample
        return (a - b).flatten(1).norm(dim=1) / b.flatten(1).norm(dim=1)

    def rmse(a: torch.Tensor) -> float:
        return float((a - small).pow(2).mean().sqrt())

    rows = {"pooled latent vs latent of the pooled image": rel(z_pooled, z_small),
            "latents of two different digits": rel(z_small.roll(1, 0), z_small)}
    g = torch.Generator().manual_seed(0)
    result = {k: {"mean": float(v.mean()), "ci": ev.interval(torch.stack(
        [v[torch.randint(len(v), (len(v),), generator=g)].mean() for _ in range(args.rounds)]))}
        for k, v in rows.items()}
    result["decoded pooled latent vs pooled image, RMSE"] = rmse(pipe.decode(z_pooled))
    result["decoded latent of the pooled image vs pooled image, RMSE (the autoencoder's own error)"] = rmse(
        pipe.decode(z_small))
    result["n"] = args.n
    print(json.dumps(result, indent=1))
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "latent_mismatch.json").write_text(json.dumps(result, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    a = sub.add_parser("sample", help="sample the methods not yet saved")
    a.add_argument("--methods", nargs="+", required=True)
    a.add_argument("--per-class", type=int, default=100)
    a.add_argument("--batch", type=int, default=250)
    a.add_argument("--seed", type=int, default=0)
    e = sub.add_parser("time", help="wall-clock seconds per 1,000 digits of each method, alternating rounds")
    for p in (a, e):
        p.add_argument("--family", choices=FAMILIES, default="unet", help="the low-resolution model's kind")
        p.add_argument("--low", help="the low-resolution model (default: the family's)")
        p.add_argument("--high", default="mnist")
        p.add_argument("--sr", default="mnist_sr")
        p.add_argument("--cfg", type=float, default=2.0)
        p.add_argument("--sampler", default=SAMPLER)
        p.add_argument("--steps", type=int, default=20)
    e.add_argument("--methods", nargs="+", required=True)
    e.add_argument("--per-class", type=int, default=10)
    e.add_argument("--rounds", type=int, default=3)
    b = sub.add_parser("report", help="score every saved method")
    b.add_argument("--per-class", type=int, default=100)
    b.add_argument("--rounds", type=int, default=200, help="bootstrap resamples")
    b.add_argument("--subsets", type=int, nargs="*", default=[20], help="also rank the first N per class")
    b.add_argument("--family", nargs="*", choices=FAMILIES, default=[], help="only these (default: all sampled)")
    b.add_argument("--low", help="the low-resolution model (default: the family's)")
    for name, default in (("--high", "mnist"), ("--sr", "mnist_sr")):
        b.add_argument(name, default=default)
    b.add_argument("--steps", type=int, default=20)
    b.add_argument("--cfg", type=float, nargs="*", default=[], help="only these CFG scales (default: all sampled)")
    c = sub.add_parser("mismatch", help="the LDM autoencoder's pooled latent vs the latent of the pooled image")
    c.add_argument("--low", help="the LDM (default: the latent family's)")
    c.add_argument("--n", type=int, default=1000)
    c.add_argument("--rounds", type=int, default=200)
    d = sub.add_parser("consistency", help="the judge-free rules for auto, measured on the stored UNet samples")
    d.add_argument("--per-class", type=int, default=100)
    d.add_argument("--rounds", type=int, default=200)
    for p in (a, b, d):
        p.add_argument("--samples", default="docs/upsample_guidance/samples")
    for p in (b, d):
        p.add_argument("--judge", default="docs/upsample_guidance/judge", help="the independent classifier's folder")
    for p in (b, c, d, e):
        p.add_argument("--out", default="docs/upsample_guidance")
    args = ap.parse_args()
    commands = {"sample": sample, "time": timing, "report": report, "consistency": consistency, "mismatch": mismatch}
    commands[args.command](args)


if __name__ == "__main__":
    main()
