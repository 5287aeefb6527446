"""Load on `diffusekit serve` over loopback against the same work done in-process (issue 14).

The same jobs (class-conditional MNIST, `--n` images each, dpmpp_2m, `--steps`, CFG 3, distinct seeds) run
1. in-process: `generate` and the PNG writing of `sample`, one job after another, in the main thread;
2. through `diffusekit serve`, started in a process of its own as users start it: `--clients` threads of this
   process submit them over HTTP and follow each over server-sent events, as the page does, while `--pollers`
   threads read the job list `--poll-rate` times a second each (0: back to back, as fast as it answers);
3. with `--embedded`, through `create_app` served from this process, its worker in a thread of its own.
Reported: wall times and the server's overhead, the API's read latency under that load, and the events per
job. The server's images are checked against the in-process ones, pixel for pixel.

    python benchmarks/serve_load.py --jobs 24 --clients 1 8 24 --poll-rate 10 --embedded
    python benchmarks/serve_load.py --jobs 24 --clients 8 --poll-rate 0
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import torch
from PIL import Image

from diffusekit.server import Limits, background, create_app

from diffusekit.bundled import model_folder
from diffusekit.outputs import Destination, write
from diffusekit.requests import Request, load_model, plan, run


def request(k: int, n: int, steps: int) -> dict:
    return {"labels": [k % 10], "n": n, "steps": steps, "seed": k}


def in_process(jobs: list[dict], outdir: str) -> tuple[float, list[np.ndarray]]:
    """Wall time of the jobs run as `sample` runs them, and each job's first image."""
    pipe, dtype = load_model("mnist")  # (auto: bf16 where native, as the server)
    firsts = []
    t0 = time.perf_counter()
    for body in jobs:
        p = plan(Request(**body, dtype=dtype), pipe)
        grid = write(run(p, pipe), p, Destination(outdir=outdir), model_folder("mnist"))
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


def through_server(jobs: list[dict], clients: int, pollers: int, rate: float, threads: int | None,
                   outdir: str) -> dict:
    """The jobs through `diffusekit serve` in a process of its own, as users run it."""
    cmd = [sys.executable, "-m", "diffusekit", "serve", "--model", "mnist", "--port", "0", "--outdir", outdir,
           "--max-queue", str(len(jobs))] + ([] if threads is None else ["--threads", str(threads)])
    server = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    try:
        base = server.stdout.readline().split(" at ")[-1].strip().rstrip("/")
        return load_server(base, jobs, clients, pollers, rate)
    finally:
        server.send_signal(signal.SIGINT)
        server.wait(timeout=60)


def embedded(jobs: list[dict], clients: int, pollers: int, rate: float, threads: int | None, outdir: str) -> dict:
    """The jobs through `create_app` served from this process, its worker in a thread of its own."""
    app = create_app(["mnist"], outdir=outdir, limits=Limits(max_queue=len(jobs)), threads=threads or 0)
    with background(app) as base:
        return load_server(base, jobs, clients, pollers, rate)


def load_server(base: str, jobs: list[dict], clients: int, pollers: int, rate: float) -> dict:
    with httpx.Client(timeout=300) as http:
        stop, latencies = threading.Event(), []

        def poll() -> None:  # `rate` reads a second (0: back to back)
            while not stop.is_set():
                t0 = time.perf_counter()
                http.get(f"{base}/api/jobs").raise_for_status()
                latencies.append(time.perf_counter() - t0)
                if rate:
                    stop.wait(max(0.0, 1 / rate - (time.perf_counter() - t0)))

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
            "p50": statistics.median(latencies or [0]), "p95": max(latencies or [0]) if len(latencies) < 2
            else statistics.quantiles(latencies, n=20)[-1], "reads": len(latencies)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--jobs", type=int, default=32)
    p.add_argument("--n", type=int, default=4, help="images per job")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--pollers", type=int, default=2)
    p.add_argument("--poll-rate", type=float, nargs="+", default=[0.0, 10.0],
                   help="job-list reads a second by each poller (0: back to back, as fast as the server answers)")
    p.add_argument("--threads", type=int, default=0, help="torch threads in-process (0: torch's default)")
    p.add_argument("--server-threads", type=int, nargs="+", default=[-1],
                   help="the server's sampling threads (-1: its default, torch's)")
    p.add_argument("--embedded", action="store_true",
                   help="also serve from this process with create_app, the worker in a thread (not the main one)")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    jobs = [request(k, a.n, a.steps) for k in range(a.jobs)]
    with tempfile.TemporaryDirectory() as tmp:
        in_process(jobs[:2], tmp)  # warm-up
        direct, expected = in_process(jobs, tmp)
        print(f"in-process: {a.jobs} jobs of {a.n} images, {a.steps} steps in {direct:.2f} s "
              f"({a.jobs / direct:.2f} jobs/s)")
        ways = {"serve": through_server, **({"embedded": embedded} if a.embedded else {})}
        for (way, run), clients, rate, threads in itertools.product(ways.items(), a.clients, a.poll_rate,
                                                                    a.server_threads):
            r = run(jobs, clients, a.pollers, rate, None if threads < 0 else threads, tmp)
            same = all(np.array_equal(x, y) for x, y in zip(r["firsts"], expected))
            print(f"{way} ({threads if threads >= 0 else 'default'} threads), {clients:2d} clients, {a.pollers} "
                  f"pollers at {rate or 'max'} reads/s: {r['wall']:.2f} s "
                  f"({a.jobs / r['wall']:.2f} jobs/s), overhead {r['wall'] / direct - 1:+.1%}; {r['events']:.1f} "
                  f"events per job; {r['reads'] / r['wall']:.0f} reads/s, median {r['p50'] * 1e3:.1f} ms, p95 "
                  f"{r['p95'] * 1e3:.1f} ms; images equal in-process: {same}")


if __name__ == "__main__":
    main()
