"""Peak memory of loading an SD-1.5-shaped pipeline folder in bf16 / fp32, and of a VAE decode at 1024x1024
(issue 24.4), tiled where needed (`decode`, the pipeline's default) and whole (`decode_whole`), with glibc's
default malloc and as the command line sets it up (`--allocator default kept`). Each
measurement runs in a fresh subprocess (ru_maxrss is a high-water mark), beside the bytes of the loaded weights
and the process's baseline after `import torch, diffusekit`.

    python benchmarks/sd15_folder.py /tmp/sd15
    python benchmarks/sd_memory.py /tmp/sd15 --threads 2 --only bfloat16 float32 decode decode_whole
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
torch.set_num_threads(int(sys.argv[3]))
if sys.argv[4] == "kept":  # as the command line runs
    keep_freed_memory()
def rss(): return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
base, what = rss(), sys.argv[2]
t = time.perf_counter()
if what.startswith("decode"):  # decode: as the pipeline does (tiled where needed), decode_whole: untiled
    pipe = P.load_pipeline(sys.argv[1], dtype=torch.float32)
    loaded, z = rss(), torch.randn(1, 4, 128, 128)
    with torch.inference_mode():
        image = pipe.decode(z, 0 if what == "decode_whole" else None)
    out = dict(image=list(image.shape), after_load_gb=loaded, latent_tile=pipe.decode_tile(z) if what == "decode" else None)
else:
    pipe = P.load_pipeline(sys.argv[1], dtype=getattr(torch, what))
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
    ap.add_argument("--only", nargs="*", default=["bfloat16", "float32", "decode", "decode_whole"])
    ap.add_argument("--allocator", nargs="+", default=["default", "kept"], choices=["default", "kept"],
                    help="glibc's default malloc, or as `diffusekit` sets it (acceleration.keep_freed_memory)")
    a = ap.parse_args()
    for what, allocator in ((w, m) for w in a.only for m in a.allocator):
        r = dict(measure(a.folder, what, a.threads, allocator), allocator=allocator)
        if "weights_gb" in r:
            r["peak_over_weights"] = (r["peak_gb"] - r["baseline_gb"]) / r["weights_gb"]
        print(json.dumps(r), flush=True)
