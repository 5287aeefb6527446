"""The server's memory under an oversized request body: `diffusekit serve` in a process of its own, one POST of a
`--mb` MB JSON body (an image field of that size), and its peak RSS (VmHWM) before and after, with the answer.

    python benchmarks/serve_body_memory.py --mb 200
"""

from __future__ import annotations

import argparse
import http.client
import signal
import subprocess
import sys
import time
from urllib.parse import urlparse


def peak_rss_mb(pid: int) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mb", type=int, default=200)
    a = p.parse_args()
    server = subprocess.Popen([sys.executable, "-m", "diffusekit", "serve", "--model", "mnist14", "--port", "0"],
                              stdout=subprocess.PIPE, text=True)
    try:
        url = urlparse(server.stdout.readline().split(" at ")[-1].strip())
        time.sleep(1)
        before = peak_rss_mb(server.pid)
        body = b'{"task": "img2img", "image": "' + b"A" * (a.mb << 20) + b'"}'
        conn = http.client.HTTPConnection(url.hostname, url.port, timeout=300)
        t0 = time.perf_counter()
        try:
            conn.request("POST", "/api/jobs", body=body, headers={"Content-Type": "application/json"})
            r = conn.getresponse()
            answer = f"{r.status} {r.read()[:120]!r}"
        except (BrokenPipeError, ConnectionResetError) as e:  # refused before the body was sent whole
            answer = f"connection closed while sending ({type(e).__name__})"
        seconds = time.perf_counter() - t0
        time.sleep(0.5)
        print(f"{a.mb} MB body: {answer} in {seconds:.2f} s; server peak RSS {before:.0f} MB before, "
              f"{peak_rss_mb(server.pid):.0f} MB after")
    finally:
        server.send_signal(signal.SIGINT)
        server.wait(timeout=60)


if __name__ == "__main__":
    main()
