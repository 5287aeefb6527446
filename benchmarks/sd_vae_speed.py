"""SD VAE decode: diffusekit's AutoencoderKL against diffusers' holding the same weights (the `vae/` of a folder
from `benchmarks/sd15_folder.py`), side by side in one process, alternating round by round (issue 24.2: the
decode is part of a generation's fixed cost).

Per (dtype, latent size, variant): the ratio is the median over rounds of t_diffusers / t_ours, both decoding the
same latent whole (no tiling). Our variants are those of `sd_unet_speed.py` (`auto` is what `diffusekit --dtype`
runs); diffusers runs eager (NCHW), as in `sd_unet_speed.py`. The error is the
largest absolute difference from diffusers' fp32 decode (images in [-1, 1]), diffusers' own beside it.

    python benchmarks/sd15_folder.py /tmp/sd15
    python benchmarks/sd_vae_speed.py /tmp/sd15 --threads 2 --size 64 --dtype bf16 fp32 --variants eager auto
"""

from __future__ import annotations

import argparse
import copy
import statistics
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from diffusekit.acceleration import keep_freed_memory, native_dtype
from diffusekit.interop.diffusers_vae import load_diffusers_vae
from sd_unet_speed import COUNTED_TOO, DTYPES, best_time, matmul_peak, variant


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", help="a diffusers pipeline folder (its vae/ is used) or a vae folder")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--size", type=int, nargs="+", default=[64], help="latent size (64: 512x512 images)")
    ap.add_argument("--dtype", nargs="+", default=["bf16", "fp32"], choices=DTYPES)
    ap.add_argument("--variants", nargs="+", default=["eager", "auto"],
                    choices=["eager", "channels_last", "blocked", "auto"])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--keep-freed-memory", action="store_true", help="glibc's malloc as `diffusekit` sets it")
    a = ap.parse_args()
    import diffusers

    if a.keep_freed_memory:
        keep_freed_memory()
    if a.threads:
        torch.set_num_threads(a.threads)
    folder = Path(a.folder) / "vae" if (Path(a.folder) / "vae").is_dir() else Path(a.folder)
    ours32, theirs32 = load_diffusers_vae(folder).eval(), diffusers.AutoencoderKL.from_pretrained(folder).eval()
    cpu = torch.device("cpu")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {torch.backends.cpu.get_cpu_capability()}, "
          f"diffusers {diffusers.__version__} eager")
    print("| dtype | latent | variant | ours | diffusers | ratio (rounds) | GFLOP | ours GFLOP/s | % of matmul peak | "
          "max err vs fp32 (diffusers') |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for size in a.size:
        z = torch.randn(1, 4, size, size, generator=torch.Generator().manual_seed(size))
        with torch.inference_mode():
            ref = theirs32.decode(z).sample
        for dname in a.dtype:
            dtype = DTYPES[dname]
            if dtype != torch.float32 and native_dtype(cpu) != dtype:
                print(f"| {dname} | skipped: no native {dname} ({torch.backends.cpu.get_cpu_capability()}) |"
                      + " |" * 7)
                continue
            peak, zd = matmul_peak(dtype, cpu), z.to(dtype)
            ours, theirs = (copy.deepcopy(m).to(dtype) for m in (ours32, theirs32))  # both from the fp32 weights
            with torch.inference_mode():
                with FlopCounterMode(display=False, custom_mapping=COUNTED_TOO) as counter:
                    ours.decode(zd)
                flops = counter.get_total_flops()
                peer = lambda: theirs.decode(zd).sample  # noqa: E731
                peer_err = (peer().float() - ref).abs().max().item()
                for vname in a.variants:
                    with torch.inference_mode(False):  # copied weights keep their version counters
                        fn = variant(Decoding(ours), vname, (zd,))
                    err = (fn().float() - ref).abs().max().item()
                    mine, theirs_t = [], []
                    for _ in range(a.rounds):
                        mine.append(best_time(fn, cpu))
                        theirs_t.append(best_time(peer, cpu))
                    rounds = [p / m for p, m in zip(theirs_t, mine)]
                    tm = statistics.median(mine)
                    print(f"| {dname} | {size} | {vname} | {tm:.2f} s | {statistics.median(theirs_t):.2f} s | "
                          f"{statistics.median(rounds):.2f} ({min(rounds):.2f} - {max(rounds):.2f}) | {flops / 1e9:.0f}"
                          f" | {flops / tm / 1e9:.0f} | {100 * flops / tm / peak:.0f}% of {peak / 1e9:.0f} | "
                          f"{err:.1e} ({peer_err:.1e}) |", flush=True)


class Decoding(torch.nn.Module):
    """The autoencoder with decode as its forward, for `sd_unet_speed.variant` (which converts a module's copy)."""

    def __init__(self, autoencoder: torch.nn.Module):
        super().__init__()
        self.autoencoder = autoencoder

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.autoencoder.decode(z)


if __name__ == "__main__":
    main()
