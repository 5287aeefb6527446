"""A diffusekit server on a free loopback port (uvicorn in a background thread), and a client for it."""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import pytest

pytest.importorskip("uvicorn")
from diffusekit.server import Limits, background, create_app  # noqa: E402


@contextlib.contextmanager
def live_server(models: tuple[str, ...] = ("mnist",), limits: Limits | None = None, outdir: str | Path = "out/serve",
                **kw: Any) -> Iterator[str]:
    """Serve `create_app(models, ...)` on 127.0.0.1 and yield its base URL; the server stops on exit."""
    with background(create_app(models, outdir=outdir, limits=limits, **kw)) as url:
        yield url


def call(url: str, body: dict[str, Any] | None = None, method: str | None = None) -> tuple[int, Any]:
    """(status, parsed JSON or raw bytes) of a request; a JSON body is POSTed."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method or ("POST" if data is not None else "GET"),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            status, raw, kind = r.status, r.read(), r.headers.get_content_type()
    except urllib.error.HTTPError as e:
        status, raw, kind = e.code, e.read(), e.headers.get_content_type()
    return status, json.loads(raw) if kind == "application/json" else raw


def wait(base: str, job_id: str, timeout: float = 120) -> dict[str, Any]:
    """Poll a job until it has finished; its final state."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status, job = call(f"{base}/api/jobs/{job_id}")
        assert status == 200, job
        if job["status"] in ("done", "failed", "cancelled"):
            return job
        time.sleep(0.05)
    raise TimeoutError(f"job {job_id} did not finish in {timeout} s")


@contextlib.contextmanager
def serve_process(*args: str) -> Iterator[tuple[subprocess.Popen, str]]:
    """`diffusekit serve ARGS` in a subprocess, its output read continuously (a full pipe would block it), and its
    line naming the URL; on leaving, it must stop on Ctrl-C (SIGINT) within a minute, else the failure shows its output
    and, where py-spy is installed, the stacks it was stuck in."""
    proc = subprocess.Popen([sys.executable, "-m", "diffusekit", "serve", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    while (first := proc.stdout.readline()) and not first.startswith("diffusekit: "):
        lines.append(first)  # (warnings before the server's line)
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    try:
        yield proc, first.strip()
        proc.send_signal(signal.SIGINT)
        try:
            code = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            spy = shutil.which("py-spy")
            stacks = subprocess.run([spy, "dump", "--pid", str(proc.pid)], capture_output=True, text=True,
                                    timeout=60).stdout if spy else "(no py-spy)"
            pytest.fail(f"serve did not stop on SIGINT; its output: {''.join(lines)[-4000:]}\nstacks:\n{stacks}")
        reader.join(timeout=10)
        assert code == 0, "".join(lines)[-4000:]
    finally:
        proc.kill()
        proc.wait()
