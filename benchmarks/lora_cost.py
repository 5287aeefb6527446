"""What a LoRA costs on the SD-1.5 UNet (issue 26.1): merging it into the weights (and taking it off again,
bit-exactly), the memory of the kept originals, and the per-step overhead of the unmerged path (forward hooks)
against the plain forward, side by side in one process, alternating round by round.

The LoRA is a kohya file of rank `--rank` on every attention projection (to_q, to_k, to_v, to_out.0), proj_in /
proj_out and the feed-forward layers, as kohya's SD-1.5 LoRAs adapt (seeded random factors; 2 x 77 x 768 context).

    python benchmarks/lora_cost.py --threads 2 --size 64 --rank 16 --rounds 3
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from diffusekit.denoisers import DiffusionSettings
from diffusekit.pipelines import Pipeline
from diffusekit.pipelines.lora import LoRAs

TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2")


def kohya_lora(unet, rank: int, path: Path) -> int:
    """A kohya LoRA file of `rank` on the TARGETS of a diffusers UNet -> its number of layers."""
    g, state = torch.Generator().manual_seed(0), {}
    for name, m in unet.named_modules():
        if name.endswith(TARGETS) and "attentions" in name:
            key = "lora_unet_" + name.replace(".", "_")
            w = m.weight
            state[f"{key}.lora_down.weight"] = 0.01 * torch.randn(rank, *w.shape[1:], generator=g)
            state[f"{key}.lora_up.weight"] = 0.01 * torch.randn(w.shape[0], rank, *w.shape[2:], generator=g)
            state[f"{key}.alpha"] = torch.tensor(float(rank))
    save_file(state, path)
    return len(state) // 3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--size", type=int, default=64, help="latent side (64: 512x512 images)")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from sd_unet_speed import pair  # noqa: E402  (benchmarks/ is the script's folder)

    ours, theirs = pair(torch.device("cpu"))
    pipe = Pipeline(ours, DiffusionSettings(schedule="scaled_linear"), (8 * args.size,) * 2, 3)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "lora.safetensors"
        layers = kohya_lora(theirs, args.rank, path)
        del theirs
        g = torch.Generator().manual_seed(1)
        x, ctx = torch.randn(2, 4, args.size, args.size, generator=g), torch.randn(2, 77, 768, generator=g)
        t = torch.tensor([500.0, 500.0])
        before = {k: v.clone() for k, v in ours.state_dict().items()}

        def forward():
            with torch.no_grad():
                return ours(x, t, context=ctx)

        start = time.perf_counter()
        merged = LoRAs(pipe, [(path, 1.0)])
        merge_s = time.perf_counter() - start
        kept = sum(v.numel() * v.element_size() for v in merged.saved.values())
        start = time.perf_counter()
        merged.remove()
        remove_s = time.perf_counter() - start
        exact = all(torch.equal(v, before[k]) for k, v in ours.state_dict().items())
        plain, hooked = [], []
        forward()
        for _ in range(args.rounds):
            start = time.perf_counter()
            forward()
            plain.append(time.perf_counter() - start)
            with LoRAs(pipe, [(path, 1.0)], merge=False):
                start = time.perf_counter()
                forward()
                hooked.append(time.perf_counter() - start)
    weights = sum(p.numel() * p.element_size() for p in ours.parameters())
    print(f"SD-1.5 UNet, {layers} LoRA layers of rank {args.rank}, {args.threads} threads, batch 2, "
          f"{args.size}x{args.size} latents, fp32")
    print(f"merge {merge_s:.2f} s, remove {remove_s:.2f} s (bit-exact: {exact}); originals kept "
          f"{kept / 2**20:.0f} MiB = {kept / weights:.0%} of the UNet's {weights / 2**20:.0f} MiB")
    print(f"forward plain {statistics.median(plain):.2f} s, unmerged LoRA {statistics.median(hooked):.2f} s: "
          f"overhead {statistics.median(h / p for h, p in zip(hooked, plain)) - 1:+.1%} per step "
          f"(rounds {[f'{h / p:.3f}' for h, p in zip(hooked, plain)]})")


if __name__ == "__main__":
    main()
