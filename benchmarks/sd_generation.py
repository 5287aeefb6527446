"""A whole text-to-image command at SD-1.5 scale, as users run it (issue 24.2): `diffusekit sample` against a
script doing diffusers' `StableDiffusionPipeline.from_pretrained` + call + PNG save, each a fresh process on the
same SD-1.5-shaped folder (`benchmarks/sd15_folder.py`), same scheduler (DPM-Solver++ 2M), CFG, size, dtype and
threads, alternating. Each side runs at `--steps` a and b; per-step = (T_b - T_a) / (b - a) and fixed = T_a -
a * per-step. Each run also times its parts at b steps (process start, imports, loading, text encoder, UNet,
VAE decode, writing, the rest): each side's child wraps timers around the calls it makes, our command line's
(`cli.main` with its `load_model` and `write`, the text encoder's and UNet's forward, `Pipeline.decode`) and
diffusers' (`from_pretrained`, `encode_prompt`, `unet.forward`, `vae.decode`, the PNG save).

    python benchmarks/sd15_folder.py /tmp/sd15
    python benchmarks/sd_generation.py /tmp/sd15 --size 256 --steps 1 3 --rounds 2 --threads 2
    python benchmarks/sd_generation.py /tmp/sd15 --size 512 --steps 1 20 --rounds 1 --dtype bf16
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

TORCH_DTYPES = {"fp32": "float32", "bf16": "bfloat16"}  # our --dtype name -> diffusers' torch_dtype
PROMPT = "a photo of an astronaut riding a horse on the moon"

# Each side runs as a child with timers around the parts of its work: sys.argv[1] is the parent's time.time() at
# launch, the rest the side's own arguments; it prints its parts' seconds as JSON.
TIMERS = r"""
import json, sys, time
launched, started = float(sys.argv[1]), time.time()
parts = dict(start=started - launched, imports=0.0, load=0.0, text_encoder=0.0, unet=0.0, vae_decode=0.0,
             writing=0.0)
def timed(part, fn):
    def timed_call(*args, **kwargs):
        t = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            parts[part] += time.perf_counter() - t
    return timed_call
def report():
    parts["other"] = time.time() - launched - sum(parts.values())
    print(json.dumps(parts))
"""
OURS = TIMERS + r"""
import diffusekit.cli as cli
parts["imports"] = time.time() - started
def load_model(*args, **kwargs):
    pipe, dtype = load(*args, **kwargs)
    pipe.text_encoder.forward = timed("text_encoder", pipe.text_encoder.forward)
    pipe.net.forward = timed("unet", pipe.net.forward)
    pipe.decode = timed("vae_decode", pipe.decode)
    return pipe, dtype
load, cli.load_model, cli.write = cli.load_model, timed("load", load_model), timed("writing", cli.write)
sys.argv = ["diffusekit"] + sys.argv[2:]
cli.main()
report()
"""
DIFFUSERS = TIMERS + r"""
import torch
from diffusers import StableDiffusionPipeline
parts["imports"] = time.time() - started
folder, steps, size, out = sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
pipe = timed("load", StableDiffusionPipeline.from_pretrained)(folder, safety_checker=None,
    requires_safety_checker=False, torch_dtype=getattr(torch, sys.argv[7]))
pipe.encode_prompt = timed("text_encoder", pipe.encode_prompt)
pipe.unet.forward = timed("unet", pipe.unet.forward)
pipe.vae.decode = timed("vae_decode", pipe.vae.decode)
image = pipe(sys.argv[6], num_inference_steps=steps, guidance_scale=7.5, height=size, width=size,
             generator=torch.Generator().manual_seed(0)).images[0]
timed("writing", image.save)(out)
report()
"""


def run(script: str, args: list[str], threads: int) -> dict[str, float]:
    """Seconds per part of one run of a side's child (`OURS`, `DIFFUSERS`) in a fresh process, and its total."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false")
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", script, repr(time.time()), *args], check=True, capture_output=True,
                          text=True, env=env)
    return dict(json.loads(done.stdout.strip().splitlines()[-1]), total=time.perf_counter() - start)


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
        "diffusekit": lambda k: (OURS, ["sample", "--model", a.folder, "--prompt", PROMPT, "--n", "1", "--steps",
                                        str(k), "--sampler", "dpmpp_2m", "--cfg", "7.5", "--height", str(a.size),
                                        "--width", str(a.size), "--dtype", a.dtype, "--outdir", out]),
        "diffusers": lambda k: (DIFFUSERS, [a.folder, str(k), str(a.size), f"{out}/d.png", PROMPT,
                                            TORCH_DTYPES[a.dtype]]),
    }
    times = {(s, k): [] for s in sides for k in a.steps}
    for _ in range(a.rounds):
        for k in a.steps:
            for side, cmd in sides.items():
                times[side, k].append(run(*cmd(k), a.threads))
    lo, hi = a.steps
    print(f"{a.size}x{a.size}, {a.dtype}, {a.threads} threads, CFG 7.5, dpmpp_2m; median of {a.rounds} rounds")
    print("| side | total at %d steps | total at %d steps | per step | fixed part |\n| --- | --- | --- | --- | --- |"
          % (lo, hi))
    for side in sides:
        t_lo, t_hi = (statistics.median(r["total"] for r in times[side, k]) for k in (lo, hi))
        step = (t_hi - t_lo) / (hi - lo)
        print(f"| {side} | {t_lo:.1f} s | {t_hi:.1f} s | {step:.2f} s | {t_lo - lo * step:.1f} s |")
    names = list(times["diffusekit", hi][0])
    print(f"\nAt {hi} steps, seconds per part (median of the rounds):\n| side | " + " | ".join(names) + " |\n|"
          + " --- |" * (len(names) + 1))
    for side in sides:
        print(f"| {side} | " + " | ".join(f"{statistics.median(r[k] for r in times[side, hi]):.2f}" for k in names)
              + " |")


if __name__ == "__main__":
    main()
