"""Sampling speed of the bundled MNIST model against diffusers' UNet2DModel with the same weights (issue 13).

1. UNet forward: each round times `--reps` forwards of ours (as `diffusekit.acceleration.accelerate` leaves it)
   and of diffusers' eager float32 twin, alternating, at each `--batch` of images with CFG (the network sees
   2 x batch: cond + uncond); the ratio reported is the median over rounds of t_diffusers / t_ours.
2. Sampling-loop overhead: a full `generate` (dpmpp_2m, 20 steps, CFG 3, the README's 40 images) against the
   sum of the network's forward times inside it.
3. Quality (`--accuracy N`): class accuracy of N samples per class under the shipped MNIST classifier, for the
   float32 pipeline and the accelerated one, same seeds.

    python benchmarks/sampling_speed.py --threads 1 --batch 20 200 --rounds 5
    python benchmarks/sampling_speed.py --threads 1 --batch 20 200 --rounds 5 --dtype bf16 --accuracy 50
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from diffusekit.acceleration import accelerate
from diffusekit.bundled import MODELS
from diffusekit.evaluation import class_accuracy, load_mnist_classifier, sample_classes
from diffusekit.interop.diffusers_unet import unet_state_from_diffusers
from diffusekit.pipelines import generate, load_pipeline

from train_throughput import diffusers_twin

BUNDLED = MODELS["mnist"]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def twin_with_weights(net, resolution: int) -> torch.nn.Module:
    """diffusers' UNet2DModel holding `net`'s weights: each diffusers element is tagged with its index, the
    converter (renames, q/k/v fusion, 1x1 conv -> linear) carries the tags over, and they say where ours go."""
    theirs = diffusers_twin(vars(net.config), resolution).float().eval()
    tags, start = {}, 0
    for k, v in theirs.state_dict().items():
        tags[k] = torch.arange(start, start + v.numel(), dtype=torch.float64).reshape(v.shape)
        start += v.numel()
    flat = torch.empty(start, dtype=torch.float32)
    ours = net.state_dict()
    for k, v in unet_state_from_diffusers(tags, net.config).items():
        flat[v.flatten().long()] = ours[k].float().flatten()
    theirs.load_state_dict({k: flat[t.flatten().long()].reshape(t.shape) for k, t in tags.items()})
    return theirs


def time_calls(f, n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        f()
    return (time.perf_counter() - t0) / n


def forward_ratio(ours, theirs, batch: int, rounds: int, reps: int) -> tuple[float, float, float, list[float]]:
    """(ours s, diffusers s, median ratio, ratios) for one network batch of 2 x batch (CFG)."""
    n = 2 * batch
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(n, 1, 28, 28, generator=g), torch.rand(n, generator=g) * 999
    labels = torch.cat([torch.randint(0, 10, (batch,), generator=g), torch.full((batch,), 10)])
    dtype = next(ours.parameters()).dtype
    run_ours = lambda: ours(x.to(dtype), t, class_labels=labels)  # noqa: E731
    run_theirs = lambda: theirs(x, t, class_labels=labels).sample  # noqa: E731
    with torch.inference_mode():
        run_ours(), run_theirs()  # warm-up (and compile)
        times = [(time_calls(run_ours, reps), time_calls(run_theirs, reps)) for _ in range(rounds)]
    ratios = [b / a for a, b in times]
    return statistics.median(a for a, _ in times), statistics.median(b for _, b in times), statistics.median(ratios), ratios


def loop_overhead(pipe) -> tuple[float, float, int]:
    """(wall s, network s, calls) of the README's sampling run: 40 images, dpmpp_2m, 20 steps, CFG 3."""
    spent = []
    pre = pipe.net.register_forward_pre_hook(lambda m, a: spent.append(-time.perf_counter()))
    post = pipe.net.register_forward_hook(lambda m, a, y: spent.append(time.perf_counter()))
    labels = torch.arange(10).repeat_interleave(4)
    generate(pipe, 40, labels=labels, sampler="dpmpp_2m", steps=20, cfg=3.0,
             generator=torch.Generator().manual_seed(0))  # warm-up
    spent.clear()
    t0 = time.perf_counter()
    generate(pipe, 40, labels=labels, sampler="dpmpp_2m", steps=20, cfg=3.0,
             generator=torch.Generator().manual_seed(0))
    wall = time.perf_counter() - t0
    pre.remove(), post.remove()
    return wall, sum(spent), len(spent) // 2


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, nargs="+", default=[20, 200], help="images per batch (network sees 2x)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--reps", type=int, default=3, help="forwards per round at batch 20 (scaled down for larger)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="our network's compute dtype")
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--accuracy", type=int, default=0, help="samples per class for the class-accuracy check")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    base = load_pipeline(BUNDLED)
    theirs = twin_with_weights(base.net, base.resolution[0])
    pipe = copy.deepcopy(base)
    t0 = time.perf_counter()
    accelerate(pipe, dtype=DTYPES[args.dtype], channels_last=args.channels_last, compile=args.compile)
    with torch.inference_mode():
        x, t, y = torch.randn(4, 1, 28, 28), torch.full((4,), 500.0), torch.arange(4)
        diff = (base.net(x, t, class_labels=y) - theirs(x, t, class_labels=y).sample).abs().max().item()
        pipe.net(x.to(DTYPES[args.dtype]), t, class_labels=y)
    setup = time.perf_counter() - t0
    assert diff < 1e-4, f"the twins differ by {diff}"
    mode = f"{args.dtype}{' channels_last' if args.channels_last else ''}{' compiled' if args.compile else ''}"
    print(f"bundled mnist_unet, ours {mode} vs diffusers fp32 eager, {torch.get_num_threads()} threads; "
          f"fp32 twins agree to {diff:.1e}; accelerate + first call {setup:.1f} s")
    print("| images (network batch) | ours ms | diffusers ms | ratio ours/diffusers (rounds) |")
    print("| --- | --- | --- | --- |")
    for b in args.batch:
        reps = max(1, args.reps * 20 // b)
        a, d, med, ratios = forward_ratio(pipe.net, theirs, b, args.rounds, reps)
        print(f"| {b} ({2 * b}) | {a * 1e3:.0f} | {d * 1e3:.0f} | {med:.2f} ({min(ratios):.2f} - {max(ratios):.2f}) |")
    wall, net, calls = loop_overhead(pipe)
    print(f"generate (40 images, dpmpp_2m, 20 steps, CFG 3): {wall:.2f} s, network {net:.2f} s in {calls} calls, "
          f"loop overhead {100 * (wall - net) / wall:.2f}%")
    if args.accuracy:
        clf = load_mnist_classifier()
        kw = dict(sampler="dpmpp_2m", steps=20, cfg=3.0)
        for name, p in (("fp32", base), (mode, pipe)):
            images, labels = sample_classes(p, args.accuracy, **kw)
            print(f"class accuracy {name}: {class_accuracy(clf, images, labels):.4f} ({len(labels)} samples)")


if __name__ == "__main__":
    main()
