"""Training throughput of our UNet against diffusers' UNet2DModel on the same config, same steps.

The two networks are the same function (the diffusers weights are converted into ours and the outputs
compared before timing); each round times `--steps` AdamW training steps of each, alternating, and
the ratio of images per second is reported (median over rounds).

    python benchmarks/train_throughput.py --config configs/mnist_unet.toml --steps 10 --rounds 5
    python benchmarks/train_throughput.py --config configs/mnist_unet.toml --steps 10 --rounds 5 --mixed-precision no

Our step autocasts as the trainer would with the config's `train.mixed_precision` (`--mixed-precision`
overrides it; `auto` is bf16 where the CPU computes it natively); diffusers stays float32, the reference.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch
import torch.nn.functional as F

from diffusekit.checkpoints import load_weights
from diffusekit.models import build
from diffusekit.denoisers import NetworkDenoiser
from diffusekit.interop.diffusers_unet import unet_state_from_diffusers
from diffusekit.schedules import VPSchedule
from diffusekit.training.config import load_config
from diffusekit.training.loop import autocast_enabled


def diffusers_twin(c: dict, resolution: int):
    """diffusers' UNet2DModel with the architecture of our (class-conditional, no cross-attention) config."""
    from diffusers import UNet2DModel

    levels = len(c["channel_mult"])
    attn = set(c.get("attention_levels", []))
    down = tuple("AttnDownBlock2D" if i in attn else "DownBlock2D" for i in range(levels))
    up = tuple("AttnUpBlock2D" if i in attn else "UpBlock2D" for i in reversed(range(levels)))
    heads = c.get("num_heads", 8)
    return UNet2DModel(sample_size=resolution, in_channels=c["in_channels"], out_channels=c["out_channels"],
                       block_out_channels=tuple(c["channels"] * m for m in c["channel_mult"]),
                       layers_per_block=c["num_res_blocks"], down_block_types=down, up_block_types=up,
                       norm_num_groups=c["norm_groups"], attention_head_dim=c["channels"] * c["channel_mult"][-1] // heads,
                       add_attention=c.get("mid_attention", True), num_class_embeds=c["num_classes"] + 1,
                       flip_sin_to_cos=True, freq_shift=0)


def time_steps(step, n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        step()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/mnist_unet.toml")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--mixed-precision", choices=["no", "bf16", "auto"],
                    help="autocast of our step, as the trainer (default: the config's train.mixed_precision)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config(args.config)
    res = cfg.data.resolution
    torch.manual_seed(0)
    theirs = diffusers_twin(cfg.model.config, res)
    ours = build("unet", cfg.model.config, device="meta")
    ours = load_weights(ours, unet_state_from_diffusers(
        {k: v.clone() for k, v in theirs.state_dict().items()}, ours.config), "diffusers twin")
    x = torch.randn(args.batch, cfg.data.channels, res, res)
    t = torch.randint(0, 1000, (args.batch,)).double()
    labels = torch.randint(0, 10, (args.batch,))
    with torch.no_grad():
        diff = (ours(x, t.float(), class_labels=labels) - theirs(x, t, class_labels=labels).sample).abs().max().item()
    assert diff < 1e-4, f"the twins differ by {diff}"
    n_params = sum(p.numel() for p in ours.parameters())
    assert n_params == sum(p.numel() for p in theirs.parameters())

    schedule = VPSchedule.named(cfg.diffusion.schedule)
    denoiser = NetworkDenoiser(ours, schedule, "eps")
    eps = torch.randn_like(x)
    a, b = (c.float().reshape(-1, 1, 1, 1) for c in schedule.alpha_sigma(t))
    opt_ours = torch.optim.AdamW(ours.parameters(), 1e-4)
    opt_theirs = torch.optim.AdamW(theirs.parameters(), 1e-4)

    precision = args.mixed_precision or cfg.train.mixed_precision
    if autocast_enabled(precision, torch.device("cpu")):
        precision, autocast = "bf16", torch.autocast("cpu", torch.bfloat16)
    else:
        precision, autocast = "no", contextlib.nullcontext()

    def step_ours():  # the trainer's loss path: parametrization, network, MSE
        opt_ours.zero_grad(set_to_none=True)
        with autocast:
            loss = denoiser.loss(x, t, eps, {"class_labels": labels}).mean()
        loss.backward()
        opt_ours.step()

    def step_theirs():  # the same work written against diffusers
        opt_theirs.zero_grad(set_to_none=True)
        F.mse_loss(theirs(a * x + b * eps, t, class_labels=labels).sample, eps).backward()
        opt_theirs.step()

    step_ours(), step_theirs()  # warm-up
    ratios, rates = [], []
    for _ in range(args.rounds):
        t_ours, t_theirs = time_steps(step_ours, args.steps), time_steps(step_theirs, args.steps)
        ratios.append(t_theirs / t_ours)
        rates.append((args.batch * args.steps / t_ours, args.batch * args.steps / t_theirs))
    med = statistics.median(ratios)
    ours_rate, theirs_rate = statistics.median(r[0] for r in rates), statistics.median(r[1] for r in rates)
    print(f"{args.config}: {n_params / 1e6:.2f}M parameters, batch {args.batch}, {res}x{res}, "
          f"{torch.get_num_threads()} threads, ours with mixed precision {precision}; outputs agree to {diff:.1e}")
    print(f"diffusekit {ours_rate:.1f} img/s, diffusers {theirs_rate:.1f} img/s, "
          f"speed ratio ours/diffusers = {med:.3f} (median of {args.rounds} rounds: {[round(r, 3) for r in ratios]})")


if __name__ == "__main__":
    main()
