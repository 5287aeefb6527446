"""Command line: thin subcommands over the library."""

from __future__ import annotations

import argparse
import importlib.metadata
import inspect
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Collection

import torch
from torch import Tensor

from .evaluation import ASSETS
from .samplers import SAMPLERS, get_sampler
from .schedules import BETA_SCHEDULES, SIGMA_GRIDS, make_schedule
from .validation import Check, at_least, available_device, did_you_mean, finite, type_problem, within


def demo(args: argparse.Namespace) -> None:
    """Sample a 2-D Gaussian mixture with its exact denoiser and plot samples against data."""
    from .plots import scatter_png
    from .toy import ring_mixture

    data = ring_mixture()
    schedule = make_schedule(args.schedule, shift=args.shift)
    ts = schedule.timesteps(args.steps)
    g = torch.Generator().manual_seed(args.seed)
    a, b = (c.item() for c in schedule.alpha_sigma(ts[0]))
    x = data.sample(args.n, g, a, b).float()  # the exact marginal at the first time of the grid
    y = get_sampler(args.sampler)(data.denoiser(schedule), x, ts, schedule, generator=g, progress=True)
    real = data.sample(args.n, g)
    nearest = torch.cdist(y.double(), data.means).argmin(1)
    coverage = torch.bincount(nearest, minlength=len(data.means)).double() / args.n
    print(f"{args.sampler}, {args.steps} steps, {args.schedule}: sample mean {y.mean(0).tolist()}, "
          f"data mean {data.mean.tolist()}; covariance error "
          f"{((torch.cov(y.T.double()) - data.cov).norm() / data.cov.norm()).item():.3%}; "
          f"mode shares {[round(c, 3) for c in coverage.tolist()]}")
    path = scatter_png(args.out, [("data", real), (f"{args.sampler} samples", y)],
                       title=f"{args.sampler}, {args.steps} steps, {args.schedule}")
    print(f"wrote {path}")


BUNDLED = {"mnist": ASSETS / "mnist_unet", "mnist14": ASSETS / "mnist_unet_14",  # 28x28, 14x14 class-conditional
           "mnist_sr": ASSETS / "mnist_sr"}  # super-resolution 14x14 -> 28x28
UG_MAX = 10.0  # the largest Upsample Guidance weight accepted (the article's useful range is about 0-1)
SPACINGS = ("leading", "trailing", "linspace", *SIGMA_GRIDS)  # diffusers' timestep spacings, then noise-level grids
VARIANCES = ("small", "large", "learned")  # DDPM's posterior variances
DTYPES = {"auto": None, "fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}  # --dtype: network precision
SAVED: dict[str, Any] = {  # the `sample` options each PNG records and --from-png restores, with their types
    "model": str, "labels": list[int] | None, "prompt": list[str] | None, "negative": list[str] | None, "n": int,
    "seed": int, "sampler": str, "steps": int, "cfg": float, "spacing": str | None, "eta": float | None,
    "variance": str | None, "upsample_guidance": float | None, "ug_eta": float, "height": int, "width": int,
    "scale": int, "input_image": str | None, "mask": str | None, "strength": float | None, "text_encoder": str | None,
    "refiner": str | None, "refiner_start": float, "dtype": str}
TASKS = {  # the subcommands that run `sample`, and what each adds to it
    "sample": "generate a PNG grid and its images from a trained model (text-to-image, class-conditional, ...)",
    "img2img": "image-to-image (SDEdit): noise an input image part of the way and denoise it under the conditions",
    "inpaint": "regenerate the white part of a mask in an input image, keeping the rest",
    "upscale": "super-resolution: a model conditioned on the low-resolution image (bundled: mnist_sr, 14 -> 28)",
}


def checked(parse: Callable[[str], Any], check: Check) -> Callable[[str], Any]:
    """argparse type: `parse` the text, then refuse a value that `check` finds wrong, with its message."""
    def convert(text: str) -> Any:
        value = parse(text)
        if problem := check(value):
            raise argparse.ArgumentTypeError(problem)
        return value

    return convert


positive_int, finite_float, unit_float = checked(int, at_least(1)), checked(float, finite), checked(float, within(0, 1))
device_name = checked(str, available_device)


def ug_weight(text: str) -> float:
    """argparse type: an Upsample Guidance weight, -1 (off) or in [0, UG_MAX]."""
    value = float(text)
    if value != -1 and not 0 <= value <= UG_MAX:
        raise argparse.ArgumentTypeError(f"must be -1 (off) or in [0, {UG_MAX:g}], got {text}")
    return value


def parse_labels(text: str) -> list[int]:
    """argparse type for class labels: '0-9' or '1,3,5' (ranges allowed inside the list)."""
    out: list[int] = []
    for part in text.split(","):
        lo, sep, hi = part.strip().partition("-")
        hi = hi if sep else lo
        if not (lo.isdecimal() and hi.isdecimal() and int(lo) <= int(hi)):
            raise argparse.ArgumentTypeError(f"expected labels like 0-9 or 1,3,7 (ascending ranges), got {text!r}")
        out += range(int(lo), int(hi) + 1)
    return out


def one_of(what: str, names: Collection[str]) -> Callable[[str], str]:
    """argparse type: a name in `names`; others are refused naming the closest one, or all."""
    def check(text: str) -> str:
        if text not in names:
            raise argparse.ArgumentTypeError(f"unknown {what} {text!r}"
                                             f"{did_you_mean(text, names) or '; valid: ' + ', '.join(names)}")
        return text

    return check


class Rows(argparse.Action):
    """action='append' whose values replace a list default (restored by --from-png) instead of extending it."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        rows = getattr(namespace, self.dest)
        setattr(namespace, self.dest, (rows if rows is not self.default else []) + [values])


def samplers_taking(option: str) -> list[str]:
    """The samplers that take the keyword `option` (eta, variance)."""
    return [name for name, f in SAMPLERS.items() if option in inspect.signature(f).parameters]


def sampler_options(args: argparse.Namespace) -> dict[str, Any]:
    """--eta / --variance as sampler keywords, refused for samplers that do not take them."""
    kw = {k: v for k in ("eta", "variance") if (v := getattr(args, k)) is not None}
    for k in kw:
        if args.sampler not in (names := samplers_taking(k)):
            raise ValueError(f"--{k} is an option of sampler {' and '.join(names)}, not of {args.sampler}")
    return kw


def model_folder(name: str) -> Path:
    """The folder of a bundled model's name, or `name` itself if it is a folder (ours or a diffusers pipeline's)
    or a Stable Diffusion single file (.safetensors / .ckpt)."""
    if name in BUNDLED:
        return BUNDLED[name]
    path = Path(name)
    if path.is_dir() or (path.is_file() and path.suffix in (".safetensors", ".ckpt")):
        return path
    raise ValueError(f"--model {name!r} is neither a model folder, a Stable Diffusion .safetensors / .ckpt file "
                     f"nor a bundled model ({', '.join(BUNDLED)}){did_you_mean(name, BUNDLED)}")


def check_conditions(args: argparse.Namespace, pipe) -> None:
    """Refuse --labels / --prompt / --negative that the model would silently ignore, and labels it lacks."""
    kind = ("class-conditional (use --labels)" if pipe.num_classes else
            "text-conditional (use --prompt)" if pipe.text_encoder is not None else "unconditional")
    if (args.prompt or args.negative) and pipe.text_encoder is None:
        raise ValueError(f"--prompt / --negative need a text-conditional model; {args.model} is {kind}")
    if args.labels and not pipe.num_classes:
        raise ValueError(f"--labels needs a class-conditional model; {args.model} is {kind}")
    if args.labels and max(args.labels) >= pipe.num_classes:
        raise ValueError(f"--labels {max(args.labels)} is out of range: {args.model} has {pipe.num_classes} classes "
                         f"(0-{pipe.num_classes - 1})")


def batch(args: argparse.Namespace, pipe) -> tuple[dict[str, Any], list[str] | None, list[dict[str, Any]]]:
    """generate's conditions for --n images per label / prompt (all labels if none given), the grid's row labels,
    and each image's own condition."""
    if pipe.num_classes:
        args.labels = args.labels or list(range(pipe.num_classes))
        own = [{"label": c} for c in args.labels for _ in range(args.n)]
        return {"labels": torch.tensor([o["label"] for o in own])}, [str(c) for c in args.labels], own
    if pipe.text_encoder is None:
        return {}, None, [{}] * args.n
    if not args.prompt:
        raise ValueError("this model is text-conditional: pass --prompt (several allowed)")
    negative = args.negative or [None]
    if len(negative) not in (1, len(args.prompt)):
        raise ValueError(f"pass one --negative, or one per --prompt ({len(args.prompt)}), got {len(negative)}")
    own = [{"prompt": p, "negative": q} for p, q in zip(args.prompt, negative * (len(args.prompt) // len(negative)))
           for _ in range(args.n)]
    return ({"prompts": [o["prompt"] for o in own], "negative": args.negative and [o["negative"] for o in own]},
            args.prompt, own)


def check_out(args: argparse.Namespace) -> None:
    """Refuse an --out that cannot be written, or that exists (or its image folder does) without --overwrite,
    or else an --outdir that cannot be written in."""
    from .images import check_output_path, check_writable

    if not args.out:
        check_writable(args.outdir)
        return
    path = check_output_path(args.out)
    taken = [p for p in (path, path.with_suffix("")) if p.exists()]
    if taken and not args.overwrite:
        raise ValueError(f"{taken[0]} exists: pass --overwrite to replace it, or leave out --out for the next "
                         f"numbered file in {args.outdir}/")


def write_outputs(images: Tensor, args: argparse.Namespace, rows: list[str] | None, own: list[dict[str, Any]],
                  parameters: dict[str, Any]) -> Path:
    """The grid at --out (or the next numbered file in --outdir) and each image, 000.png, 001.png, ..., in the
    folder named after it; each PNG records `parameters`, a single image also its index and own condition."""
    from .images import next_numbered, save_grid, save_image

    grid = Path(args.out) if args.out else next_numbered(args.outdir, str(args.seed))
    folder = grid.with_suffix("")
    for old in folder.glob("*.png"):  # (--overwrite: no image of the run replaced stays behind)
        if old.stem.isdecimal():
            old.unlink()
    for k, (x, mine) in enumerate(zip(images, own)):
        save_image(x, folder / f"{k:03d}.png", {**parameters, "image": {"index": k, **mine}})
    return save_grid(images, grid, nrow=args.n, row_labels=rows, scale=args.scale, parameters=parameters)


def saved_arguments(path: str) -> dict[str, Any]:
    """The `sample` options recorded in a PNG that `sample` wrote, its model as an absolute path unless bundled."""
    from .images import read_parameters

    saved = read_parameters(path)
    if "model" not in saved:
        raise ValueError(f"{path}: its parameters are not those of diffusekit sample (no model)")
    args = {k: v for k, v in saved.items() if k in SAVED}
    for key, value in args.items():
        if problem := type_problem(value, SAVED[key]):
            raise ValueError(f"{path}: parameter {key} {problem}")
    if args["model"] not in BUNDLED and isinstance(saved.get("model_path"), str):
        args["model"] = saved["model_path"]
    if saved.get("diffusekit") != version():
        print(f"note: {path} was written by diffusekit {saved.get('diffusekit')}, this is {version()}")
    if isinstance(saved.get("image"), dict):
        print(f"{path} is image {saved['image'].get('index')} of its run: rerunning the run, whose images are "
              f"numbered as before")
    return args


def task_inputs(args: argparse.Namespace, pipe) -> dict[str, Any]:
    """generate's inputs for img2img / inpaint / upscale from --image (and --mask), whose size sets the output's
    (upscale: times the model's factor); the paths are made absolute for --from-png."""
    from .images import load_image

    if args.command == "upscale" and not pipe.low_res_factor:
        raise ValueError(f"{args.model} is not a super-resolution model; for larger images of a model use sample "
                         "--height/--width with --upsample-guidance")
    if getattr(args, "input_image", None) is None:
        return {}
    image, f = load_image(args.input_image, pipe.channels), pipe.low_res_factor
    args.height, args.width = (args.height or image.shape[-2] * (f or 1)), (args.width or image.shape[-1] * (f or 1))
    args.input_image = str(Path(args.input_image).resolve())
    if f:
        return {"low_res": image}
    inputs = {"image": image, "strength": args.strength}
    if getattr(args, "mask", None) is not None:
        inputs["mask"] = (load_image(args.mask, 1) + 1) / 2
        args.mask = str(Path(args.mask).resolve())
    return inputs


def load(folder: Path, args: argparse.Namespace, **kw: Any) -> Any:
    """load_pipeline on args.device in args.dtype (resolving 'auto' in args to the precision used: bf16 where
    the device computes it natively, else fp32), torch.compiled with args.compile."""
    from .acceleration import accelerate, native_dtype
    from .pipelines.common import load_pipeline

    if args.dtype == "auto":
        args.dtype = "bf16" if native_dtype(args.device) == torch.bfloat16 else "fp32"
    pipe = load_pipeline(folder, args.device, **kw)
    return accelerate(pipe, dtype=DTYPES[args.dtype], compile=getattr(args, "compile", False))


def plan(args: argparse.Namespace, pipe) -> tuple[dict[str, Any], dict[str, Any], list[str] | None,
                                                  list[dict[str, Any]]]:
    """Check `sample`'s options against the loaded model and resolve them (size, labels): generate's task
    inputs (image, mask, low_res) and its other keywords but the generator, the grid's row labels, and each
    image's own condition. Raises ValueError for what the model cannot do, before any sampling."""
    from .pipelines.common import check_inputs

    sampler_kw = sampler_options(args)
    check_conditions(args, pipe)
    inputs = task_inputs(args, pipe)
    args.height, args.width = args.height or pipe.resolution[0], args.width or pipe.resolution[1]
    conditions, rows, own = batch(args, pipe)
    check_inputs(pipe, len(own), args.height, args.width, inputs.get("image"), inputs.get("mask"),
                 inputs.get("low_res"), args.upsample_guidance)
    kw = dict(**conditions, height=args.height, width=args.width, sampler=args.sampler, steps=args.steps,
              cfg_scale=args.cfg, spacing=args.spacing, upsample_guidance=args.upsample_guidance, ug_eta=args.ug_eta,
              **sampler_kw)
    return inputs, kw, rows, own


def recorded(args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    """The parameters each PNG of a run records: `sample`'s options (SAVED), which --from-png restores."""
    return {**{k: getattr(args, k, None) for k in SAVED}, "model_path": str(Path(folder).resolve()),
            "device": args.device, "diffusekit": version()}


def sample(args: argparse.Namespace) -> None:
    """Generate a labelled grid and its single images from a model folder (or a bundled model's name), each PNG
    recording in a text chunk the parameters that reproduce it (--from-png). Without --out they are written
    to OUTDIR/NNNNN-SEED.png (the next free number NNNNN) and OUTDIR/NNNNN-SEED/000.png, 001.png, ...; with
    --out to OUT and to the folder OUT without its suffix, refused if either exists unless --overwrite."""
    from .pipelines.common import generate

    check_out(args)
    sampler_options(args)  # (its mistakes are found before the model loads)
    folder = model_folder(args.model)
    pipe = load(folder, args, text_encoder=args.text_encoder)
    inputs, kw, rows, own = plan(args, pipe)
    if args.upsample_guidance is None and (args.height > pipe.resolution[0] or args.width > pipe.resolution[1]):
        print(f"hint: the model was trained at {pipe.resolution[0]}x{pipe.resolution[1]}; for larger images try "
              f"--upsample-guidance 0.2 (Upsample Guidance, no training needed)")
    t0 = time.perf_counter()
    kw.update(generator=torch.Generator().manual_seed(args.seed), progress=True)
    if args.refiner:  # the base model runs the schedule up to --refiner-start, the refiner the rest
        refiner = load(model_folder(args.refiner), args)
        z = generate(pipe, len(own), **inputs, **kw, denoising_end=args.refiner_start, output="latent")
        images = generate(refiner, len(own), **kw, denoising_start=args.refiner_start, latents=z)
    else:
        images = generate(pipe, len(own), **inputs, **kw)
    path = write_outputs(images, args, rows, own, recorded(args, folder))
    print(f"{len(own)} images of {args.height}x{args.width} in {time.perf_counter() - t0:.1f} s -> {path} "
          f"and {path.with_suffix('')}{os.sep}")


def evaluate(args: argparse.Namespace) -> None:
    """Train the MNIST feature classifier, or measure a model's samples / a folder against real data."""
    import json

    from . import evaluation as ev

    if args.train_classifier:
        model, acc = ev.train_mnist_classifier(steps=args.classifier_steps)
        path = ev.save_mnist_classifier(model, acc)
        print(f"MNIST classifier: held-out accuracy {acc:.4f} (1,000 digits) -> {path}")
        return
    features = ev.inception_features(args.inception) if args.inception else None
    real, _ = ev.load_images(args.real, args.resolution)
    if args.model:
        pipe = load(model_folder(args.model), args)
        images, labels = ev.sample_classes(pipe, args.n, seed=args.seed, sampler=args.sampler, steps=args.steps,
                                           cfg_scale=args.cfg, progress=True)
    elif args.fake:
        images, labels = ev.load_images(args.fake, args.resolution)
    else:
        raise ValueError("pass --model (samples a class-conditional model), --fake FOLDER or --train-classifier")
    metrics = ev.evaluate_samples(images, real, labels, features=features)
    print(json.dumps({k: round(v, 5) for k, v in metrics.items()}))


def train(args: argparse.Namespace) -> None:
    """Train a diffusion model from a TOML / YAML config (resumes from its last checkpoint)."""
    from .training.autoencoder import train_autoencoder
    from .training.config import AutoencoderTrainConfig, load_config
    from .training.loop import train as train_diffusion

    cfg = load_config(args.config, args.set)
    run = train_autoencoder if isinstance(cfg, AutoencoderTrainConfig) else train_diffusion
    model = run(cfg, resume=not args.no_resume, force=args.force)
    if int(os.environ.get("RANK", 0)) == 0:  # torchrun: one line, not one per process
        print(f"model written to {model}")


def serve(args: argparse.Namespace) -> None:
    """Serve a web UI (the page at /) and its JSON API (/api/..., schema at /openapi.json) for the models, one
    job at a time on --device: generate, img2img, inpaint with a painted mask, upscale, Upsample Guidance, live
    previews. Results are written to OUTDIR as `sample` writes them, so --from-png reruns them."""
    try:
        from .server import serve as run
    except ImportError as e:
        raise ValueError(str(e)) from e
    run(args)


def version() -> str:
    """The installed package's version (the source tree's when it is not installed)."""
    try:
        return importlib.metadata.version("diffusekit")
    except importlib.metadata.PackageNotFoundError:
        from . import __version__

        return __version__


def device_options(p: argparse.ArgumentParser) -> None:
    """--device, and --dtype, the network's compute precision (the sampler's state and update math stay float32)."""
    p.add_argument("--device", default="cpu", type=device_name, help="torch device (cpu, cuda, cuda:1, mps, ...)")
    p.add_argument("--dtype", default="auto", type=one_of("dtype", DTYPES),
                   help="the network's compute precision; auto is bf16 where the device computes it natively "
                        "(CPUs with AVX512-BF16 / AMX: ~2x float32, the same class accuracy; see BENCHMARKS.md), "
                        "else fp32")


def sample_options(p: argparse.ArgumentParser, sampler_help: str) -> None:
    """The options of `sample` and of its task variants (img2img, inpaint, upscale)."""
    p.add_argument("--from-png", metavar="PNG", help="rerun the run that wrote this PNG (its grid or one of its "
                                                     "images) with the parameters stored in it; options given "
                                                     "as well override them")
    p.add_argument("--model", default="mnist", help="model folder, or a bundled model: " + ", ".join(BUNDLED))
    p.add_argument("--labels", type=parse_labels, help="class labels, e.g. 0-9 or 1,3,7 (class-conditional models)")
    p.add_argument("--prompt", action=Rows, help="prompt (text-conditional models; repeat for rows)")
    p.add_argument("--negative", action=Rows, help="negative prompt (one, or one per prompt row)")
    p.add_argument("--n", type=positive_int, default=8, help="images per label / prompt (grid columns)")
    p.add_argument("--sampler", default="dpmpp_2m", type=one_of("sampler", SAMPLERS), help=sampler_help)
    p.add_argument("--steps", type=positive_int, default=20,
                   help="sampling steps (dpmpp_2m's 20 match 50 DDIM steps on the bundled model: BENCHMARKS.md)")
    p.add_argument("--spacing", type=one_of("spacing", SPACINGS),
                   help=f"timestep spacing: {', '.join(SPACINGS)}; if not given, the model's default")
    p.add_argument("--eta", type=unit_float,
                   help=f"DDIM eta for sampler {' and '.join(samplers_taking('eta'))}: 0 is deterministic, 1 adds "
                        "DDPM's noise; if not given, the sampler's 0")
    p.add_argument("--variance", type=one_of("variance", VARIANCES),
                   help=f"DDPM variance for sampler {' and '.join(samplers_taking('variance'))}: "
                        f"{', '.join(VARIANCES)}; if not given, the sampler's small")
    p.add_argument("--cfg", type=finite_float, default=3.0, help="classifier-free guidance scale")
    p.add_argument("--height", type=positive_int, help="image height, if not the model's training height")
    p.add_argument("--width", type=positive_int, help="image width, if not the model's training width")
    p.add_argument("--upsample-guidance", type=ug_weight, metavar="W",
                   help=f"Upsample Guidance weight w in [0, {UG_MAX:g}] (e.g. 0.2) for sizes s x the training size; "
                        "-1 is off")
    p.add_argument("--ug-eta", type=unit_float, default=1.0,
                   help="UG acts while t >= (1 - eta) T (latent models: ~0.6)")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--scale", type=positive_int, default=2, help="pixel magnification in the grid")
    device_options(p)
    p.add_argument("--compile", action="store_true", help="torch.compile the network (pays off for long runs)")
    p.add_argument("--refiner", metavar="MODEL", help="a second model (SDXL refiner) that finishes the schedule")
    p.add_argument("--refiner-start", type=unit_float, default=0.8,
                   help="the fraction of the steps after which the refiner takes over")
    p.add_argument("--text-encoder", metavar="DIR", help="text encoder folder (tokenizer beside it) for a Stable "
                                                         "Diffusion single file, whose CLIP is not converted")
    p.add_argument("--out", help="grid image (.png, .jpg, .jpeg or .webp), its images in the folder OUT without "
                                 "suffix; refused if either exists, unless --overwrite")
    p.add_argument("--outdir", default="out", help="without --out: the grid is OUTDIR/NNNNN-SEED.png, the next free "
                                                   "number, and its images OUTDIR/NNNNN-SEED/000.png, 001.png, ...")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out and its images")


def make_parser(saved: dict[str, Any] | None = None) -> argparse.ArgumentParser:
    """The `diffusekit` argument parser: one subcommand per function above; `saved` options (--from-png) are
    the defaults of `sample`."""
    parser = argparse.ArgumentParser(prog="diffusekit", description=__doc__)
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    parser.add_argument("--debug", action="store_true", help="show the traceback of errors")
    debug = argparse.ArgumentParser(add_help=False)  # --debug after the subcommand too
    debug.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show the traceback of errors")
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, func, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=func.__doc__, parents=[debug],
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        p.set_defaults(func=func)
        return p

    sampler_help = f"sampler: {', '.join(SAMPLERS)}"
    p = command("demo", demo, "sample a 2-D Gaussian mixture with its exact denoiser, write a PNG")
    p.add_argument("--sampler", default="dpmpp_2m", type=one_of("sampler", SAMPLERS), help=sampler_help)
    p.add_argument("--schedule", default="scaled_linear", choices=sorted(BETA_SCHEDULES) + ["flow"],
                   help="noise schedule")
    p.add_argument("--shift", type=float, default=1.0, help="rectified-flow resolution shift")
    p.add_argument("--steps", type=int, default=25, help="sampling steps")
    p.add_argument("--n", type=positive_int, default=4000, help="number of samples")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--out", default="out/demo.png", help="output PNG")

    for name, help in TASKS.items():
        p = command(name, sample, help)
        sample_options(p, sampler_help)
        if name in ("img2img", "inpaint"):
            p.add_argument("--image", dest="input_image", required=saved is None,
                           help="input image (PNG, JPEG, ...): its size is the output's")
            p.add_argument("--strength", type=unit_float, default=0.6 if name == "img2img" else 1.0,
                           help="how far down the schedule the input is noised: 1 starts from pure noise")
        if name == "inpaint":
            p.add_argument("--mask", required=saved is None, help="mask image of the same size: white is regenerated")
        if name == "upscale":
            p.add_argument("--image", dest="input_image", required=saved is None,
                           help="the low-resolution image to upscale")
            p.set_defaults(model="mnist_sr")
        p.set_defaults(**(saved or {}))

    p = command("eval", evaluate, "Frechet distance, KID, precision/recall, class accuracy of samples")
    p.add_argument("--model", help="sample this class-conditional model (folder or bundled name)")
    p.add_argument("--fake", help="folder of generated images")
    p.add_argument("--real", default="mnist", help="'mnist' or a folder of real images")
    p.add_argument("--resolution", type=positive_int, help="resize images to this size, if not 28")
    p.add_argument("--n", type=positive_int, default=100, help="samples per class")
    p.add_argument("--sampler", default="dpmpp_2m", type=one_of("sampler", SAMPLERS), help=sampler_help)
    p.add_argument("--steps", type=positive_int, default=20,
                   help="sampling steps (dpmpp_2m needs 20 for the class accuracy of 50 DDIM steps)")
    p.add_argument("--cfg", type=finite_float, default=3.0, help="classifier-free guidance scale")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    device_options(p)
    p.add_argument("--inception", help="FID Inception weights (.pth read weights-only, or .safetensors) for "
                                       "Inception features instead of MNIST ones")
    p.add_argument("--train-classifier", action="store_true", help="train and save the MNIST feature classifier")
    p.add_argument("--classifier-steps", type=positive_int, default=2000, help="training steps of the classifier")

    p = command("serve", serve, "a web UI and HTTP API for the models (generate, img2img, inpaint, upscale)")
    p.add_argument("--model", action="append", help="a model folder or bundled name (repeat to serve several); "
                                                    f"if not given, the bundled ones: {', '.join(BUNDLED)}")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (anything but loopback exposes the "
                                                       "server, which has no authentication)")
    p.add_argument("--port", type=checked(int, within(0, 65535)), default=8000, help="port (0: a free one)")
    device_options(p)
    p.add_argument("--outdir", default="out/serve", help="results (as `sample` writes them) and uploaded inputs")
    p.add_argument("--max-steps", type=positive_int, default=100, help="the most sampling steps a request may ask")
    p.add_argument("--max-images", type=positive_int, default=64, help="the most images one request may ask")
    p.add_argument("--max-side", type=checked(int, at_least(0)), default=0,
                   help="the largest image side a request may ask; 0: 8x the largest training side")
    p.add_argument("--max-queue", type=positive_int, default=32, help="the most jobs waiting; more get HTTP 429")
    p.add_argument("--threads", type=checked(int, at_least(0)), default=0,
                   help="torch threads for sampling (0: torch's default, all cores)")

    p = command("train", train, "train a diffusion model (see configs/)")
    p.add_argument("config", help="TOML or YAML config file")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. train.lr=1e-4")
    p.add_argument("--no-resume", action="store_true", help="start afresh even if the run has checkpoints")
    p.add_argument("--force", action="store_true", help="resume even with settings that differ from the checkpoint's")
    return parser


def sample_arguments(command: str = "sample", **options: Any) -> argparse.Namespace:
    """The options of `sample` or of a task variant (img2img, inpaint, upscale) as the command line would
    parse them: its defaults, overridden by `options` (given as parsed values, not checked)."""
    return make_parser(options).parse_args([command])


def main(argv: list[str] | None = None) -> None:
    """Run a subcommand. User mistakes (the library's ValueError, OSError, FloatingPointError) end in one
    line on stderr and exit code 1; anything else is a bug and shows its traceback, as all do with --debug."""
    args = make_parser().parse_args(argv)
    try:
        if getattr(args, "from_png", None):
            args = make_parser(saved_arguments(args.from_png)).parse_args(argv)
        args.func(args)
    except KeyboardInterrupt as e:
        if args.debug:
            raise
        if str(e):
            print(f"diffusekit: {e}", file=sys.stderr)
        sys.exit(130)
    except (ValueError, OSError, FloatingPointError) as e:
        if args.debug:
            raise
        sys.exit("diffusekit: error: " + (" ".join(str(e).split()) or type(e).__name__))


if __name__ == "__main__":
    main()
