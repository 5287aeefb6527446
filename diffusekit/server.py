"""`diffusekit serve`: a local web UI and JSON API over one job queue, whose single worker owns the models.

request (JSON) -> checks (the CLI's `plan`: 4xx before any work) -> queue -> worker: `generate` with a
per-step callback (progress, preview, cancel) -> PNGs written as `sample` writes them (--from-png reruns
them) -> gallery. Clients follow a job over server-sent events. Models are chosen by name among those the
server was started with, and files only by job id and index: no request names a path.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import contextlib
import io
import json
import secrets
import threading
import time
import traceback
import uuid
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Iterator, Literal, Sequence

import torch
from PIL import Image

from .cli import BUNDLED, UG_MAX, load, model_folder, plan, recorded, sample_arguments, version, write_outputs
from .images import grid_image
from .pipelines.common import Pipeline, generate
from .samplers import SAMPLERS
from .schedules import img2img_grid
from .validation import did_you_mean

try:
    from fastapi import FastAPI, HTTPException, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
    from pydantic import BaseModel, ConfigDict, Field
except ImportError as e:
    raise ImportError("diffusekit serve needs FastAPI and uvicorn: pip install 'diffusekit[serve]'") from e

WEB = Path(__file__).parent / "web"
TASKS = {"txt2img": "sample", "img2img": "img2img", "inpaint": "inpaint", "upscale": "upscale"}  # -> CLI command
PREVIEW_EVERY = 0.25  # seconds between live previews (the first step always has one)
FINAL = ("done", "failed", "cancelled")


@dataclass
class Limits:
    """What one request may ask for; max_side 0 is 8x the largest training side of the served models."""

    max_steps: int = 100
    max_images: int = 64
    max_side: int = 0
    max_queue: int = 32
    max_upload: int = 4 << 20  # bytes of an uploaded image or mask
    keep_jobs: int = 500  # finished jobs listed in the gallery (their files stay on disk)


class JobRequest(BaseModel):
    """One generation request; null fields take the model's or the CLI's defaults."""

    model_config = ConfigDict(extra="forbid")
    task: Literal["txt2img", "img2img", "inpaint", "upscale"] = "txt2img"
    model: str | None = Field(None, max_length=200, description="a served model's name; null: the first")
    prompt: str | None = Field(None, max_length=2000)
    negative_prompt: str | None = Field(None, max_length=2000)
    label: int | None = Field(None, ge=0, description="class label; null: every class, n images each")
    n: int = Field(4, ge=1, description="images per class / prompt")
    sampler: str = "dpmpp_2m"
    steps: int = Field(20, ge=1)
    cfg: float = Field(3.0, allow_inf_nan=False)
    seed: int | None = Field(None, ge=-(2**63), lt=2**64, description="null: a random seed, returned")
    height: int | None = Field(None, ge=1, description="null: the model's size, or the input image's")
    width: int | None = Field(None, ge=1)
    upsample_guidance: float | None = Field(None, ge=0, le=UG_MAX, description="Upsample Guidance weight w")
    ug_eta: float = Field(1.0, ge=0, le=1)
    strength: float | None = Field(None, gt=0, le=1, description="img2img / inpaint; null: 0.6 / 1.0")
    image: str | None = Field(None, description="input image: a data URL or base64 (img2img, inpaint, upscale)")
    mask: str | None = Field(None, description="inpainting mask of the image's size, white = regenerate")


class QueueFull(Exception):
    """The queue holds Limits.max_queue jobs already."""


class Cancelled(Exception):
    """Raised from the sampler's callback when a running job is cancelled."""


class TooLarge(ValueError):
    """An upload over Limits.max_upload, or an image over the size limit."""


@dataclass
class Served:
    """A loaded model and how it was named."""

    pipe: Pipeline
    source: str  # as given to `serve` (a bundled name or a path): what --from-png loads
    folder: Path
    dtype: str

    def info(self, name: str) -> dict[str, Any]:
        pipe = self.pipe
        kind = "class" if pipe.num_classes else "text" if pipe.text_encoder is not None else "unconditional"
        channels = pipe.latent_shape(*pipe.resolution)[0]
        tasks = (["upscale"] if pipe.low_res_factor else ["inpaint"] if pipe.net.config.in_channels != channels
                 else ["txt2img", "img2img", "inpaint"])
        return {"name": name, "kind": kind, "classes": pipe.num_classes, "resolution": list(pipe.resolution),
                "channels": pipe.channels, "factor": pipe.size_multiple, "tasks": tasks,
                "low_res_factor": pipe.low_res_factor, "dtype": self.dtype}


@dataclass
class Job:
    """A request resolved against its model, and its state as the worker advances it."""

    id: str
    model: str
    request: dict[str, Any]
    args: argparse.Namespace
    inputs: dict[str, Any]
    kw: dict[str, Any]
    rows: list[str] | None
    own: list[dict[str, Any]]
    status: str = "queued"
    step: int = 0
    total: int = 0
    preview: str | None = None  # data URL of the latest clean-image estimates
    error: str | None = None
    grid: Path | None = None
    images: list[Path] = field(default_factory=list)
    parameters: dict[str, Any] | None = None
    created: float = field(default_factory=time.time)  # (wall-clock times)
    started: float | None = None
    finished: float | None = None
    seconds: float | None = None  # sampling and writing
    cancel: threading.Event = field(default_factory=threading.Event)


class JobQueue:
    """Jobs in submission order and the one worker thread that runs them; every field of a job is read and
    written under `lock`."""

    def __init__(self, models: dict[str, Served], limits: Limits, threads: int = 0):
        self.models, self.limits, self.threads = models, limits, threads
        self.lock = threading.Lock()
        self.wake = threading.Condition(self.lock)
        self.jobs: dict[str, Job] = {}
        self.pending: deque[str] = deque()
        self.closed = False
        self.worker = threading.Thread(target=self.work, name="diffusekit-worker", daemon=True)

    def start(self) -> None:
        self.worker.start()

    def close(self) -> None:
        """Cancel what waits and what runs (at its next step), and stop the worker."""
        with self.wake:
            self.closed = True
            for job in self.jobs.values():
                job.cancel.set()
            for job_id in self.pending:
                self.jobs[job_id].status = "cancelled"
            self.pending.clear()
            self.wake.notify_all()
        if self.worker.is_alive():
            self.worker.join(timeout=30)

    def submit(self, job: Job) -> None:
        with self.wake:
            if len(self.pending) >= self.limits.max_queue:
                raise QueueFull(f"the queue is full ({self.limits.max_queue} jobs waiting); try again later")
            self.jobs[job.id] = job
            self.pending.append(job.id)
            finished = [j for j in self.jobs.values() if j.status in FINAL]
            for old in finished[:max(0, len(finished) - self.limits.keep_jobs)]:
                del self.jobs[old.id]
            self.wake.notify()

    def get(self, job_id: str) -> Job:
        with self.lock:
            if job_id not in self.jobs:
                raise KeyError(job_id)
            return self.jobs[job_id]

    def cancel(self, job_id: str) -> dict[str, Any]:
        """Cancel a queued job now, a running one at its next step; a finished one stays as it is."""
        with self.lock:
            job = self.jobs[job_id]
            job.cancel.set()
            if job.status == "queued":
                self.pending.remove(job_id)
                job.status = "cancelled"
            return self.view(job)

    def view(self, job: Job) -> dict[str, Any]:
        """The job as the API shows it (call under `lock`)."""
        url = f"/api/jobs/{job.id}"
        done = job.status == "done"
        return {"id": job.id, "model": job.model, "status": job.status,
                "position": self.pending.index(job.id) if job.status == "queued" else None,
                "step": job.step, "total": job.total, "error": job.error, "request": job.request,
                "seed": job.args.seed, "images": [f"{url}/images/{k}.png" for k in range(len(job.images))] if done
                else [], "grid": f"{url}/grid.png" if done else None, "parameters": job.parameters,
                "created": job.created, "started": job.started, "finished": job.finished, "seconds": job.seconds}

    def work(self) -> None:
        """Run jobs in this thread until `close` (the worker thread's loop; `serve` runs it in the main thread,
        where torch's CPU kernels run faster than in any other)."""
        before = torch.get_num_threads()  # (torch's setting is the process's: restored when the worker stops)
        torch.set_num_threads(self.threads or before)
        try:
            while True:
                with self.wake:
                    while not self.pending and not self.closed:
                        self.wake.wait()
                    if self.closed:
                        return
                    job = self.jobs[self.pending.popleft()]
                    job.status, job.started = "running", time.time()
                self._run(job)
        finally:
            torch.set_num_threads(before)

    def _run(self, job: Job) -> None:
        served = self.models[job.model]
        pipe, t0, last = served.pipe, time.perf_counter(), [-float("inf")]

        def on_step(i: int, t: float, x: torch.Tensor, p: Any) -> None:
            if job.cancel.is_set():
                raise Cancelled
            preview = None
            if time.perf_counter() - last[0] >= PREVIEW_EVERY:
                last[0] = time.perf_counter()
                preview = data_url(grid_image(pipe.decode(p.x0).float().clamp(-1, 1), job.args.n))
            with self.lock:
                job.step = i + 1
                job.preview = preview or job.preview

        try:
            g = torch.Generator().manual_seed(job.args.seed)
            images = generate(pipe, len(job.own), **job.inputs, **job.kw, generator=g, callback=on_step)
            parameters = recorded(job.args, served.folder)
            grid = write_outputs(images, job.args, job.rows, job.own, parameters)
            state = dict(status="done", grid=grid, parameters=parameters, step=job.total,
                         images=[grid.with_suffix("") / f"{k:03d}.png" for k in range(len(job.own))])
        except Cancelled:
            state = dict(status="cancelled")
        except Exception as e:  # the job fails, the server goes on; a bug also shows its traceback
            if not isinstance(e, (ValueError, OSError, FloatingPointError)):
                traceback.print_exc()
            state = dict(status="failed", error=" ".join(str(e).split()) or type(e).__name__)
        with self.lock:
            for k, v in state.items():
                setattr(job, k, v)
            job.seconds, job.finished = round(time.perf_counter() - t0, 3), time.time()


def data_url(img: Image.Image) -> str:
    """A PIL image as a PNG data URL."""
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def save_upload(data: str, path: Path, limits: Limits, what: str) -> Path:
    """Decode an uploaded image (a data URL or plain base64), check its size, and write it as PNG at `path`."""
    b64 = data.partition(",")[2] if data.startswith("data:") else data
    if len(b64) * 3 // 4 > limits.max_upload:
        raise TooLarge(f"{what} is over the upload limit of {limits.max_upload} bytes")
    try:
        raw = base64.b64decode(b64, validate=True)
        with Image.open(io.BytesIO(raw)) as img:
            if max(img.size) > limits.max_side:
                raise TooLarge(f"{what} is {img.height}x{img.width}, over this server's limit of "
                               f"{limits.max_side} a side")
            img.load()
            if img.mode not in ("1", "L", "LA", "I", "I;16", "P", "RGB", "RGBA"):
                img = img.convert("RGB")
            path.parent.mkdir(parents=True, exist_ok=True)
            img.save(path, format="PNG")
    except (binascii.Error, OSError, Image.DecompressionBombError) as e:
        raise ValueError(f"{what} is not a readable image (PNG, JPEG, ... as a data URL or base64): {e}") from e
    return path


class Server:
    """The served models, the queue, and how a request becomes a job."""

    def __init__(self, models: Sequence[str], device: str, dtype: str, outdir: str | Path, limits: Limits,
                 threads: int = 0):
        self.outdir, self.device = Path(outdir), device
        self.models: dict[str, Served] = {}
        for source in models:
            args = argparse.Namespace(device=device, dtype=dtype)
            folder = model_folder(source)
            name = source if source in BUNDLED else folder.name
            if name in self.models:
                raise ValueError(f"two served models are named {name!r}; serve them from folders of different names")
            self.models[name] = Served(load(folder, args), source, folder, args.dtype)
        if not self.models:
            raise ValueError("serve needs at least one model")
        side = max(max(s.pipe.resolution) * max(s.pipe.low_res_factor, 1) for s in self.models.values())
        self.limits = Limits(**{**vars(limits), "max_side": limits.max_side or 8 * side})
        self.queue = JobQueue(self.models, self.limits, threads)
        self.model_info = {name: s.info(name) for name, s in self.models.items()}
        cli = sample_arguments("sample")
        self.description = {  # (fixed while the server runs: GET /api/models)
            "models": list(self.model_info.values()), "samplers": list(SAMPLERS),
            "defaults": {**{k: getattr(cli, k) for k in ("sampler", "steps", "cfg", "ug_eta")}, "n": 4,
                         "strength": {t: sample_arguments(t).strength for t in ("img2img", "inpaint")},
                         "upsample_guidance": 0.2}, "limits": vars(self.limits)}

    def prepare(self, req: JobRequest) -> Job:
        """Check a request against its model and the limits, save its uploads, and resolve it into a job
        (ValueError naming the problem; nothing is queued)."""
        name = req.model or next(iter(self.models))
        if name not in self.models:
            raise ValueError(f"unknown model {name!r}{did_you_mean(name, self.models)}; served: "
                             f"{', '.join(self.models)}")
        served, lim = self.models[name], self.limits
        if req.task not in (tasks := self.model_info[name]["tasks"]):
            raise ValueError(f"model {name} does not do {req.task}; it does {', '.join(tasks)}")
        if req.sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {req.sampler!r}{did_you_mean(req.sampler, SAMPLERS)}")
        if req.steps > lim.max_steps:
            raise ValueError(f"steps {req.steps} is over this server's limit of {lim.max_steps}")
        if req.n > lim.max_images:
            raise ValueError(f"n {req.n} is over this server's limit of {lim.max_images} images per job")
        wants = {"image": req.task != "txt2img", "mask": req.task == "inpaint"}
        for what, needed in wants.items():
            if needed != (getattr(req, what) is not None):
                raise ValueError(f"{req.task} {'needs' if needed else 'takes no'} input {what}")
        job_id = uuid.uuid4().hex
        paths = {what: str(save_upload(getattr(req, what), self.outdir / "inputs" / f"{job_id}-{what}.png", lim, what))
                 for what, needed in wants.items() if needed}
        fields = dict(model=served.source, labels=None if req.label is None else [req.label],
                      prompt=req.prompt and [req.prompt], negative=req.negative_prompt and [req.negative_prompt],
                      n=req.n, seed=secrets.randbelow(2**31) if req.seed is None else req.seed, sampler=req.sampler,
                      steps=req.steps, cfg=req.cfg, upsample_guidance=req.upsample_guidance, ug_eta=req.ug_eta,
                      height=req.height, width=req.width, input_image=paths.get("image"), mask=paths.get("mask"),
                      dtype=served.dtype, device=self.device, outdir=str(self.outdir))
        if req.strength is not None and req.task in ("img2img", "inpaint"):
            fields["strength"] = req.strength
        args = sample_arguments(TASKS[req.task], **fields)
        try:
            inputs, kw, rows, own = plan(args, served.pipe)
            if max(args.height, args.width) > lim.max_side:
                raise ValueError(f"size {args.height}x{args.width} is over this server's limit of {lim.max_side} "
                                 "a side")
            if len(own) > lim.max_images:
                raise ValueError(f"{len(own)} images is over this server's limit of {lim.max_images} per job")
        except ValueError:
            for path in paths.values():  # a refused request leaves nothing behind
                Path(path).unlink()
            raise
        total = len(img2img_grid(torch.arange(args.steps + 1), args.strength)) - 1 if "image" in inputs \
            else args.steps
        request = req.model_dump(exclude={"image", "mask"}) | {"model": name, "seed": args.seed}
        return Job(job_id, name, request, args, inputs, kw, rows, own, total=total)


def create_app(models: Sequence[str] = tuple(BUNDLED), device: str = "cpu", dtype: str = "auto",
               outdir: str | Path = "out/serve", limits: Limits | None = None, threads: int = 0,
               worker_thread: bool = True) -> FastAPI:
    """The FastAPI app serving `models` (bundled names or folders) from one worker on `device`, which samples
    with `threads` torch threads (0: torch's default) in a thread of its own, or with worker_thread=False
    wherever `app.state.server.queue.work()` is called (`serve`: the main thread, where torch's CPU kernels run
    about 25% faster than in other threads: BENCHMARKS.md)."""
    server = Server(models, device, dtype, outdir, limits or Limits(), threads)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if worker_thread:
            server.queue.start()
        yield
        server.queue.close()

    app = FastAPI(title="diffusekit", version=version(), lifespan=lifespan,
                  description=__doc__)
    app.state.server = server
    queue = server.queue

    @app.exception_handler(ValueError)
    async def bad_request(request: Request, e: ValueError) -> JSONResponse:
        return JSONResponse({"detail": " ".join(str(e).split())}, status_code=413 if isinstance(e, TooLarge) else 400)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        """422 naming each field's problem, without echoing the input (an image may be megabytes, or NaN)."""
        return JSONResponse({"detail": [{k: err[k] for k in ("loc", "msg", "type")} for err in e.errors()]},
                            status_code=422)

    @app.exception_handler(QueueFull)
    async def queue_full(request: Request, e: QueueFull) -> JSONResponse:
        return JSONResponse({"detail": str(e)}, status_code=429, headers={"Retry-After": "5"})

    def job_of(job_id: str) -> Job:
        try:
            return queue.get(job_id)
        except KeyError:
            raise HTTPException(404, f"no job {job_id!r}") from None

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(WEB / "index.html", media_type="text/html")

    @app.get("/api/models")
    async def models_() -> JSONResponse:
        """The served models, samplers, defaults and limits."""
        return JSONResponse(server.description)

    @app.post("/api/jobs", status_code=202)
    def submit(req: JobRequest) -> dict[str, Any]:
        """Queue a generation; 400 names what is wrong with it, 429 when the queue is full."""
        job = server.prepare(req)
        queue.submit(job)
        with queue.lock:
            return queue.view(job)

    @app.get("/api/jobs")
    async def jobs() -> JSONResponse:
        """Every job this server holds, newest first."""
        with queue.lock:
            return JSONResponse({"jobs": [queue.view(j) for j in reversed(queue.jobs.values())]})

    @app.get("/api/jobs/{job_id}")
    async def job(job_id: str) -> JSONResponse:
        job = job_of(job_id)
        with queue.lock:
            return JSONResponse(queue.view(job))

    @app.post("/api/jobs/{job_id}/cancel")
    async def cancel(job_id: str) -> JSONResponse:
        """Cancel a queued job at once, a running one at its next step."""
        job_of(job_id)
        return JSONResponse(queue.cancel(job_id))

    @app.get("/api/jobs/{job_id}/images/{index}.png", response_class=FileResponse)
    async def image(job_id: str, index: int) -> FileResponse:
        job = job_of(job_id)
        if not 0 <= index < len(job.images):
            raise HTTPException(404, f"job {job_id} has no image {index}")
        return FileResponse(job.images[index], media_type="image/png")

    @app.get("/api/jobs/{job_id}/grid.png", response_class=FileResponse)
    async def grid(job_id: str) -> FileResponse:
        job = job_of(job_id)
        if job.grid is None:
            raise HTTPException(404, f"job {job_id} has no result ({job.status})")
        return FileResponse(job.grid, media_type="image/png")

    @app.get("/api/jobs/{job_id}/events")
    async def events(job_id: str) -> StreamingResponse:
        """Server-sent events: `status` (first, and when the queue position changes), `progress` (step, total,
        preview as a PNG data URL), then one of `done`, `failed`, `cancelled`, which ends the stream."""
        job = job_of(job_id)

        async def stream() -> AsyncIterator[str]:
            sent: dict[str, Any] = {}
            while True:
                with queue.lock:
                    view, preview = queue.view(job), job.preview
                if view["status"] in FINAL or queue.closed:  # (closing: a running job is being cancelled)
                    yield f"event: {view['status'] if view['status'] in FINAL else 'cancelled'}\n" \
                          f"data: {json.dumps(view)}\n\n"
                    return
                if (view["status"], view["position"]) != sent.get("status"):
                    sent["status"] = view["status"], view["position"]
                    yield f"event: status\ndata: {json.dumps(view)}\n\n"
                if view["status"] == "running" and (view["step"], preview) != sent.get("progress"):
                    update = {"step": view["step"], "total": view["total"]}
                    if preview is not sent.get("preview"):
                        update["preview"] = sent["preview"] = preview
                    sent["progress"] = view["step"], preview
                    yield f"event: progress\ndata: {json.dumps(update)}\n\n"
                await asyncio.sleep(0.05)

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return app


@contextlib.contextmanager
def background(app: FastAPI, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Run `app` under uvicorn in a background thread (port 0: a free one) and yield its base URL; the server
    stops when the block ends. For notebooks, tests and benchmarks."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name="diffusekit-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"the server did not start on {host}:{port}")
        time.sleep(0.02)
    try:
        yield f"http://{host}:{server.servers[0].sockets[0].getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=60)


def serve(args: argparse.Namespace) -> None:
    """`create_app` with the options of `diffusekit serve`, run by uvicorn until interrupted."""
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: serving on {args.host}: anyone who reaches this address can use the server "
              "(there is no authentication)")
    limits = Limits(max_steps=args.max_steps, max_images=args.max_images, max_side=args.max_side,
                    max_queue=args.max_queue)
    app = create_app(args.model or list(BUNDLED), args.device, args.dtype, args.outdir, limits, args.threads,
                     worker_thread=False)
    queue = app.state.server.queue
    with background(app, args.host, args.port) as url:
        print(f"diffusekit: {', '.join(app.state.server.models)} at {url}/", flush=True)
        try:
            queue.work()  # (uvicorn answers in its thread; the models sample in this one)
        except KeyboardInterrupt:
            print("diffusekit: stopped")
        finally:
            queue.close()
