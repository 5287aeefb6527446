"""Peak memory of loading an SD-1.5-shaped pipeline folder in bf16 / fp32 (`load_pipeline`) and as the command
line loads it with `--dtype bf16` (`load_model_bf16`: read in bf16, then `accelerate`d), and of a VAE decode at
1024x1024 (issue 24.4): fp32 tiled where needed (`decode`, the pipeline's default) and whole (`decode_whole`),
and bf16 as the command line runs it (`decode_bf16`); with glibc's default malloc and as the command line sets it
up (`--allocator default kept`). Each
measurement runs in a fresh subprocess (ru_maxrss is a high-water mark), beside the bytes of the loaded weights
and the process's baseline after `import torch, diffusekit`.

    python benchmarks/sd15_folder.py /tmp/sd15
    python benchmarks/sd_memory.py /tmp/sd15 --threads 2 --only bfloat16 float32 load_model_bf16 decode decode_bf16
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = r"""
import json, resource, sys, time, torch
import diffusekit.pipelines as P
from diffusekit.acceleration import keep_freed_memory
from diffusekit.requests import load_model
folder, what = sys.argv[1], sys.argv[2]
torch.set_num_threads(int(sys.argv[3]))
if sys.argv[4] == "kept":  # as the command line runs
    keep_freed_memory()
def rss(): return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
def load(): # as the command line loads (bf16 weights read as bf16, then `accelerate`d), or the library's fp32 / bf16
    if what.endswith("bf16"):
        return load_model(folder, "cpu", "bf16")[0]
    return P.load_pipeline(folder, dtype=getattr(torch, what) if what in ("float32", "bfloat16") else torch.float32)
base = rss()
t = time.perf_counter()
pipe = load()
if what.startswith("decode"):  # decode, decode_bf16: as the pipeline does (tiled where needed); decode_whole: untiled
    loaded, z = rss(), torch.randn(1, 4, 128, 128)
    with torch.inference_mode():
        image = pipe.decode(z, 0 if what == "decode_whole" else None)
    tile = pipe.decode_tile(z) if what != "decode_whole" else None
    out = dict(image=list(image.shape), after_load_gb=loaded, latent_tile=tile)
else:
    mods = [pipe.net, pipe.autoencoder, pipe.text_encoder]
    out = dict(weights_gb=sum(p.numel() * p.element_size() for m in mods for p in m.parameters()) / 2**30)
print(json.dumps(dict(out, what=what, baseline_gb=base, peak_gb=rss(), seconds=time.perf_counter() - t)))
"""


def measure(folder: str, what: str, threads: int, allocator: str) -> dict:
    done = subprocess.run([sys.executable, "-c", CHILD, folder, what, str(threads), allocator], capture_output=True,
                          text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", nargs="*", default=["bfloat16", "float32", "load_model_bf16", "decode", "decode_whole",
                                                  "decode_bf16"])
    ap.add_argument("--allocator", nargs="+", default=["default", "kept"], choices=["default", "kept"],
                    help="glibc's default malloc, or as `diffusekit` sets it (acceleration.keep_freed_memory)")
    a = ap.parse_args()
    for what, allocator in ((w, m) for w in a.only for m in a.allocator):
        r = dict(measure(a.folder, what, a.threads, allocator), allocator=allocator)
        if "weights_gb" in r:
            r["peak_over_weights"] = (r["peak_gb"] - r["baseline_gb"]) / r["weights_gb"]
        print(json.dumps(r), flush=True)
