"""A whole text-to-image command at SD-1.5 scale, as users run it (issue 24.2): `diffusekit sample` against a
script doing diffusers' `StableDiffusionPipeline.from_pretrained` + call + PNG save, each a fresh process on the
same SD-1.5-shaped folder (`benchmarks/sd15_folder.py`), same scheduler (DPM-Solver++ 2M), CFG, size, dtype and
threads, alternating. Each side runs at `--steps` a and b; per-step = (T_b - T_a) / (b - a) and fixed = T_a -
a * per-step (process start, imports, loading, text encoding, VAE decode, writing).

    python benchmarks/sd15_folder.py /tmp/sd15
    python benchmarks/sd_generation.py /tmp/sd15 --size 256 --steps 1 3 --rounds 2 --threads 2
    python benchmarks/sd_generation.py /tmp/sd15 --size 512 --steps 1 20 --rounds 1 --dtype bf16
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

TORCH_DTYPES = {"fp32": "float32", "bf16": "bfloat16"}  # our --dtype name -> diffusers' torch_dtype
PROMPT = "a photo of an astronaut riding a horse on the moon"
DIFFUSERS = r"""
import sys, torch
from diffusers import StableDiffusionPipeline
folder, steps, size, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False,
                                               torch_dtype=getattr(torch, sys.argv[6]))
image = pipe(sys.argv[5], num_inference_steps=steps, guidance_scale=7.5, height=size, width=size,
             generator=torch.Generator().manual_seed(0)).images[0]
image.save(out)
"""


def run(cmd: list[str], threads: int) -> float:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false")
    start = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--steps", type=int, nargs=2, default=[1, 3])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", default="fp32", choices=list(TORCH_DTYPES), help="both sides' dtype")
    a = ap.parse_args()
    out = tempfile.mkdtemp()
    sides = {
        "diffusekit": lambda k: [sys.executable, "-m", "diffusekit.cli", "sample", "--model", a.folder, "--prompt",
                                 PROMPT, "--n", "1", "--steps", str(k), "--sampler", "dpmpp_2m", "--cfg", "7.5",
                                 "--height", str(a.size), "--width", str(a.size), "--dtype", a.dtype,
                                 "--outdir", out],
        "diffusers": lambda k: [sys.executable, "-c", DIFFUSERS, a.folder, str(k), str(a.size), f"{out}/d.png",
                                PROMPT, TORCH_DTYPES[a.dtype]],
    }
    times = {(s, k): [] for s in sides for k in a.steps}
    for _ in range(a.rounds):
        for k in a.steps:
            for side, cmd in sides.items():
                times[side, k].append(run(cmd(k), a.threads))
    lo, hi = a.steps
    print(f"{a.size}x{a.size}, {a.dtype}, {a.threads} threads, CFG 7.5, dpmpp_2m; median of {a.rounds} rounds")
    print("| side | total at %d steps | total at %d steps | per step | fixed part |\n| --- | --- | --- | --- | --- |"
          % (lo, hi))
    for side in sides:
        t_lo, t_hi = statistics.median(times[side, lo]), statistics.median(times[side, hi])
        step = (t_hi - t_lo) / (hi - lo)
        print(f"| {side} | {t_lo:.1f} s | {t_hi:.1f} s | {step:.2f} s | {t_lo - lo * step:.1f} s |")


if __name__ == "__main__":
    main()
