"""Command line: each subcommand parses its options into the library's own objects (a `Request`, a config)
and calls the library; the options and their defaults are the request's own (`diffusekit.requests`)."""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import time
from typing import Any, Callable

import torch

from . import defaults
from .acceleration import keep_freed_memory
from .bundled import CLASSIFIERS, MODELS, classifier_folder, model_folder
from .outputs import OUTDIR, Destination, read_request, version, write, write_sweep
from .pipelines import load_classifier
from .requests import (CHECKS, FIELDS, MAX_AXES, SWEEPABLE, Limits, Request, above_training_size, embedding_file,
                       load_model, lora_file, parse_sweep, plan, run, sweep_runs, sweep_spec, task_of)
from .samplers import DDPM_VARIANCES, SAMPLERS, get_sampler, taking
from .schedules import SCHEDULES, SPACINGS, make_schedule
from .validation import Check, at_least, within

TASKS = {  # the subcommands that run a Request, and what each does
    "sample": "generate a PNG grid and its images from a trained model (text-to-image, class-conditional, ...)",
    "img2img": "image-to-image (SDEdit): noise an input image part of the way and denoise it under the conditions",
    "inpaint": "regenerate the white part of a mask in an input image, keeping the rest",
    "outpaint": "extend an input image's canvas (--outpaint left=PX,right=PX,top=PX,bottom=PX) and fill the new area",
    "upscale": "super-resolution: a model conditioned on the low-resolution image (bundled: mnist_sr, 14 -> 28)",
}


def checked(parse: Callable[[str], Any], check: Check | None = None, name: str | None = None) -> Callable[[str], Any]:
    """argparse type: `parse` the text, then refuse a value that `check` (or the request's check of field
    `name`) finds wrong, with its message."""
    check = check or CHECKS[name]

    def convert(text: str) -> Any:
        value = parse(text)
        if problem := check(value):
            raise argparse.ArgumentTypeError(problem)
        return value

    return convert


def field(name: str, parse: Callable[[str], Any] = str) -> Callable[[str], Any]:
    """argparse type of a request field: parsed, then the field's own check (requests.CHECKS)."""
    return checked(parse, name=name)


def ug_weight_or_auto(text: str) -> float | str:
    """argparse type of --upsample-guidance: 'auto' or a number."""
    return text if text == defaults.UG_AUTO else float(text)


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


class Rows(argparse.Action):
    """action='append' whose values replace a list default (restored by --from-png) instead of extending it."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        rows = getattr(namespace, self.dest)
        setattr(namespace, self.dest, (rows if rows is not self.default else []) + [values])


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


def request_of(args: argparse.Namespace) -> Request:
    """The Request that a task subcommand's options describe: its own task, or for `sample` the task of the
    inputs restored by --from-png."""
    fields = {name: getattr(args, name) for name in FIELDS if hasattr(args, name)}
    return Request(**{**fields, "task": args.command if args.command != "sample" else task_of(fields)})


def sample(args: argparse.Namespace) -> None:
    """Generate a labelled grid and its single images from a model folder (or a bundled model's name), each PNG
    recording in a text chunk the parameters that reproduce it (--from-png). Without --out they are written
    to OUTDIR/NNNNN-SEED.png (the next free number NNNNN) and OUTDIR/NNNNN-SEED/000.png, 001.png, ...; with
    --out to OUT and to the folder OUT without its suffix, refused if either exists unless --overwrite."""
    destination = Destination(args.out, args.outdir, args.overwrite)
    destination.check()
    request = request_of(args)  # (its mistakes are found before the model loads)
    pipe, dtype = load_model(request.model, request.device, request.dtype, request.text_encoder, request.compile)
    p = plan(dataclasses.replace(request, dtype=dtype), pipe)
    if above_training_size(p, pipe):
        print(f"hint: the model was trained at {pipe.resolution[0]}x{pipe.resolution[1]}; for larger images try "
              f"--upsample-guidance {defaults.UG_W} (Upsample Guidance, no training needed)")
    t0 = time.perf_counter()
    refiner = load_model(request.refiner, request.device, dtype)[0] if request.refiner else None
    classifier = load_classifier(classifier_folder(request.classifier), pipe) if request.classifier else None
    if args.sweep:
        axes = [parse_sweep(spec) for spec in args.sweep]
        runs = sweep_runs(p.request, axes, pipe, refiner, classifier, progress=True, restore=False)
        path = write_sweep(runs, axes, destination, model_folder(request.model))
        cells = math.prod(len(values) for _, values in axes)
        print(f"{cells} cells of {p.images} images in {time.perf_counter() - t0:.1f} s -> {path} and "
              f"{path.with_suffix('')}{os.sep}")
        return
    images = run(p, pipe, refiner, progress=True, classifier=classifier, restore=False)  # (the process ends)
    path = write(images, p, destination, model_folder(request.model))
    print(f"{p.images} images of {p.request.height}x{p.request.width} in {time.perf_counter() - t0:.1f} s -> "
          f"{path} and {path.with_suffix('')}{os.sep}")


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
    real, real_labels = ev.load_images(args.real, args.resolution)
    if args.model:
        pipe, _ = load_model(args.model, args.device, args.dtype)
        images, labels = ev.sample_classes(pipe, args.n, seed=args.seed, sampler=args.sampler, steps=args.steps,
                                           cfg=args.cfg, progress=True)
    elif args.fake:
        images, labels = ev.load_images(args.fake, args.resolution)
    else:
        raise ValueError("pass --model (samples a class-conditional model), --fake FOLDER or --train-classifier")
    print(json.dumps(ev.evaluate_against_floor(images, labels, real, real_labels, features=features, rounds=args.rounds)))


def train_classifier(args: argparse.Namespace) -> None:
    """Train the noise-aware MNIST classifier of classifier guidance on digits noised by a model's schedule
    (`sample --model M --classifier OUT` then guides that model; the bundled mnist_noisy is this, 3000 steps)."""
    from .training.classifier import save_noisy_classifier, train_noisy_classifier

    folder = model_folder(args.model)
    model, accuracy = train_noisy_classifier(folder, steps=args.steps, seed=args.seed)
    path = save_noisy_classifier(model, folder, accuracy, args.out)
    print(f"noisy classifier: held-out accuracy {', '.join(f'{k} {v:.3f}' for k, v in accuracy.items())} -> {path}")


def train(args: argparse.Namespace) -> None:
    """Train a diffusion model from a TOML / YAML config (resumes from its last checkpoint)."""
    from .training.autoencoder import train_autoencoder
    from .training.config import AutoencoderTrainConfig, load_config
    from .training.diffusion import train as train_diffusion

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
        from .server import serve as run_server
    except ImportError as e:
        raise ValueError(str(e)) from e
    limits = Limits(max_steps=args.max_steps, max_images=args.max_images, max_side=args.max_side,
                    max_queue=args.max_queue)
    run_server(args.model or list(MODELS), args.host, args.port, args.device, args.dtype, args.outdir, limits,
               args.threads, args.token, args.insecure_no_auth, args.lora_dir, args.embedding_dir)


def device_options(p: argparse.ArgumentParser) -> None:
    """--device, and --dtype, the network's compute precision (the sampler's state and update math stay float32)."""
    p.add_argument("--device", default=defaults.DEVICE, type=field("device"),
                   help="torch device (cpu, cuda, cuda:1, mps, ...)")
    p.add_argument("--dtype", default=defaults.DTYPE, type=field("dtype"),
                   help="the network's compute precision; auto is bf16 where the device computes it natively "
                        "(CPUs with AVX512-BF16 / AMX: ~2x float32, the same class accuracy; see BENCHMARKS.md), "
                        "else fp32")


def guidance_options(p: argparse.ArgumentParser, sampler_help: str) -> None:
    """--sampler, --steps, --cfg and --seed: what `sample` and `eval` share."""
    p.add_argument("--sampler", default=defaults.SAMPLER, type=field("sampler"), help=sampler_help)
    p.add_argument("--steps", type=field("steps", int), default=defaults.STEPS,
                   help="sampling steps (dpmpp_2m's 20 match 50 DDIM steps on the bundled model: BENCHMARKS.md)")
    p.add_argument("--cfg", type=field("cfg", float), default=defaults.CFG, help="classifier-free guidance scale")
    p.add_argument("--seed", type=int, default=defaults.SEED, help="random seed")


def sample_options(p: argparse.ArgumentParser, sampler_help: str) -> None:
    """The options of `sample` and of its task variants (img2img, inpaint, upscale): the Request's fields."""
    p.add_argument("--from-png", metavar="PNG", help="rerun the run that wrote this PNG (its grid or one of its "
                                                     "images) with the parameters stored in it; options given "
                                                     "as well override them")
    p.add_argument("--model", default=Request.model, help="model folder, or a bundled model: " + ", ".join(MODELS))
    p.add_argument("--labels", type=parse_labels, help="class labels, e.g. 0-9 or 1,3,7 (class-conditional models)")
    p.add_argument("--prompt", action=Rows, help="prompt (text-conditional models; repeat for rows)")
    p.add_argument("--negative", action=Rows, help="negative prompt (one, or one per prompt)")
    p.add_argument("--prompt-syntax", type=field("prompt_syntax"), default=defaults.PROMPT_SYNTAX,
                   help="a1111: (word:1.3), (word), [word] weights, BREAK, and prompts beyond 77 tokens in chunks "
                        "(docs/prompts.md); plain: brackets are text, prompts are cut at 77 tokens")
    p.add_argument("--n", type=field("n", int), default=defaults.N, help="images per label / prompt (grid columns)")
    guidance_options(p, sampler_help)
    p.add_argument("--classifier", help="classifier guidance by a noise-aware classifier (bundled: "
                                        f"{', '.join(CLASSIFIERS)}); with --cfg 0 it guides the unconditional model")
    p.add_argument("--classifier-scale", type=field("classifier_scale", float), default=defaults.CLASSIFIER_SCALE,
                   help="classifier guidance scale s: eps - s b_t grad log p(y | x_t)")
    p.add_argument("--layout", help="boxes of a layout model: \"red circle 0.1 0.1 0.4 0.4; blue square 0.5 0.5 0.9 "
                                    "0.9\" (class, then x0 y0 x1 y1 as fractions of the width / height from the top "
                                    "left), or the same as JSON")
    p.add_argument("--map", help="semantic map of a map model (a PNG of class indices, or painted in the classes' "
                                 "colours): its size is the output's; larger than the training size it samples "
                                 "convolutionally")
    p.add_argument("--spacing", type=field("spacing"),
                   help=f"timestep spacing: {', '.join(SPACINGS)}; if not given, the model's default")
    p.add_argument("--eta", type=field("eta", float),
                   help=f"DDIM eta for sampler {' and '.join(taking('eta'))}: 0 is deterministic, 1 adds "
                        "DDPM's noise; if not given, the sampler's 0")
    p.add_argument("--variance", type=field("variance"),
                   help=f"DDPM variance for sampler {' and '.join(taking('variance'))}: "
                        f"{', '.join(DDPM_VARIANCES)}; if not given, the sampler's small")
    p.add_argument("--height", type=field("height", int), help="image height, if not the model's training height")
    p.add_argument("--width", type=field("width", int), help="image width, if not the model's training width")
    p.add_argument("--upsample-guidance", type=field("upsample_guidance", ug_weight_or_auto), metavar="W",
                   help=f"Upsample Guidance weight w in [0, {defaults.UG_MAX:g}], or {defaults.UG_AUTO} (the "
                        "measured best: docs/upsample_guidance.md), for sizes s x the training size; -1 is off")
    p.add_argument("--ug-eta", type=field("ug_eta", float), default=defaults.UG_ETA,
                   help="UG acts while t >= (1 - eta) T (latent models: ~0.6)")
    p.add_argument("--interpolate-positions", action="store_true",
                   help="DiT models above their trained size: scale the positions to span the trained grid (with "
                        "--upsample-guidance: docs/upsample_guidance.md)")
    p.add_argument("--cfg-until", type=field("cfg_until", float), default=defaults.CFG_UNTIL, metavar="F",
                   help="classifier-free guidance over the first fraction F of the steps only, the rest at half "
                        "the batch (faster, not exact: docs/fewer_evaluations.md); 1 guides all")
    p.add_argument("--cache", type=field("cache", int), default=defaults.CACHE, metavar="N",
                   help="DeepCache: recompute the UNet's deep features every N steps, reusing them in between "
                        "(faster, not exact: docs/fewer_evaluations.md); 1 is off")
    p.add_argument("--cache-depth", type=field("cache_depth", int), default=defaults.CACHE_DEPTH, metavar="D",
                   help="with --cache: the UNet's blocks above its D-th skip connection run every step")
    p.add_argument("--vae-tile", type=field("vae_tile", int), metavar="PX",
                   help="latent models: decode in overlapping PX x PX tiles (bounded memory, not exact); 0 decodes "
                        f"whole; if not given, whole up to {defaults.DECODE_MEMORY / 2**30:g} GiB of activations")
    p.add_argument("--scale", type=field("scale", int), default=defaults.GRID_SCALE,
                   help="pixel magnification in the grid")
    device_options(p)
    p.add_argument("--compile", action="store_true", help="torch.compile the network (pays off for long runs)")
    p.add_argument("--refiner", metavar="MODEL", help="a second model (SDXL refiner) that finishes the schedule")
    p.add_argument("--refiner-start", type=field("refiner_start", float), default=defaults.REFINER_START,
                   help="the fraction of the steps after which the refiner takes over")
    p.add_argument("--lora", action=Rows, type=checked(str, lora_file), metavar="FILE[:SCALE]",
                   help="a LoRA file (kohya / A1111, LyCORIS LoCon / LoHa / LoKr, diffusers / PEFT) merged into the "
                        "model's UNet and text encoder at SCALE (default 1); repeat for several (docs/lora.md)")
    p.add_argument("--embedding", action=Rows, type=checked(str, embedding_file), metavar="FILE[:TOKEN]",
                   help="a textual-inversion embedding (A1111 .pt / .safetensors, diffusers learned_embeds): TOKEN "
                        "in the prompts reads as its vectors (default: the file's own token, else its name); repeat "
                        "for several (docs/embeddings.md)")
    p.add_argument("--text-encoder", metavar="DIR", help="text encoder folder (tokenizer beside it) for a Stable "
                                                         "Diffusion single file, whose CLIP is not converted")
    p.add_argument("--sweep", action=Rows, type=checked(str, sweep_spec), metavar="OPTION=V1,V2,...",
                   help=f"an X/Y/Z plot: the run once per value of OPTION (repeat for up to {MAX_AXES} axes; one of "
                        f"{', '.join(SWEEPABLE)}), same seed, written as one labelled plot at OUT and each cell's "
                        "grid and images in its folder (docs/sweeps.md)")
    p.add_argument("--out", help="grid image (.png, .jpg, .jpeg or .webp), its images in the folder OUT without "
                                 "suffix; refused if either exists, unless --overwrite")
    p.add_argument("--outdir", default=OUTDIR, help="without --out: the grid is OUTDIR/NNNNN-SEED.png, the next free "
                                                    "number, and its images OUTDIR/NNNNN-SEED/000.png, 001.png, ...")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out and its images")


def make_parser(saved: dict[str, Any] | None = None) -> argparse.ArgumentParser:
    """The `diffusekit` argument parser: one subcommand per function above; `saved` request fields (--from-png)
    are the defaults of `sample` and its task variants."""
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
    p.add_argument("--sampler", default=defaults.SAMPLER, type=field("sampler"), help=sampler_help)
    p.add_argument("--schedule", default="scaled_linear", choices=SCHEDULES, help="noise schedule")
    p.add_argument("--shift", type=float, default=1.0, help="rectified-flow resolution shift")
    p.add_argument("--steps", type=int, default=25, help="sampling steps")
    p.add_argument("--n", type=field("n", int), default=4000, help="number of samples")
    p.add_argument("--seed", type=int, default=defaults.SEED, help="random seed")
    p.add_argument("--out", default="out/demo.png", help="output PNG")

    for name, help in TASKS.items():
        p = command(name, sample, help)
        sample_options(p, sampler_help)
        if name in ("img2img", "inpaint", "outpaint"):
            p.add_argument("--image", dest="input_image", required=saved is None,
                           help="input image (PNG, JPEG, ...): its size is the output's")
            p.add_argument("--strength", type=field("strength", float), default=defaults.STRENGTH[name],
                           help="how far down the schedule the input is noised: 1 starts from pure noise")
        if name == "inpaint":
            p.add_argument("--mask", required=saved is None, help="mask image of the same size: white is regenerated")
        if name == "outpaint":
            p.add_argument("--outpaint", type=field("outpaint"), required=saved is None, metavar="SIDE=PX,...",
                           help="pixels added on each side, e.g. left=128,right=128 (sides: left, right, top, bottom)")
        if name in defaults.MASK_BLUR:
            p.add_argument("--mask-blur", type=field("mask_blur", int), default=defaults.MASK_BLUR[name], metavar="PX",
                           help="regenerate PX pixels into the kept image and blend the seam over 2 PX pixels "
                                "(0: a hard edge, the kept pixels exact)")
        if name == "upscale":
            p.add_argument("--image", dest="input_image", required=saved is None,
                           help="the low-resolution image to upscale")
            p.set_defaults(model="mnist_sr")
        p.set_defaults(**{k: v for k, v in (saved or {}).items() if k != "task"})

    p = command("eval", evaluate, "Frechet distance, KID, precision/recall, class accuracy of samples")
    p.add_argument("--model", help="sample this class-conditional model (folder or bundled name)")
    p.add_argument("--fake", help="folder of generated images")
    p.add_argument("--real", default="mnist", help="'mnist' or a folder of real images")
    p.add_argument("--resolution", type=field("height", int), help="resize images to this size, if not 28")
    p.add_argument("--n", type=field("n", int), default=100, help="samples per class")
    guidance_options(p, sampler_help)
    device_options(p)
    p.add_argument("--inception", help="FID Inception weights (.pth read weights-only, or .safetensors) for "
                                       "Inception features instead of MNIST ones")
    p.add_argument("--rounds", type=checked(int, at_least(10)), default=200,
                   help="bootstrap resamples of the 95%% intervals")
    p.add_argument("--train-classifier", action="store_true", help="train and save the MNIST feature classifier")
    p.add_argument("--classifier-steps", type=field("steps", int), default=2000,
                   help="training steps of the classifier")

    p = command("serve", serve, "a web UI and HTTP API for the models (generate, img2img, inpaint, upscale)")
    p.add_argument("--model", action="append", help="a model folder or bundled name (repeat to serve several); "
                                                    f"if not given, the bundled ones: {', '.join(MODELS)}")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on; off loopback every request must "
                                                       "present the --token (a random one, printed, if not given)")
    p.add_argument("--token", help="a bearer token every request must present (the printed URL carries it for the "
                                   "page); on loopback none is needed unless given")
    p.add_argument("--insecure-no-auth", action="store_true",
                   help="serve off loopback without a token: anyone who reaches the address can use the server")
    p.add_argument("--port", type=checked(int, within(0, 65535)), default=8000, help="port (0: a free one)")
    device_options(p)
    p.add_argument("--outdir", default="out/serve", help="results (as `sample` writes them) and uploaded inputs")
    p.add_argument("--lora-dir", metavar="DIR", help="LoRA files the web UI offers by name (A1111's models/Lora)")
    p.add_argument("--embedding-dir", metavar="DIR", help="textual-inversion files a prompt uses by writing a file's "
                                                          "name (A1111's embeddings/)")
    p.add_argument("--max-steps", type=checked(int, at_least(1)), default=Limits.max_steps,
                   help="the most sampling steps a request may ask")
    p.add_argument("--max-images", type=checked(int, at_least(1)), default=Limits.max_images,
                   help="the most images one request may ask")
    p.add_argument("--max-side", type=checked(int, at_least(0)), default=Limits.max_side,
                   help="the largest image side a request may ask; 0: 8x the largest training side")
    p.add_argument("--max-queue", type=checked(int, at_least(1)), default=Limits.max_queue,
                   help="the most jobs waiting; more get HTTP 429")
    p.add_argument("--threads", type=checked(int, at_least(0)), default=0,
                   help="torch threads for sampling (0: torch's default, all cores)")

    p = command("train-classifier", train_classifier, "train a noise-aware classifier for classifier guidance")
    p.add_argument("--model", default="mnist", help="the diffusion model (folder or bundled name) whose schedule "
                                                    "noises the digits")
    p.add_argument("--steps", type=checked(int, at_least(1)), default=3000, help="training steps of 128 digits")
    p.add_argument("--seed", type=int, default=defaults.SEED, help="random seed")
    p.add_argument("--out", default="out/noisy_classifier", help="the classifier folder to write")

    p = command("train", train, "train a diffusion model (see configs/)")
    p.add_argument("config", help="TOML or YAML config file")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. train.lr=1e-4")
    p.add_argument("--no-resume", action="store_true", help="start afresh even if the run has checkpoints")
    p.add_argument("--force", action="store_true", help="resume even with settings that differ from the checkpoint's")
    return parser


def main(argv: list[str] | None = None) -> None:
    """Run a subcommand. User mistakes (the library's ValueError, OSError, FloatingPointError) end in one
    line on stderr and exit code 1; anything else is a bug and shows its traceback, as all do with --debug.
    Run as the program (argv None), it first sets the process's allocator up for large tensors."""
    if argv is None:
        keep_freed_memory()
    args = make_parser().parse_args(argv)
    try:
        if getattr(args, "from_png", None):
            saved = read_request(args.from_png)
            given = sys.argv[1:] if argv is None else argv
            if "model" not in saved and not any(a == "--model" or a.startswith("--model=") for a in given):
                raise ValueError(f"{args.from_png} names no model file (an A1111 PNG): pass --model as well")
            args = make_parser(saved).parse_args(argv)
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
