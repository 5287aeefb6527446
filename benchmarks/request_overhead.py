"""The web server's per-job overhead: the time from a parsed JSON body to a queued job (`Server.prepare`: the
Request built and checked, the limits, the plan against the model), without sampling, for text-to-image and
img2img bodies (the latter decodes and writes its upload), and the command line's parse into a Request.

    python benchmarks/request_overhead.py --jobs 300
"""

from __future__ import annotations

import argparse
import base64
import io
import statistics
import tempfile
import time

import numpy as np
from PIL import Image

from diffusekit.cli import make_parser, request_of
from diffusekit.server import JobRequest, Limits, Server


def png(pixels: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def timed(f, items) -> tuple[float, float]:
    """Median and 95th percentile, in ms, of f(item) over the items (after 20 warm-up calls)."""
    for item in items[:20]:
        f(item)
    times = []
    for item in items:
        t0 = time.perf_counter()
        f(item)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3, statistics.quantiles(times, n=20)[-1] * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--jobs", type=int, default=300)
    a = p.parse_args()
    digit = png(np.zeros((28, 28), np.uint8))
    with tempfile.TemporaryDirectory() as tmp:
        server = Server(["mnist"], "cpu", "auto", tmp, Limits())
        bodies = {"txt2img": [JobRequest(labels=[k % 10], n=4, seed=k) for k in range(a.jobs)],
                  "img2img": [JobRequest(task="img2img", labels=[k % 10], n=1, seed=k, image=digit)
                              for k in range(a.jobs)]}
        for what, items in bodies.items():
            median, p95 = timed(server.prepare, items)
            print(f"Server.prepare, {what}: median {median:.2f} ms, p95 {p95:.2f} ms")
    argv = ["sample", "--labels", "3", "--n", "4", "--seed", "1"]
    median, p95 = timed(lambda _: request_of(make_parser().parse_args(argv)), list(range(a.jobs)))
    print(f"command line -> Request (parser built each time): median {median:.2f} ms, p95 {p95:.2f} ms")


if __name__ == "__main__":
    main()
