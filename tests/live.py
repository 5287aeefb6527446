"""A diffusekit server on a free loopback port (uvicorn in a background thread), and a client for it."""

from __future__ import annotations

import contextlib
import json
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
