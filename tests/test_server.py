"""The HTTP API of `diffusekit serve`: jobs end to end, live progress, bad requests, cancel, and load."""

from __future__ import annotations

import base64
import io
import json
import socket
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from PIL import Image

from tests.live import call, live_server, serve_process, wait

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from diffusekit.cli import main  # noqa: E402
from diffusekit.images import read_parameters  # noqa: E402
from diffusekit.samplers import SAMPLERS  # noqa: E402
from diffusekit.server import Limits, create_app  # noqa: E402


@pytest.fixture(scope="module")
def outdir(tmp_path_factory):
    return tmp_path_factory.mktemp("serve")


@pytest.fixture(scope="module")
def client(outdir):
    app = create_app(["mnist", "mnist_sr"], outdir=outdir, limits=Limits(max_steps=60, max_queue=4))
    with TestClient(app, base_url="http://127.0.0.1") as c:
        yield c


def png(arr: np.ndarray) -> str:
    """uint8 [H, W] -> PNG data URL."""
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def pixels(content: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(content)).convert("L"))


def run(client: TestClient, **body) -> dict:
    """Submit a job and follow its events to the end: (the final job, the events in order)."""
    r = client.post("/api/jobs", json=body)
    assert r.status_code == 202, r.text
    events = []
    with client.stream("GET", f"/api/jobs/{r.json()['id']}/events") as s:
        kind = None
        for line in s.iter_lines():
            if line.startswith("event: "):
                kind = line[7:]
            elif line.startswith("data: "):
                events.append((kind, json.loads(line[6:])))
    return {"job": events[-1][1], "events": events}


def test_models_page_and_schema(client):
    info = client.get("/api/models").json()
    models = {m["name"]: m for m in info["models"]}
    assert models["mnist"] | {"dtype": None} == {
        "name": "mnist", "kind": "class", "classes": 10, "resolution": [28, 28], "channels": 1, "factor": 2,
        "tasks": ["sample", "img2img", "inpaint", "outpaint"], "low_res_factor": 0, "dtype": None, "layout_classes": [],
        "map_classes": [], "map_colours": []}
    assert models["mnist_sr"]["tasks"] == ["upscale"] and models["mnist_sr"]["low_res_factor"] == 2
    assert info["samplers"] == list(SAMPLERS) and info["limits"]["max_steps"] == 60
    assert info["limits"]["max_side"] == 8 * 56  # 8x the largest output side (the SR model's 28 from 14)
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "<html" in page.text.lower() and "/api/jobs" in page.text
    schema = client.get("/openapi.json").json()
    assert {"/api/jobs", "/api/models", "/api/jobs/{job_id}/events"} <= set(schema["paths"])
    assert "upsample_guidance" in schema["components"]["schemas"]["JobRequest"]["properties"]


def test_job_streams_progress_and_its_png_reruns_from_the_command_line(client, tmp_path):
    out = run(client, labels=[3], n=2, steps=6, seed=5, cache=2, cfg_until=0.5)  # (the rerun keeps both options)
    job, events = out["job"], out["events"]
    kinds = [k for k, _ in events]
    assert kinds[0] == "status" and kinds[-1] == "done" and job["status"] == "done", events[-1]
    steps = [e["step"] for k, e in events if k == "progress"]
    assert steps == sorted(steps) and steps[-1] <= 6 and job["step"] == job["total"] == 6
    preview = next(e["preview"] for k, e in events if k == "progress" and "preview" in e)
    assert Image.open(io.BytesIO(base64.b64decode(preview.split(",")[1]))).size == (2 + 2 * 30, 2 + 30)  # 1 row of 2, padded
    assert job["request"]["labels"] == [3] and job["seed"] == 5 and len(job["images"]) == 2
    images = [pixels(client.get(u).content) for u in job["images"]]
    assert all(a.shape == (28, 28) for a in images) and not np.array_equal(*images)
    grid = tmp_path / "grid.png"
    grid.write_bytes(client.get(job["grid"]).content)
    assert {k: read_parameters(grid)[k] for k in ("labels", "steps", "cache", "cfg_until")} == dict(
        labels=[3], steps=6, cache=2, cfg_until=0.5)
    main(["sample", "--from-png", str(grid), "--out", str(tmp_path / "again.png")])  # the CLI, same parameters
    for k, a in enumerate(images):
        assert np.array_equal(np.asarray(Image.open(tmp_path / "again" / f"{k:03d}.png")), a)


def test_every_class_and_random_seeds(client):
    a = run(client, n=1, steps=2)["job"]
    b = run(client, n=1, steps=2)["job"]
    assert len(a["images"]) == 10 and a["parameters"]["labels"] == list(range(10))  # null label: every class
    assert a["seed"] != b["seed"]  # a random seed each time, and returned so that it can be reused
    c = run(client, n=1, steps=2, seed=a["seed"])["job"]
    assert all(np.array_equal(pixels(client.get(u).content), pixels(client.get(v).content))
               for u, v in zip(a["images"], c["images"]))


def test_inpaint_img2img_upscale_and_upsample_guidance(client):
    digit = pixels(client.get(run(client, labels=[0], n=1, steps=4, seed=1)["job"]["images"][0]).content)
    mask = np.zeros((28, 28), np.uint8)
    mask[8:20, 4:24] = 255
    job = run(client, task="inpaint", labels=[0], n=2, steps=4, seed=2, image=png(digit), mask=png(mask))["job"]
    assert job["status"] == "done" and job["parameters"]["mask"].endswith("-mask.png")
    for url in job["images"]:
        out = pixels(client.get(url).content)
        assert np.array_equal(out[mask == 0], digit[mask == 0]) and not np.array_equal(out, digit)
    job = run(client, task="img2img", labels=[7], n=1, steps=10, strength=0.5, seed=3, image=png(digit))["job"]
    assert job["status"] == "done" and job["total"] == 5 and job["parameters"]["strength"] == 0.5
    small = np.asarray(Image.fromarray(digit).resize((14, 14), Image.Resampling.BICUBIC))
    job = run(client, task="upscale", model="mnist_sr", n=1, steps=4, seed=4, image=png(small))["job"]
    big = pixels(client.get(job["images"][0]).content)
    assert big.shape == (28, 28)
    assert np.abs(np.asarray(Image.fromarray(big).resize((14, 14), Image.Resampling.BICUBIC), float)
                  - small).mean() < 40  # the upscaled digit is still that digit
    job = run(client, labels=[1], n=1, steps=4, seed=5, height=56, width=56, upsample_guidance=0.2)["job"]
    assert pixels(client.get(job["images"][0]).content).shape == (56, 56)
    assert job["parameters"]["upsample_guidance"] == 0.2
    job = run(client, labels=[1], n=1, steps=2, seed=5, height=56, width=56, upsample_guidance="auto")["job"]
    assert job["status"] == "done" and job["parameters"]["upsample_guidance"] == "auto"


GREY = np.full((28, 28), 128, np.uint8)
BAD = [  # (request, status, a phrase of the message)
    ({"width": 29}, 400, "divisible by 2"),
    ({"height": 42, "width": 42, "upsample_guidance": 0.2}, 400, "integer multiple"),
    ({"sampler": "eulr"}, 400, "did you mean 'euler'"),
    ({"steps": 61}, 400, "limit of 60"),
    ({"height": 1000}, 400, "limit of 448"),
    ({"n": 65}, 400, "limit of 64"),
    ({"n": 7, "labels": None}, 400, "70 images is over"),  # every class: 10 x 7
    ({"labels": [10]}, 400, "out of range"),
    ({"prompt": ["a cat"]}, 400, "text-conditional"),
    ({"model": "../../etc/passwd"}, 400, "unknown model"),
    ({"model": "mnist14"}, 400, "unknown model"),  # bundled, but not served here
    ({"task": "upscale"}, 400, "does not do upscale"),
    ({"task": "sample", "model": "mnist_sr"}, 400, "does not do sample"),
    ({"task": "inpaint", "image": png(GREY)}, 400, "needs input mask"),
    ({"task": "img2img"}, 400, "needs input image"),
    ({"image": png(GREY)}, 400, "takes no input image"),
    ({"task": "img2img", "image": "not an image"}, 400, "not a readable image"),
    ({"task": "img2img", "image": base64.b64encode(b"GIF89a garbage").decode()}, 400, "not a readable image"),
    ({"task": "img2img", "image": png(np.zeros((30, 28), np.uint8)), "height": 28}, 400, "image is 30x28"),
    ({"task": "img2img", "image": png(np.zeros((29, 28), np.uint8))}, 400, "29x28 must be divisible by 2"),
    ({"task": "img2img", "image": png(np.zeros((500, 8), np.uint8))}, 413, "limit of 448"),
    ({"task": "img2img", "image": "A" * (6 << 20)}, 413, "upload limit"),
    ({"task": "inpaint", "image": png(GREY), "mask": png(GREY)}, 400, "not binary"),
    ({"task": "inpaint", "image": png(GREY), "mask": png(np.zeros((14, 14), np.uint8))}, 400, "mask is 14x14"),
    ({"cfg": float("nan")}, 422, "finite"),
    ({"seed": 2**64}, 422, "less than"),
    ({"steps": 0}, 422, "greater than or equal to 1"),
    ({"upsample_guidance": 11}, 422, "less than or equal to 10"),
    ({"upsample_guidance": "best"}, 422, "'auto'"),
    ({"task": "paint"}, 422, "sample"),
    ({"label": 1}, 422, "Extra inputs"),
    ({"cfg_until": 0}, 422, "greater than 0"),
    ({"cache": 2, "cache_depth": 9}, 400, "0 <= depth <= 5"),
    ({"sweep": ["cgf=1,2"]}, 400, "did you mean 'cfg'"),
    ({"sweep": ["eta=0,1"]}, 400, "sweep cell eta=0"),
    ({"sweep": ["steps=2,99"]}, 400, "steps 99 is over"),
    ({"sweep": ["seed=1,2,3,4,5", "cfg=1,2,3,4,5,6,7"], "n": 2}, 400, "35 cells make 70 images"),
    ({"sweep": ["cfg=1,2", "steps=1,2", "seed=1,2", "eta=0,1"]}, 422, "at most 3"),
]


@pytest.mark.parametrize("body, status, phrase", BAD, ids=[f"{b}"[:40] for b, _, _ in BAD])
def test_bad_requests_get_4xx_naming_the_problem(client, body, status, phrase):
    body = {"steps": 2, "n": 1, "labels": [0]} | body
    r = client.post("/api/jobs", content=json.dumps(body), headers={"Content-Type": "application/json"})
    assert r.status_code == status, r.text
    assert phrase in json.dumps(r.json()["detail"]), r.json()
    assert not [j for j in client.get("/api/jobs").json()["jobs"] if j["status"] == "queued"]  # nothing queued


@pytest.mark.parametrize("path", ["/api/jobs/nope", "/api/jobs/..%2F..%2Fetc%2Fpasswd", "/api/jobs/nope/grid.png",
                                  "/api/jobs/nope/events", "/..%2F..%2Fetc/passwd", "/web/index.html",
                                  "/api/jobs/%2E%2E/images/0.png"])
def test_no_path_reaches_a_file(client, path):
    r = client.get(path)
    assert r.status_code == 404 and b"root:" not in r.content


def test_a_sweep_job(client):
    """A sweep runs as one job: its steps counted across the cells, every cell's images in order, the labelled
    plot as its grid, the sweep in its parameters, each cell as the job of its own options."""
    out = run(client, labels=[4], n=1, steps=2, seed=3, sweep=["cfg=1,3", "steps=1,2"])
    job, steps = out["job"], [e["step"] for kind, e in out["events"] if kind == "progress"]
    assert job["status"] == "done" and job["total"] == 1 + 1 + 2 + 2 and steps == sorted(steps) and steps[-1] <= 6
    assert len(job["images"]) == 4 and job["parameters"]["sweep"] == ["cfg=1.0,3.0", "steps=1,2"]
    plot = Image.open(io.BytesIO(client.get(job["grid"]).content))
    assert plot.width > 2 * 28 and plot.height > 2 * 28
    alone = run(client, labels=[4], n=1, steps=2, seed=3, cfg=3)["job"]
    assert np.array_equal(pixels(client.get(job["images"][3]).content), pixels(client.get(alone["images"][0]).content))


def test_images_by_index_only(client):
    job = run(client, labels=[2], n=1, steps=2, seed=0)["job"]
    assert client.get(f"/api/jobs/{job['id']}/images/0.png").status_code == 200
    assert client.get(f"/api/jobs/{job['id']}/images/1.png").status_code == 404
    assert client.get(f"/api/jobs/{job['id']}/images/-1.png").status_code == 404
    assert client.get(f"/api/jobs/{job['id']}/images/..%2F000.png").status_code in (404, 422)


def test_cancel_queued_and_running_jobs_and_a_full_queue(client):
    long = {"n": 6, "steps": 60, "seed": 0}  # 60 steps of 60 images: seconds, against one step's ~0.1 s
    running = client.post("/api/jobs", json=long).json()
    deadline = time.monotonic() + 30
    while client.get(f"/api/jobs/{running['id']}").json()["step"] < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    waiting = [client.post("/api/jobs", json={"n": 1, "steps": 2, "labels": [k]}) for k in range(5)]
    assert [r.status_code for r in waiting] == [202] * 4 + [429]  # max_queue 4: the fifth is refused
    assert "queue is full" in waiting[4].json()["detail"] and waiting[4].headers["retry-after"]
    assert [r.json()["position"] for r in waiting[:4]] == [0, 1, 2, 3]
    first = waiting[0].json()["id"]
    assert client.post(f"/api/jobs/{first}/cancel").json()["status"] == "cancelled"  # at once
    assert client.get(f"/api/jobs/{waiting[1].json()['id']}").json()["position"] == 0  # the others move up
    job = client.post(f"/api/jobs/{running['id']}/cancel").json()
    assert job["status"] == "running"  # cancelled at its next step
    with client.stream("GET", f"/api/jobs/{running['id']}/events") as s:
        events = [line for line in s.iter_lines() if line.startswith("event")]
    final = client.get(f"/api/jobs/{running['id']}").json()
    assert events[-1] == "event: cancelled" and final["status"] == "cancelled" and final["step"] < 60
    assert final["images"] == [] and client.get(f"/api/jobs/{running['id']}/grid.png").status_code == 404
    for r in waiting[1:4]:  # the queue goes on
        assert run_done(client, r.json()["id"])["status"] == "done"
    assert client.get(f"/api/jobs/{first}").json()["step"] == 0  # the cancelled one never ran
    assert client.post("/api/jobs/nope/cancel").status_code == 404


def run_done(client: TestClient, job_id: str) -> dict:
    deadline = time.monotonic() + 60
    while (job := client.get(f"/api/jobs/{job_id}").json())["status"] in ("queued", "running"):
        assert time.monotonic() < deadline
        time.sleep(0.02)
    return job


def test_concurrent_clients_on_loopback(tmp_path):
    """8 clients submit 24 jobs (3 requests of different labels and seeds, each 8 times) and poll them while
    2 more read the job list: every job completes, in the order of submission, identical requests give identical images,
    and the API answers within bounded time while the worker samples."""
    requests = [{"labels": [k], "n": 2, "steps": 4, "seed": 10 + k} for k in range(3)]
    with live_server(("mnist",), Limits(max_queue=64), outdir=tmp_path) as base:
        latencies: list[float] = []
        lock = threading.Lock()
        stop = threading.Event()

        def poll() -> None:  # reads while the worker runs, 50 a second (8 clients poll their jobs 20 a second each)
            while not stop.is_set():
                t0 = time.perf_counter()
                status, _ = call(f"{base}/api/jobs")
                assert status == 200
                with lock:
                    latencies.append(time.perf_counter() - t0)
                stop.wait(max(0.0, 0.02 - (time.perf_counter() - t0)))

        def client(k: int) -> list[dict]:
            jobs = []
            for body in requests:
                status, job = call(f"{base}/api/jobs", body)
                assert status == 202, job
                jobs.append(job)
            status, bad = call(f"{base}/api/jobs", {"sampler": "nope"})
            assert status == 400 and "unknown sampler" in bad["detail"]
            return [wait(base, j["id"]) for j in jobs]

        pollers = [threading.Thread(target=poll) for _ in range(2)]
        for t in pollers:
            t.start()
        t0 = time.perf_counter()
        with ThreadPoolExecutor(8) as pool:
            results = [job for jobs in pool.map(client, range(8)) for job in jobs]
        wall = time.perf_counter() - t0
        stop.set()
        for t in pollers:
            t.join()
        assert [j["status"] for j in results] == ["done"] * 24
        by_request: dict[int, set[bytes]] = {}
        for job in results:
            status, content = call(base + job["images"][1])
            by_request.setdefault(job["request"]["labels"][0], set()).add(pixels(content).tobytes())
        assert {k: len(v) for k, v in by_request.items()} == {0: 1, 1: 1, 2: 1}  # same request, same image
        status, listing = call(f"{base}/api/jobs")
        order = sorted(listing["jobs"], key=lambda j: j["created"])  # one worker, first in first out:
        assert all(a["finished"] <= b["started"] for a, b in zip(order, order[1:]))  # one at a time, in order
        p95 = statistics.quantiles(latencies, n=20)[-1]
        print(f"24 jobs from 8 clients in {wall:.1f} s; {len(latencies)} API reads meanwhile, "
              f"median {statistics.median(latencies) * 1e3:.1f} ms, p95 {p95 * 1e3:.1f} ms")
        assert p95 < 1.0


def test_serve_command_starts_serves_and_stops_on_ctrl_c(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with serve_process("--model", "mnist", "--port", str(port), "--outdir", str(tmp_path), "--max-steps", "8") as (
            proc, first):
        assert first == f"diffusekit: mnist at http://127.0.0.1:{port}/"
        base = f"http://127.0.0.1:{port}"
        for _ in range(100):  # (the line comes just before uvicorn binds)
            try:
                status, info = call(f"{base}/api/models")
                break
            except OSError:
                time.sleep(0.05)
        assert status == 200 and info["limits"]["max_steps"] == 8 and [m["name"] for m in info["models"]] == ["mnist"]
        status, job = call(f"{base}/api/jobs", {"labels": [4], "n": 1, "steps": 2, "seed": 0})
        assert wait(base, job["id"])["status"] == "done"
        assert len(list(tmp_path.glob("*/000.png"))) == 1  # written in --outdir as `sample` writes


def test_a_text_model_takes_prompt_and_negative_prompt(tmp_path):
    """A (tiny, random) Stable Diffusion folder served by its path: prompts reach the model, and the PNG
    reruns from the command line."""
    pytest.importorskip("diffusers")
    from tests.test_interop import tiny_sd_folder

    folder = tiny_sd_folder(tmp_path / "sd", tmp_path / "vocab" / "files")[0]
    app = create_app([str(folder)], dtype="fp32", outdir=tmp_path / "out")
    with TestClient(app, base_url="http://127.0.0.1") as c:
        info = c.get("/api/models").json()["models"]
        assert [(m["name"], m["kind"], m["tasks"]) for m in info] == [("sd", "text", ["sample", "img2img", "inpaint", "outpaint"])]
        job = run(c, prompt=["a cat"], negative=["dog"], n=2, steps=2, seed=0)["job"]
        assert job["status"] == "done", job["error"]
        assert job["parameters"]["prompt"] == ["a cat"] and job["parameters"]["negative"] == ["dog"]
        other = run(c, prompt=["a dog"], negative=["dog"], n=2, steps=2, seed=0)["job"]
        first = [pixels(c.get(j["images"][0]).content) for j in (job, other)]
        assert not np.array_equal(*first)  # the prompt changes the image
        grid = tmp_path / "grid.png"
        grid.write_bytes(c.get(job["grid"]).content)
        r = c.post("/api/jobs", json={"n": 1, "steps": 2})
        assert r.status_code == 400 and "text-conditional: pass --prompt" in r.json()["detail"]
        r = c.post("/api/jobs", json={"labels": [1], "prompt": ["a cat"], "n": 1, "steps": 2})
        assert r.status_code == 400 and "text-conditional" in r.json()["detail"]
    main(["sample", "--from-png", str(grid), "--out", str(tmp_path / "again.png")])
    assert np.array_equal(np.asarray(Image.open(tmp_path / "again" / "000.png").convert("L")), first[0])


def test_loras_and_embeddings_by_name_from_the_served_folders(tmp_path):
    """LoRAs are chosen by name among --lora-dir's files, embeddings by a prompt writing an --embedding-dir file's
    name; they change the images, the PNG records the files; a name not served or a path is refused (400)."""
    pytest.importorskip("diffusers")
    from safetensors.torch import save_file

    from tests.test_interop import tiny_sd_folder
    from tests.test_lora import lora_factors, peft_file

    folder, parts = tiny_sd_folder(tmp_path / "sd", tmp_path / "vocab" / "files")
    (tmp_path / "loras").mkdir(), (tmp_path / "embeddings").mkdir()
    peft_file(tmp_path / "loras" / "style.safetensors", lora_factors(parts["unet"], parts["text_encoder"]))
    (tmp_path / "loras" / "notes.txt").write_text("not a LoRA")
    save_file({"emb_params": 3 * torch.randn(2, parts["text_encoder"].config.hidden_size)},
              tmp_path / "embeddings" / "sks.safetensors")
    app = create_app([str(folder)], dtype="fp32", outdir=tmp_path / "out", lora_dir=tmp_path / "loras",
                     embedding_dir=tmp_path / "embeddings")
    with TestClient(app, base_url="http://127.0.0.1") as c:
        info = c.get("/api/models").json()
        assert info["loras"] == ["style"] and info["embeddings"] == ["sks"]
        body = dict(n=1, steps=2, seed=0)
        plain, styled, token = (run(c, **body, **extra)["job"] for extra in (
            {"prompt": ["a cat"]}, {"prompt": ["a cat"], "lora": ["style:0.5"]}, {"prompt": ["a sks cat"]}))
        assert all(j["status"] == "done" for j in (plain, styled, token)), [plain["error"], styled["error"]]
        assert styled["parameters"]["lora"] == [f"{(tmp_path / 'loras' / 'style.safetensors').resolve()}:0.5"]
        assert token["parameters"]["embedding"] == [f"{(tmp_path / 'embeddings' / 'sks.safetensors').resolve()}:sks"]
        assert plain["parameters"]["lora"] is None and plain["parameters"]["embedding"] is None
        (tmp_path / "embeddings" / "sks.safetensors").rename(tmp_path / "embeddings" / "other.safetensors")
        text = run(c, **body, prompt=["a sks cat"])["job"]  # the file renamed: 'sks' is text again
        assert text["parameters"]["embedding"] is None and c.get("/api/models").json()["embeddings"] == ["other"]
        plain, styled, token, text = (pixels(c.get(j["images"][0]).content) for j in (plain, styled, token, text))
        assert not np.array_equal(plain, styled) and not np.array_equal(token, text)
        for name in ("other", "../loras/style", str(tmp_path / "loras" / "style.safetensors"), "notes"):
            r = c.post("/api/jobs", json={**body, "prompt": ["a cat"], "lora": [name]})
            assert r.status_code == 400 and "unknown LoRA" in r.json()["detail"], r.text
    with pytest.raises(ValueError, match="--lora-dir .*not a folder"):
        create_app([str(folder)], lora_dir=tmp_path / "missing")


def test_shutdown_cancels_the_running_and_the_waiting_jobs(tmp_path):
    app = create_app(["mnist"], outdir=tmp_path)
    with TestClient(app, base_url="http://127.0.0.1") as c:
        running = c.post("/api/jobs", json={"n": 6, "steps": 60}).json()["id"]
        waiting = c.post("/api/jobs", json={"n": 1, "steps": 2}).json()["id"]
        deadline = time.monotonic() + 30
        while c.get(f"/api/jobs/{running}").json()["step"] < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
    t0 = time.perf_counter()
    jobs = app.state.server.queue.jobs
    assert (jobs[running].status, jobs[waiting].status) == ("cancelled", "cancelled")
    assert not app.state.server.queue.worker.is_alive() and time.perf_counter() - t0 < 1


def test_fuzzed_requests_never_break_the_server(client):
    """Random bodies (right and wrong types, extreme numbers, unknown keys, broken images) are answered 202
    or 4xx with a message, never 5xx; accepted jobs are cancelled at once."""
    st = pytest.importorskip("hypothesis.strategies")
    from hypothesis import HealthCheck, given, settings

    tiny = png(np.zeros((28, 28), np.uint8))
    values = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True),
                       st.text(max_size=30), st.sampled_from(["sample", "inpaint", "upscale", "mnist", "mnist_sr",
                                                              "euler", "data:image/png;base64,", tiny, "../x"]),
                       st.lists(st.integers(0, 9), max_size=3), st.dictionaries(st.text(max_size=5), st.integers()))
    keys = st.sampled_from(["task", "model", "prompt", "negative", "labels", "n", "sampler", "steps", "cfg",
                            "seed", "height", "width", "upsample_guidance", "ug_eta", "strength", "image", "mask",
                            "bogus"])

    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.dictionaries(keys, values, max_size=6))
    def check(body):
        r = client.post("/api/jobs", content=json.dumps(body, allow_nan=True),
                        headers={"Content-Type": "application/json"})
        assert r.status_code in (202, 400, 413, 422, 429), (body, r.text)
        if r.status_code == 202:
            client.post(f"/api/jobs/{r.json()['id']}/cancel")
        else:
            assert r.json()["detail"]

    check()
    assert client.get("/api/models").status_code == 200


def test_the_worker_samples_with_the_threads_asked_for_and_restores_the_setting(tmp_path):
    threads = torch.get_num_threads()
    seen = []
    app = create_app(["mnist"], outdir=tmp_path, threads=threads + 1)
    with TestClient(app, base_url="http://127.0.0.1") as c:
        app.state.server.queue.models["mnist"].pipe.net.register_forward_hook(
            lambda *_: seen.append(torch.get_num_threads()))
        assert run(c, labels=[0], n=1, steps=1, seed=0)["job"]["status"] == "done"
    assert seen and set(seen) == {threads + 1}
    assert torch.get_num_threads() == threads  # restored when the server stops
