"""Load on `diffusekit serve` over loopback against the same work done in-process (issue 14).

The same jobs (class-conditional MNIST, `--n` images each, dpmpp_2m, `--steps`, CFG 3, distinct seeds) run
1. in-process: `generate` and the PNG writing of `sample`, one job after another;
2. through the server: `--clients` threads submit them over HTTP and follow each over server-sent events, as
   the page does, while `--pollers` threads read job states as fast as they can.
Reported: both wall times and the server's overhead, the API's read latency under that load, and the events
per job. The server's images are checked against the in-process ones, pixel for pixel.

    python benchmarks/serve_load.py --jobs 32 --clients 1 8 32
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import torch
from PIL import Image

from diffusekit.cli import load, model_folder, plan, recorded, sample_arguments, write_outputs
from diffusekit.pipelines.common import generate
from diffusekit.server import Limits, background, create_app


def request(k: int, n: int, steps: int) -> dict:
    return {"label": k % 10, "n": n, "steps": steps, "seed": k}


def in_process(jobs: list[dict], outdir: str) -> tuple[float, list[np.ndarray]]:
    """Wall time of the jobs run as `sample` runs them, and each job's first image."""
    pipe = load(model_folder("mnist"), sample_arguments())  # (auto: bf16 where native, as the server)
    firsts = []
    t0 = time.perf_counter()
    for body in jobs:
        a = sample_arguments(labels=[body["label"]], n=body["n"], seed=body["seed"], steps=body["steps"],
                             outdir=outdir)
        inputs, kw, rows, own = plan(a, pipe)
        images = generate(pipe, len(own), **inputs, **kw, generator=torch.Generator().manual_seed(a.seed))
        grid = write_outputs(images, a, rows, own, recorded(a, model_folder("mnist")))
        firsts.append(np.asarray(Image.open(grid.with_suffix("") / "000.png")))
    return time.perf_counter() - t0, firsts


def follow(http: httpx.Client, base: str, body: dict) -> tuple[dict, int]:
    """Submit a job and follow its events to the end: the final job and the number of events."""
    job = http.post(f"{base}/api/jobs", json=body).raise_for_status().json()
    events, final = 0, None
    with http.stream("GET", f"{base}/api/jobs/{job['id']}/events") as s:
        for line in s.iter_lines():
            events += line.startswith("event: ")
            if line.startswith("data: "):
                final = json.loads(line[6:])
    return final, events


def through_server(jobs: list[dict], clients: int, pollers: int, outdir: str) -> dict:
    app = create_app(["mnist"], outdir=outdir, limits=Limits(max_queue=len(jobs)))
    with background(app) as base, httpx.Client(timeout=300) as http:
        stop, latencies = threading.Event(), []

        def poll() -> None:
            while not stop.is_set():
                t0 = time.perf_counter()
                http.get(f"{base}/api/jobs").raise_for_status()
                latencies.append(time.perf_counter() - t0)

        threads = [threading.Thread(target=poll) for _ in range(pollers)]
        for t in threads:
            t.start()
        t0 = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            results = list(pool.map(lambda body: follow(http, base, body), jobs))
        wall = time.perf_counter() - t0
        stop.set()
        for t in threads:
            t.join()
        firsts = [np.asarray(Image.open(io.BytesIO(http.get(base + job["images"][0]).content))) for job, _ in results]
    assert all(job["status"] == "done" for job, _ in results)
    return {"wall": wall, "firsts": firsts, "events": statistics.mean(e for _, e in results),
            "p50": statistics.median(latencies), "p95": statistics.quantiles(latencies, n=20)[-1],
            "reads": len(latencies)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--jobs", type=int, default=32)
    p.add_argument("--n", type=int, default=4, help="images per job")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--pollers", type=int, default=2)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    jobs = [request(k, a.n, a.steps) for k in range(a.jobs)]
    with tempfile.TemporaryDirectory() as tmp:
        in_process(jobs[:2], tmp)  # warm-up
        direct, expected = in_process(jobs, tmp)
        print(f"in-process: {a.jobs} jobs of {a.n} images, {a.steps} steps in {direct:.2f} s "
              f"({a.jobs / direct:.2f} jobs/s)")
        for clients in a.clients:
            r = through_server(jobs, clients, a.pollers, tmp)
            same = all(np.array_equal(x, y) for x, y in zip(r["firsts"], expected))
            print(f"server, {clients:2d} clients: {r['wall']:.2f} s ({a.jobs / r['wall']:.2f} jobs/s), overhead "
                  f"{r['wall'] / direct - 1:+.1%}; {r['events']:.1f} events per job; {r['reads']} reads by "
                  f"{a.pollers} pollers meanwhile: median {r['p50'] * 1e3:.1f} ms, p95 {r['p95'] * 1e3:.1f} ms; "
                  f"images equal in-process: {same}")


if __name__ == "__main__":
    main()
