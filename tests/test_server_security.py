"""The web server as a security boundary (issue 22): DNS rebinding, cross-site requests, unbounded bodies, tokens
off loopback, echoed values, strict indices, data-URL types, image modes, nothing left on disk for jobs that never
ran, and results written whole or not at all."""

from __future__ import annotations

import base64
import errno
import http.client
import io
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.live import call, live_server, serve_process, wait

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from diffusekit.images import read_parameters, standard_mode  # noqa: E402
from diffusekit.requests import Limits  # noqa: E402
from diffusekit.server import create_app  # noqa: E402

JOB = {"labels": [1], "n": 1, "steps": 2, "seed": 0}


def png(arr: np.ndarray, fmt: str = "PNG") -> str:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="module")
def outdir(tmp_path_factory):
    return tmp_path_factory.mktemp("serve")


@pytest.fixture(scope="module")
def client(outdir):
    app = create_app(["mnist14"], outdir=outdir, limits=Limits(max_queue=2), worker_thread=False)
    with TestClient(app, base_url="http://127.0.0.1") as c:  # (no worker: jobs stay queued)
        yield c


def post(client, body, **headers):
    return client.post("/api/jobs", content=json.dumps(body), headers={"Content-Type": "application/json", **headers})


@pytest.mark.parametrize("host", ["evil.example.com", "attacker.test", "127.0.0.1.nip.io", "localhost.evil.com"])
def test_dns_rebinding_foreign_hosts_are_refused(client, host):
    assert client.get("/api/jobs", headers={"Host": host}).status_code == 421
    r = post(client, JOB, Host=host)
    assert r.status_code == 421 and "does not answer to host" in r.json()["detail"]


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost:8000", "[::1]:8000", "LOCALHOST"])
def test_its_own_host_names_are_answered(client, host):
    assert client.get("/api/models", headers={"Host": host}).status_code == 200


def test_a_live_server_answers_only_on_its_own_port(tmp_path):
    with live_server(("mnist14",), outdir=tmp_path) as base:
        port = base.rsplit(":", 1)[1]
        for host, status in [(f"127.0.0.1:{port}", 200), (f"localhost:{port}", 200), ("127.0.0.1:1", 421),
                             (f"evil.example.com:{port}", 421)]:
            conn = http.client.HTTPConnection("127.0.0.1", int(port), timeout=30)
            conn.request("GET", "/api/jobs", headers={"Host": host})
            assert conn.getresponse().status == status, host


def test_cross_site_requests_are_refused_and_same_origin_ones_pass(client):
    job = post(client, JOB, Origin="http://127.0.0.1").json()  # the page's own origin
    assert job["status"] == "queued"
    for headers in ({"Origin": "http://evil.example.com"}, {"Origin": "null"}, {"Sec-Fetch-Site": "cross-site"},
                    {"Origin": "http://127.0.0.1:9999"}):
        r = client.post(f"/api/jobs/{job['id']}/cancel", headers=headers)
        assert r.status_code == 403 and "refused" in r.json()["detail"], headers
        assert post(client, JOB, **headers).status_code == 403
    assert client.get(f"/api/jobs/{job['id']}").json()["status"] == "queued"  # not cancelled
    assert client.post(f"/api/jobs/{job['id']}/cancel", headers={"Sec-Fetch-Site": "same-origin"}).json()[
        "status"] == "cancelled"


def test_json_endpoints_refuse_other_content_types(client):
    r = client.post("/api/jobs", content=json.dumps(JOB), headers={"Content-Type": "text/plain"})
    assert r.status_code == 422


def test_bodies_over_the_limit_are_refused_before_they_are_read(client):
    r = client.post("/api/jobs", content=b"{}", headers={"Content-Type": "application/json",
                                                         "Content-Length": str(1 << 30)})
    assert r.status_code == 413 and "limit" in r.json()["detail"]

    def chunks():  # a streamed (chunked) body, no Content-Length
        yield b'{"image": "'
        for _ in range(64):
            yield b"A" * (1 << 20)

    r = client.post("/api/jobs", content=chunks(), headers={"Content-Type": "application/json"})
    assert r.status_code == 413


def test_a_token_guards_every_request_and_the_page_keeps_it_in_a_cookie(tmp_path):
    app = create_app(["mnist14"], outdir=tmp_path, worker_thread=False, token="s3cret")
    with TestClient(app, base_url="http://127.0.0.1") as c:
        assert c.get("/api/models").status_code == 401 and c.get("/").status_code == 401
        assert c.get("/api/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert c.get("/api/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        page = c.get("/?token=s3cret")
        assert page.status_code == 200 and "HttpOnly" in page.headers["set-cookie"]
        assert c.get("/api/models").status_code == 200  # (the cookie)


def test_serving_off_loopback_needs_a_token(tmp_path):
    with serve_process("--model", "mnist14", "--host", "0.0.0.0", "--port", "0", "--outdir", str(tmp_path)) as (
            _, first):
        url = first.split(" at ")[-1].strip()
        assert "?token=" in url
        port, token = url.split(":")[2].split("/")[0], url.split("token=")[1]
        assert call(f"http://127.0.0.1:{port}/api/models")[0] == 401
        assert call(f"http://127.0.0.1:{port}/api/models?token={token}")[0] == 200


def test_docs_need_no_network_and_the_schema_stays(client):
    assert client.get("/docs").status_code == 404 and client.get("/openapi.json").status_code == 200


def test_unknown_ids_are_not_echoed_whole(client):
    r = client.get("/api/jobs/" + "x" * 60_000)
    assert r.status_code == 404 and len(r.content) < 300


def test_image_indices_are_plain_decimals(outdir):
    app = create_app(["mnist14"], outdir=outdir)
    with TestClient(app, base_url="http://127.0.0.1") as c:
        job = post(c, JOB).json()
        deadline = time.monotonic() + 60
        while c.get(f"/api/jobs/{job['id']}").json()["status"] != "done" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert c.get(f"/api/jobs/{job['id']}/images/0.png").status_code == 200
        for k in ["+0", " 0", "-0", "00", "0.0", "1", "٠"]:
            assert c.get(f"/api/jobs/{job['id']}/images/{k}.png").status_code == 404, k


@pytest.mark.parametrize("url", ["data:text/html;base64,PGgxPmhpPC9oMT4=", "data:application/json;base64,e30="])
def test_data_urls_must_be_images(client, url):
    r = post(client, {**JOB, "task": "img2img", "image": url})
    assert r.status_code == 400 and "must be an image data URL" in r.json()["detail"]


def test_every_image_mode_becomes_8_bit_with_the_right_scale():
    grey = lambda img: np.asarray(standard_mode(img))  # noqa: E731
    assert np.all(grey(Image.fromarray(np.full((4, 4), 0.5, np.float32))) == 128)  # float in [0, 1]
    assert np.all(grey(Image.fromarray(np.full((4, 4), 65535, np.uint16))) == 255)
    assert np.all(grey(Image.fromarray(np.full((4, 4), 32896, np.uint16))) == 128)
    assert np.all(grey(Image.new("1", (4, 4), 1)) == 255) and standard_mode(Image.new("LA", (4, 4))).mode == "L"
    for mode in ("P", "RGBA", "CMYK", "YCbCr"):
        assert standard_mode(Image.new(mode, (4, 4))).mode == "RGB", mode
    with pytest.raises(ValueError, match="image mode LAB is not supported"):
        standard_mode(Image.new("LAB", (4, 4)))


def test_a_float_tiff_upload_is_not_black(client, outdir):
    tiff = png(np.full((14, 14), 0.5, np.float32), "TIFF")
    job = post(client, {**JOB, "task": "img2img", "image": tiff}).json()
    stored = next((outdir / "inputs").glob(f"{job['id']}-*.png"))
    assert np.all(np.asarray(Image.open(stored)) == 128)
    client.post(f"/api/jobs/{job['id']}/cancel")
    lab = io.BytesIO()
    Image.new("LAB", (14, 14)).save(lab, format="TIFF")
    r = post(client, {**JOB, "task": "img2img", "image": base64.b64encode(lab.getvalue()).decode()})
    assert r.status_code == 400 and "mode LAB" in r.json()["detail"]


def test_nothing_of_a_job_that_never_ran_stays_on_disk(client, outdir):
    digit = png(np.zeros((14, 14), np.uint8))
    before = set((outdir / "inputs").glob("*")) if (outdir / "inputs").exists() else set()
    for body in [{**JOB, "task": "img2img", "image": digit, "height": 15},  # refused by the plan
                 {**JOB, "task": "inpaint", "image": digit, "mask": png(np.full((14, 14), 128, np.uint8))}]:
        assert post(client, body).status_code == 400
    queued = [post(client, {**JOB, "task": "img2img", "image": digit}).json() for _ in range(2)]
    assert post(client, {**JOB, "task": "img2img", "image": digit}).status_code == 429  # the queue is full
    for job in queued:
        client.post(f"/api/jobs/{job['id']}/cancel")  # cancelled before it started
    assert set((outdir / "inputs").glob("*")) == before


def test_a_full_disk_fails_the_job_and_the_server_goes_on(tmp_path, monkeypatch):
    import diffusekit.server as server

    write = server.write

    def full(*args, **kwargs):
        monkeypatch.setattr(server, "write", write)  # (the next job finds room again)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(server, "write", full)
    with live_server(("mnist14",), outdir=tmp_path) as base:
        failed = wait(base, call(f"{base}/api/jobs", JOB)[1]["id"])
        assert failed["status"] == "failed" and "No space left on device" in failed["error"]
        assert wait(base, call(f"{base}/api/jobs", JOB)[1]["id"])["status"] == "done"


def test_sigterm_while_a_job_runs_leaves_no_partial_file(tmp_path):
    server = subprocess.Popen([sys.executable, "-m", "diffusekit", "serve", "--model", "mnist14", "--port", "0",
                               "--outdir", str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        base = server.stdout.readline().split(" at ")[-1].strip().rstrip("/")
        job = call(f"{base}/api/jobs", {**JOB, "n": 64, "steps": 100})[1]
        while call(f"{base}/api/jobs/{job['id']}")[1]["status"] == "queued":
            time.sleep(0.05)
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=60) == 0
    finally:
        server.kill()
    assert not list(tmp_path.rglob("*.tmp")) and not list(tmp_path.rglob(".*"))
    for path in tmp_path.rglob("*.png"):  # whatever was written is whole, with its parameters
        assert read_parameters(path)["model"] == "mnist14"


def test_the_readme_documents_the_boundary():
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    assert "--token" in readme and "--insecure-no-auth" in readme and "lists every job" in readme
