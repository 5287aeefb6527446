"""`diffusekit serve`: a local web UI and JSON API over one job queue, whose single worker owns the models.

request (JSON: the fields of `diffusekit.requests.Request`) -> Request and its plan against the model (4xx
before any work) -> queue -> worker: `requests.run` with a per-step callback (progress, preview, cancel) ->
PNGs written by `outputs.write`, as `sample` writes them (--from-png reruns them) -> gallery. Clients follow a job over server-sent events. Models are chosen by name among those the
server was started with, and files only by job id and index: no request names a path.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import dataclasses
import io
import json
import secrets
import signal
import threading
import time
import traceback
import uuid
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, AsyncIterator, Callable, Iterator, Literal, Sequence

import torch
from PIL import Image

from . import defaults
from .bundled import MODELS, model_folder
from .images import grid_image, map_colours, standard_mode
from .outputs import Destination, parameters, sweep_parameters, version, write, write_sweep
from .pipelines import Pipeline
from .prompts import SYNTAXES
from .requests import (EMBEDDING_FILES, LORA_FILES, MAX_AXES, SWEEPABLE, TASKS, Limits, Plan, Request,
                       cell_labels, check_task, load_model, mentioned_embeddings, named_files, parse_sweep, plan,
                       resolve_loras, run, run_all, sweep)
from .samplers import SAMPLERS
from .validation import did_you_mean

try:
    from fastapi import FastAPI, HTTPException
    from fastapi import Request as HTTPRequest
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
    from pydantic import BaseModel, ConfigDict, Field
except ImportError as e:
    raise ImportError("diffusekit serve needs FastAPI and uvicorn: pip install 'diffusekit[serve]'") from e

WEB = Path(__file__).parent / "web"
PREVIEW_EVERY = 0.25  # seconds between live previews (the first step always has one)
FINAL = ("done", "failed", "cancelled")


Prompt = Field(max_length=2000)


class JobRequest(BaseModel):
    """One generation request: the fields of a `Request` that a client may set, with the images as data; null
    fields take the model's or the request's defaults."""

    model_config = ConfigDict(extra="forbid")
    task: Literal[TASKS] = Request.task
    model: str | None = Field(None, max_length=200, description="a served model's name; null: the first")
    prompt: list[Annotated[str, Prompt]] | None = Field(None, max_length=16, description="prompts, one row each")
    negative: list[Annotated[str, Prompt]] | None = Field(None, max_length=16,
                                                          description="one negative prompt, or one per prompt")
    lora: list[Annotated[str, Field(max_length=200)]] | None = Field(
        None, max_length=8, description="LoRAs of the server's --lora-dir by name, each NAME or NAME:SCALE")
    sweep: list[Annotated[str, Field(max_length=1000)]] | None = Field(
        None, max_length=MAX_AXES, description="an X/Y/Z plot: one OPTION=V1,V2,... per axis (requests.SWEEPABLE)")
    prompt_syntax: Literal[SYNTAXES] = Field(Request.prompt_syntax, description="a1111 (weights, long prompts) or "
                                                                             "plain")
    labels: list[Annotated[int, Field(ge=0)]] | None = Field(None, max_length=1000,
                                                             description="class labels; null: every class")
    n: int = Field(Request.n, ge=1, description="images per class / prompt")
    sampler: str = Request.sampler
    steps: int = Field(Request.steps, ge=1)
    cfg: float = Field(Request.cfg, allow_inf_nan=False)
    seed: int | None = Field(None, ge=-(2**63), lt=2**64, description="null: a random seed, returned")
    height: int | None = Field(None, ge=1, description="null: the model's size, or the input image's")
    width: int | None = Field(None, ge=1)
    upsample_guidance: Annotated[float, Field(ge=0, le=defaults.UG_MAX)] | Literal[defaults.UG_AUTO] | None = Field(
        None, description=f"Upsample Guidance weight w, or {defaults.UG_AUTO!r}")
    ug_eta: float = Field(Request.ug_eta, ge=0, le=1)
    cfg_until: float = Field(Request.cfg_until, gt=0, le=1, description="CFG over this first fraction of the steps")
    cache: int = Field(Request.cache, ge=1, description="recompute the UNet's deep features every this many steps")
    cache_depth: int = Field(Request.cache_depth, ge=0)
    vae_tile: int | None = Field(None, ge=0, description="latent models: decode tile in pixels; 0: whole")
    strength: float | None = Field(None, gt=0, le=1, description="img2img / inpaint; null: the task's default")
    outpaint: str | None = Field(None, max_length=100, description="outpaint: pixels added per side, "
                                                                    "\"left=64,right=64,top=0,bottom=0\"")
    mask_blur: int | None = Field(None, ge=0, le=256, description="inpaint / outpaint: soft seam in pixels")
    image: str | None = Field(None, description="input image: a data URL or base64 (img2img, inpaint, upscale)")
    mask: str | None = Field(None, description="inpainting mask of the image's size, white = regenerate")
    layout: str | None = Field(None, max_length=4000, description="layout models' boxes: \"red circle 0.1 0.1 0.4 "
                                                                  "0.4; ...\" or JSON (x0 y0 x1 y1 in [0, 1])")
    map: str | None = Field(None, description="semantic map (map models): a palette or grey PNG of class indices, "
                                              "or painted in the classes' colours (GET /api/models)")


UPLOADS = {"image": "input_image", "mask": "mask", "map": "map"}  # JobRequest's images -> their Request fields


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
        return {"name": name, "kind": pipe.conditioning, "classes": pipe.num_classes,
                "resolution": list(pipe.resolution), "channels": pipe.channels, "factor": pipe.size_multiple,
                "tasks": list(pipe.tasks), "low_res_factor": pipe.low_res_factor, "dtype": self.dtype,
                "layout_classes": list(pipe.layout_classes),  # (layout models)
                "map_classes": list(pipe.map_classes),  # (map models) and the colour that paints each
                "map_colours": map_colours(len(pipe.map_classes)).int().tolist()}


@dataclass
class Job:
    """A request resolved against its model, and its state as the worker advances it."""

    id: str
    model: str
    request: dict[str, Any]  # as the client sent it (without its images), with the model's name and the seed
    plan: Plan  # (a sweep's first cell)
    destination: Destination
    uploads: list[Path] = field(default_factory=list)  # its input files, removed if it never runs
    status: str = "queued"
    step: int = 0
    total: int = 0
    done_steps: int = 0  # (a sweep's: the steps of its finished cells)
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
    axes: list[tuple[str, list[Any]]] = field(default_factory=list)  # a sweep's axes (none: a single run)
    cells: list[Plan] = field(default_factory=list)  # and the plans of its cells


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
                discard(self.jobs[job_id])
            self.pending.clear()
            self.wake.notify_all()
        if self.worker.is_alive():
            self.worker.join(timeout=30)

    def submit(self, job: Job) -> None:
        with self.wake:
            if len(self.pending) >= self.limits.max_queue:
                discard(job)
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
                discard(job)
            return self.view(job)

    def view(self, job: Job) -> dict[str, Any]:
        """The job as the API shows it (call under `lock`)."""
        url = f"/api/jobs/{job.id}"
        done = job.status == "done"
        return {"id": job.id, "model": job.model, "status": job.status,
                "position": self.pending.index(job.id) if job.status == "queued" else None,
                "step": job.step, "total": job.total, "error": job.error, "request": job.request,
                "seed": job.plan.request.seed, "images": [f"{url}/images/{k}.png" for k in range(len(job.images))] if done
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
                preview = data_url(grid_image(pipe.decode(p.x0).float().clamp(-1, 1), job.plan.request.n))
            with self.lock:
                job.step = job.done_steps + i + 1
                job.preview = preview or job.preview

        try:
            if job.axes:
                grid = write_sweep(self._cells(job, pipe, on_step), job.axes, job.destination, served.folder)
                images = [grid.with_suffix("") / label / f"{k:03d}.png"
                          for p, label in zip(job.cells, cell_labels(job.axes)) for k in range(p.images)]
                record = sweep_parameters(job.plan, job.axes, served.folder)
            else:
                grid = write(run(job.plan, pipe, callback=on_step), job.plan, job.destination, served.folder)
                images = [grid.with_suffix("") / f"{k:03d}.png" for k in range(job.plan.images)]
                record = parameters(job.plan, served.folder)
            state = dict(status="done", grid=grid, parameters=record, step=job.total, images=images)
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

    def _cells(self, job: Job, pipe: Pipeline, on_step: Callable) -> Iterator[tuple[Plan, torch.Tensor]]:
        """A sweep job's cells and their images as they are sampled (`run_all`), its steps counted across them."""
        with contextlib.closing(run_all(job.cells, pipe, callback=on_step)) as runs:
            for p in job.cells:
                images = next(runs)
                with self.lock:
                    job.done_steps += p.total_steps
                yield p, images


def discard(job: Job) -> None:
    """Remove the input files of a job that will not run."""
    for path in job.uploads:
        path.unlink(missing_ok=True)


def data_url(img: Image.Image) -> str:
    """A PIL image as a PNG data URL."""
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


LOOPBACK = ("127.0.0.1", "localhost", "::1")
UNSAFE_METHODS = ("POST", "PUT", "PATCH", "DELETE")
ECHO = 64  # characters of a client's value that an error message repeats


def short(text: str) -> str:
    """A client's value as an error message may repeat it: at most ECHO characters."""
    return repr(text if len(text) <= ECHO else text[:ECHO] + "...")


def split_host(value: str) -> tuple[str, str | None]:
    """A Host header's name and port: 'localhost:8000', '[::1]:8000', '127.0.0.1'."""
    if value.startswith("["):
        name, _, rest = value[1:].partition("]")
        return name, rest[1:] if rest.startswith(":") else None
    name, sep, port = value.rpartition(":") if value.count(":") == 1 else (value, "", "")
    return (name, port) if sep else (value, None)


@dataclass
class Guard:
    """Who may talk to the server: the Host header must name this server (against DNS rebinding), a state-changing
    request must come from its own origin (against cross-site requests), bodies are bounded before they are parsed,
    and with a token every request but the page's first load must present it (header, cookie or ?token=)."""

    hosts: set[str]  # host names the server answers to
    max_body: int  # bytes of a request body
    token: str | None = None
    port: int | None = None  # the bound port, once known (any port before)

    def host_problem(self, host: str) -> str | None:
        name, port = split_host(host)
        if name.lower() not in self.hosts or (self.port is not None and port not in (None, str(self.port))):
            return f"this server does not answer to host {short(host)}"
        return None

    def origin_problem(self, method: str, headers: dict[str, str]) -> str | None:
        if method not in UNSAFE_METHODS:
            return None
        origin = headers.get("origin")
        if origin is not None:
            return None if origin == f"http://{headers.get('host', '')}" else \
                f"cross-origin request from {short(origin)} refused"
        if headers.get("sec-fetch-site") == "cross-site":
            return "cross-site request refused"
        return None

    def token_given(self, headers: dict[str, str], query: str) -> bool:
        given = {headers.get("authorization", "").removeprefix("Bearer ").strip(),
                 *(c.strip().removeprefix("diffusekit_token=") for c in headers.get("cookie", "").split(";")),
                 *(q.removeprefix("token=") for q in query.split("&") if q.startswith("token="))}
        return any(secrets.compare_digest(g, self.token) for g in given if g)


class GuardMiddleware:
    """ASGI middleware applying a Guard before the app sees a request; the body is read here, at most
    Guard.max_body bytes of it (a Content-Length over the limit is refused before any is read)."""

    def __init__(self, app: Any, guard: Guard):
        self.app, self.guard = app, guard

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        g = self.guard
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        query = scope.get("query_string", b"").decode("latin-1")
        if problem := g.host_problem(headers.get("host", "")):
            return await refuse(send, 421, problem)
        if problem := g.origin_problem(scope["method"], headers):
            return await refuse(send, 403, problem)
        extra = []
        if g.token is not None and not g.token_given(headers, query):
            return await refuse(send, 401, "this server needs its token: open the URL it printed at start, or "
                                           "send Authorization: Bearer TOKEN")
        if g.token is not None and "token=" in query:  # the page's first load: keep the token in a cookie
            extra.append((b"set-cookie", f"diffusekit_token={g.token}; HttpOnly; SameSite=Strict; Path=/".encode()))
        length = headers.get("content-length", "0")
        if not length.isdecimal() or int(length) > g.max_body:
            return await refuse(send, 413, f"request body over this server's limit of {g.max_body} bytes")
        body, more = bytearray(), True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > g.max_body:
                return await refuse(send, 413, f"request body over this server's limit of {g.max_body} bytes")
        done = False

        async def replay() -> dict:
            nonlocal done
            if done:
                return await receive()
            done = True
            return {"type": "http.request", "body": bytes(body), "more_body": False}

        async def send_with(message: dict) -> None:
            if message["type"] == "http.response.start" and extra:
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        await self.app(scope, replay, send_with)


async def refuse(send: Any, status: int, detail: str) -> None:
    """Answer a request with a JSON error, without the app."""
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def save_upload(data: str, path: Path, limits: Limits, what: str) -> Path:
    """Decode an uploaded image (a data URL of an image type, or plain base64), check its size, and write it as an
    8-bit greyscale or RGB PNG at `path` (`images.standard_mode`); a map's palette or grey image as it is (its
    pixels are class indices)."""
    if data.startswith("data:"):
        header, _, b64 = data[5:].partition(",")
        mime = header.split(";")[0].strip().lower()
        if mime and not mime.startswith("image/"):
            raise ValueError(f"{what} must be an image data URL (image/png, image/jpeg, ...), got {short(mime)}")
    else:
        b64 = data
    if len(b64) * 3 // 4 > limits.max_upload:
        raise TooLarge(f"{what} is over the upload limit of {limits.max_upload} bytes")
    try:
        raw = base64.b64decode(b64, validate=True)
        with Image.open(io.BytesIO(raw)) as img:
            if max(img.size) > limits.max_side:
                raise TooLarge(f"{what} is {img.height}x{img.width}, over this server's limit of "
                               f"{limits.max_side} a side")
            img.load()
            img = img if what == "map" and img.mode in ("P", "L") else standard_mode(img)
            path.parent.mkdir(parents=True, exist_ok=True)
            img.save(path, format="PNG")
    except (binascii.Error, OSError, Image.DecompressionBombError) as e:
        raise ValueError(f"{what} is not a readable image (PNG, JPEG, ... as a data URL or base64): {e}") from e
    return path


class Server:
    """The served models, the queue, and how a request becomes a job."""

    def __init__(self, models: Sequence[str], device: str, dtype: str, outdir: str | Path, limits: Limits,
                 threads: int = 0, lora_dir: str | Path | None = None, embedding_dir: str | Path | None = None):
        self.outdir, self.device = Path(outdir), device
        for what, folder in (("--lora-dir", lora_dir), ("--embedding-dir", embedding_dir)):
            if folder is not None and not Path(folder).is_dir():
                raise ValueError(f"{what} {folder}: not a folder")
        self.lora_dir, self.embedding_dir = lora_dir, embedding_dir
        self.models: dict[str, Served] = {}
        for source in models:
            folder = model_folder(source)
            name = source if source in MODELS else folder.name
            if name in self.models:
                raise ValueError(f"two served models are named {name!r}; serve them from folders of different names")
            pipe, resolved = load_model(source, device, dtype)
            self.models[name] = Served(pipe, source, folder, resolved)
        if not self.models:
            raise ValueError("serve needs at least one model")
        side = max(max(s.pipe.resolution) * max(s.pipe.low_res_factor, 1) for s in self.models.values())
        self.limits = dataclasses.replace(limits, max_side=limits.max_side or 8 * side)
        self.queue = JobQueue(self.models, self.limits, threads)
        self.model_info = {name: s.info(name) for name, s in self.models.items()}
        self.description = {  # (fixed while the server runs: GET /api/models, with the files of `files`)
            "models": list(self.model_info.values()), "samplers": list(SAMPLERS), "sweepable": list(SWEEPABLE),
            "defaults": {"sampler": Request.sampler, "steps": Request.steps, "cfg": Request.cfg,
                         "ug_eta": Request.ug_eta, "cfg_until": Request.cfg_until, "cache": Request.cache,
                         "n": Request.n, "strength": defaults.STRENGTH, "mask_blur": defaults.MASK_BLUR, "prompt_syntax": Request.prompt_syntax,
                         "upsample_guidance": defaults.UG_W}, "limits": dataclasses.asdict(self.limits)}

    def files(self) -> dict[str, dict[str, Path]]:
        """The LoRA and embedding files served now, by name (read from their folders at each call, so that files
        added while the server runs are offered)."""
        return {"loras": named_files(self.lora_dir, LORA_FILES),
                "embeddings": named_files(self.embedding_dir, EMBEDDING_FILES)}

    def prepare(self, req: JobRequest) -> Job:
        """Check a request against its model and the limits, save its uploads, and resolve it into a job
        (ValueError naming the problem; nothing is queued)."""
        name = req.model or next(iter(self.models))
        if name not in self.models:
            raise ValueError(f"unknown model {name!r}{did_you_mean(name, self.models)}; served: "
                             f"{', '.join(self.models)}")
        served, job_id = self.models[name], uuid.uuid4().hex
        check_task(req.task, served.pipe, name)  # (before the request's own checks of its inputs)
        fields = req.model_dump(exclude={"model", "sweep", *UPLOADS})
        files = self.files()  # LoRAs by name, embeddings by the names the prompts use: never a client's path
        fields |= {"lora": resolve_loras(req.lora, files["loras"]) if req.lora else None,
                   "embedding": mentioned_embeddings([*(req.prompt or ()), *(req.negative or ())],
                                                     files["embeddings"]) or None}
        seed = secrets.randbelow(2**31) if req.seed is None else req.seed
        uploads = {field: getattr(req, key) for key, field in UPLOADS.items()}
        request = Request(**fields | {"seed": seed}, model=served.source, dtype=served.dtype, device=self.device,
                          **{k: "(upload)" for k, v in uploads.items() if v is not None})  # checked without files
        axes = [parse_sweep(spec) for spec in req.sweep or ()]
        for cell in sweep(request, axes):
            self.limits.check(cell)
        paths = {k: str(save_upload(v, self.outdir / "inputs" / f"{job_id}-{k}.png", self.limits, k.removeprefix("input_")))
                 for k, v in uploads.items() if v is not None}
        try:
            cells = [plan(cell, served.pipe) for cell in sweep(dataclasses.replace(request, **paths), axes)]
            for p in cells:
                self.limits.check_plan(p)
            if (images := sum(p.images for p in cells)) > self.limits.max_images:
                raise ValueError(f"the sweep's {len(cells)} cells make {images} images, over this server's limit of "
                                 f"{self.limits.max_images} per job")
        except ValueError:
            for path in paths.values():  # a refused request leaves nothing behind
                Path(path).unlink()
            raise
        view = req.model_dump(exclude=set(UPLOADS)) | {"model": name, "seed": seed}
        return Job(job_id, name, view, cells[0], Destination(outdir=str(self.outdir)),
                   [Path(v) for v in paths.values()], total=sum(p.total_steps for p in cells), axes=axes,
                   cells=cells if axes else [])


def create_app(models: Sequence[str] = tuple(MODELS), device: str = "cpu", dtype: str = "auto",
               outdir: str | Path = "out/serve", limits: Limits | None = None, threads: int = 0,
               worker_thread: bool = True, host: str = "127.0.0.1", token: str | None = None,
               lora_dir: str | Path | None = None, embedding_dir: str | Path | None = None) -> FastAPI:
    """The FastAPI app serving `models` (bundled names or folders) from one worker on `device`, which samples
    with `threads` torch threads (0: torch's default) in a thread of its own, or with worker_thread=False
    wherever `app.state.server.queue.work()` is called (`serve`: the main thread, where torch's CPU kernels run
    about 25% faster than in other threads: BENCHMARKS.md). It answers only to loopback names and `host`, takes
    state-changing requests only from its own origin, and with a `token` only from clients that present it.
    LoRAs (`lora_dir`) and embeddings (`embedding_dir`) are chosen by name among the files of those folders."""
    server = Server(models, device, dtype, outdir, limits or Limits(), threads, lora_dir, embedding_dir)
    upload = 4 * server.limits.max_upload // 3 + 4  # (base64)
    guard = Guard({*LOOPBACK, "[::1]", host.lower()}, max_body=len(UPLOADS) * upload + (64 << 10), token=token)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if worker_thread:
            server.queue.start()
        yield
        server.queue.close()

    app = FastAPI(title="diffusekit", version=version(), lifespan=lifespan, description=__doc__,
                  docs_url=None, redoc_url=None)  # (their pages load scripts from a CDN; the schema stays)
    app.add_middleware(GuardMiddleware, guard=guard)
    app.state.server, app.state.guard = server, guard
    queue = server.queue

    @app.exception_handler(ValueError)
    async def bad_request(request: HTTPRequest, e: ValueError) -> JSONResponse:
        return JSONResponse({"detail": " ".join(str(e).split())}, status_code=413 if isinstance(e, TooLarge) else 400)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: HTTPRequest, e: RequestValidationError) -> JSONResponse:
        """422 naming each field's problem, without echoing the input (an image may be megabytes, or NaN)."""
        return JSONResponse({"detail": [{k: err[k] for k in ("loc", "msg", "type")} for err in e.errors()]},
                            status_code=422)

    @app.exception_handler(QueueFull)
    async def queue_full(request: HTTPRequest, e: QueueFull) -> JSONResponse:
        return JSONResponse({"detail": str(e)}, status_code=429, headers={"Retry-After": "5"})

    def job_of(job_id: str) -> Job:
        try:
            return queue.get(job_id)
        except KeyError:
            raise HTTPException(404, f"no job {short(job_id)}") from None

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(WEB / "index.html", media_type="text/html")

    @app.get("/api/models")
    async def models_() -> JSONResponse:
        """The served models, samplers, defaults and limits, and the names of the LoRAs and embeddings."""
        return JSONResponse(server.description | {k: list(v) for k, v in server.files().items()})

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
    async def image(job_id: str, index: str) -> FileResponse:
        job = job_of(job_id)
        if not (index.isascii() and index.isdecimal() and str(int(index)) == index and int(index) < len(job.images)):
            raise HTTPException(404, f"job {job_id} has no image {short(index)} (images are 0, 1, ...)")
        return FileResponse(job.images[int(index)], media_type="image/png")

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
    port = server.servers[0].sockets[0].getsockname()[1]
    if getattr(app.state, "guard", None) is not None:
        app.state.guard.port = port
    try:
        yield f"http://{host if ':' not in host else f'[{host}]'}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=60)


def serve(models: Sequence[str], host: str = "127.0.0.1", port: int = 8000, device: str = defaults.DEVICE,
          dtype: str = defaults.DTYPE, outdir: str | Path = "out/serve", limits: Limits | None = None,
          threads: int = 0, token: str | None = None, insecure_no_auth: bool = False,
          lora_dir: str | Path | None = None, embedding_dir: str | Path | None = None) -> None:
    """`create_app` on host:port, run by uvicorn until interrupted (SIGINT or SIGTERM), its worker in this (the
    main) thread. Off loopback it needs a token: `token`, or a random one printed in the URL, unless
    `insecure_no_auth`."""
    if host not in LOOPBACK and token is None and not insecure_no_auth:
        token = secrets.token_urlsafe(24)
    if host not in LOOPBACK and token is None:
        print(f"warning: serving on {host} without authentication: anyone who reaches this address can use it")
    app = create_app(models, device, dtype, outdir, limits, threads, worker_thread=False, host=host, token=token,
                     lora_dir=lora_dir, embedding_dir=embedding_dir)
    queue = app.state.server.queue
    for sig in (signal.SIGINT, signal.SIGTERM):  # both stop it (SIGINT too where the parent had it ignored, as a
        signal.signal(sig, signal.default_int_handler)  # shell does for background jobs: Python then leaves it so)
    with background(app, host, port) as url:
        print(f"diffusekit: {', '.join(app.state.server.models)} at {url}/"
              + (f"?token={token}" if token else ""), flush=True)
        try:
            queue.work()  # (uvicorn answers in its thread; the models sample in this one)
        except KeyboardInterrupt:
            print("diffusekit: stopped")
        finally:
            queue.close()
