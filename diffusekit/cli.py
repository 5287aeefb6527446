"""Command line: thin subcommands over the library."""

from __future__ import annotations

import argparse
import sys
import time

import torch

from .evaluation import ASSETS
from .samplers import SAMPLERS, get_sampler
from .schedules import BETA_SCHEDULES, make_schedule


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


BUNDLED = {"mnist": ASSETS / "mnist_unet", "mnist14": ASSETS / "mnist_unet_14"}  # 28x28 and 14x14 class-conditional


def parse_labels(text: str) -> list[int]:
    """'0-9' or '1,3,5' (ranges allowed inside the list)."""
    out: list[int] = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        out += list(range(int(lo), int(hi) + 1)) if hi else [int(lo)]
    return out


def sample(args: argparse.Namespace) -> None:
    """Generate a labelled PNG grid from a model folder (or a bundled model's name)."""
    from .images import save_grid
    from .pipelines.common import generate, load_pipeline

    pipe = load_pipeline(BUNDLED.get(args.model, args.model), args.device)
    height, width = args.height or pipe.resolution[0], args.width or pipe.resolution[1]
    labels, prompts, rows = None, None, None
    if pipe.num_classes:
        classes = parse_labels(args.labels) if args.labels else list(range(pipe.num_classes))
        labels, rows = torch.tensor(classes).repeat_interleave(args.n), [str(c) for c in classes]
    elif pipe.text_encoder is not None:
        if not args.prompt:
            raise ValueError("this model is text-conditional: pass --prompt (several allowed)")
        prompts, rows = [p for p in args.prompt for _ in range(args.n)], args.prompt
    n = len(labels) if labels is not None else len(prompts) if prompts else args.n
    if args.upsample_guidance is None and (height > pipe.resolution[0] or width > pipe.resolution[1]):
        print(f"hint: the model was trained at {pipe.resolution[0]}x{pipe.resolution[1]}; for larger images try "
              f"--upsample-guidance 0.2 (Upsample Guidance, no training needed)")
    g = torch.Generator().manual_seed(args.seed)
    t0 = time.perf_counter()
    images = generate(pipe, n, labels=labels, prompts=prompts, negative=args.negative, height=height, width=width,
                      sampler=args.sampler, steps=args.steps, cfg_scale=args.cfg, upsample_guidance=args.upsample_guidance,
                      ug_eta=args.ug_eta, generator=g, progress=True)
    path = save_grid(images, args.out, nrow=args.n, row_labels=rows, scale=args.scale)
    print(f"{n} images of {height}x{width} in {time.perf_counter() - t0:.1f} s -> {path}")


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
        from .pipelines.common import load_pipeline

        pipe = load_pipeline(BUNDLED.get(args.model, args.model), args.device)
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
    from .training.config import load_config
    from .training.loop import train as train_diffusion

    cfg = load_config(args.config, args.set)
    run = train_autoencoder if cfg.model.type.startswith("autoencoder") else train_diffusion
    model = run(cfg, resume=not args.no_resume)
    print(f"model written to {model}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="diffusekit", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="sample a 2-D Gaussian mixture with its exact denoiser, write a PNG")
    p.add_argument("--sampler", default="dpmpp_2m", choices=sorted(SAMPLERS))
    p.add_argument("--schedule", default="scaled_linear", choices=sorted(BETA_SCHEDULES) + ["flow"])
    p.add_argument("--shift", type=float, default=1.0, help="rectified-flow resolution shift")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--n", type=int, default=4000, help="number of samples")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="out/demo.png")
    p.set_defaults(func=demo)

    p = sub.add_parser("sample", help="generate a PNG grid from a trained model")
    p.add_argument("--model", default="mnist", help="model folder, or a bundled model: " + ", ".join(BUNDLED))
    p.add_argument("--labels", help="class labels, e.g. 0-9 or 1,3,7 (class-conditional models)")
    p.add_argument("--prompt", action="append", help="prompt (text-conditional models; repeat for rows)")
    p.add_argument("--negative", action="append", help="negative prompt (one, or one per prompt row)")
    p.add_argument("--n", type=int, default=8, help="images per label / prompt (grid columns)")
    p.add_argument("--sampler", default="ddim", choices=sorted(SAMPLERS))
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--cfg", type=float, default=3.0, help="classifier-free guidance scale")
    p.add_argument("--height", type=int)
    p.add_argument("--width", type=int)
    p.add_argument("--upsample-guidance", type=float, metavar="W",
                   help="Upsample Guidance weight w (e.g. 0.2) for sizes s x the training size; -1 is off")
    p.add_argument("--ug-eta", type=float, default=1.0, help="UG acts while t >= (1 - eta) T (latent models: ~0.6)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scale", type=int, default=2, help="pixel magnification in the grid")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default="out/samples.png")
    p.set_defaults(func=sample)

    p = sub.add_parser("eval", help="Frechet distance, KID, precision/recall, class accuracy of samples")
    p.add_argument("--model", help="sample this class-conditional model (folder or bundled name)")
    p.add_argument("--fake", help="folder of generated images")
    p.add_argument("--real", default="mnist", help="'mnist' or a folder of real images")
    p.add_argument("--resolution", type=int, help="resize images to this size (default: 28)")
    p.add_argument("--n", type=int, default=100, help="samples per class")
    p.add_argument("--sampler", default="ddim", choices=sorted(SAMPLERS))
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--cfg", type=float, default=3.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--inception", help="FID Inception weights (.pth) for Inception features instead of MNIST ones")
    p.add_argument("--train-classifier", action="store_true", help="train and save the MNIST feature classifier")
    p.add_argument("--classifier-steps", type=int, default=2000)
    p.set_defaults(func=evaluate)

    p = sub.add_parser("train", help="train a diffusion model (see configs/)")
    p.add_argument("config", help="TOML or YAML config file")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. train.lr=1e-4")
    p.add_argument("--no-resume", action="store_true", help="start afresh even if the run has checkpoints")
    p.set_defaults(func=train)

    args = parser.parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FloatingPointError) as e:
        sys.exit(f"diffusekit: error: {e}")
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
