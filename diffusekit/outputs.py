"""Where a run's images go and what they record: a grid at OUT (or the next numbered file in OUTDIR) and each
image beside it in the folder of the grid's name, every PNG carrying the parameters of the request that made
it, from which `read_request` restores that request (`--from-png`)."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from torch import Tensor

from .bundled import MODELS
from .images import (PARAMETERS, check_output_path, check_writable, grid_image, next_numbered, png_text,
                     read_parameters, save_grid, save_image, save_plot)
from .requests import (FIELDS, MAX_AXES, Plan, axis_specs, cell_label, cell_labels, parse_embedding, parse_lora,
                       task_of)
from .validation import type_problem

RESTORED = [name for name in FIELDS if name not in ("task", "device", "compile")]  # what a PNG gives back
OUTDIR = "out"
A1111_SAMPLERS = {"ddim": "DDIM", "ddpm": "DDPM", "euler": "Euler", "euler_ancestral": "Euler a", "heun": "Heun",
                  "dpmpp_2m": "DPM++ 2M", "dpmpp_sde": "DPM++ SDE", "dpmpp_2s_ancestral": "DPM++ 2S a",
                  "unipc": "UniPC", "lms": "LMS"}  # our samplers' names in A1111's infotext
A1111_SCHEDULES = {"karras": "Karras", "exponential": "Exponential"}  # spacings that are A1111 schedule types
A1111_OURS = {"Upsample Guidance": "upsample_guidance", "UG eta": "ug_eta", "Spacing": "spacing",
              "Prompt syntax": "prompt_syntax", "Class": "labels"}  # keys we add, read back by --from-png
A1111_IGNORED = ("Model", "Model hash", "Version", "VAE", "VAE hash", "Lora hashes", "TI hashes", "ENSD",
                 "Emphasis", "Token merging ratio", "Pad conds", "Discard penultimate sigma")  # do not change pixels
A1111_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def version() -> str:
    """The installed package's version (the source tree's when it is not installed)."""
    try:
        return importlib.metadata.version("diffusekit")
    except importlib.metadata.PackageNotFoundError:
        from . import __version__

        return __version__


@dataclass(frozen=True)
class Destination:
    """Where a run's files go: the grid at `out` (its images in the folder `out` without suffix), or without one
    OUTDIR/NNNNN-SEED.png and OUTDIR/NNNNN-SEED/000.png, ...; an existing `out` is replaced only with `overwrite`."""

    out: str | None = None
    outdir: str = OUTDIR
    overwrite: bool = False

    def check(self) -> None:
        """Refuse an `out` that cannot be written, or that exists (or its image folder does) without
        `overwrite`, or else an `outdir` that cannot be written in: before the work that would fill them."""
        if not self.out:
            check_writable(self.outdir)
            return
        path = check_output_path(self.out)
        taken = [p for p in (path, path.with_suffix("")) if p.exists()]
        if taken and not self.overwrite:
            raise ValueError(f"{taken[0]} exists: pass --overwrite to replace it, or leave out --out for the next "
                             f"numbered file in {self.outdir}/")


def parameters(p: Plan, model_path: str | Path) -> dict[str, Any]:
    """The parameters each PNG of a run records: the resolved request's fields that `read_request` restores,
    the model's absolute path (and A1111's hash of a single-file model), the device and this version."""
    r = p.request
    return {**{k: getattr(r, k) for k in RESTORED}, "model_path": str(Path(model_path).resolve()),
            "model_hash": model_hash(model_path), "device": r.device, "diffusekit": version()}


def cache_dir() -> Path:
    """diffusekit's cache folder: $XDG_CACHE_HOME/diffusekit, else ~/.cache/diffusekit."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "diffusekit"


def model_hash(path: str | Path) -> str | None:
    """A1111's 'Model hash' of a single-file checkpoint (what civitai and image browsers match models by): the
    first 10 hex digits of the file's SHA-256 (`file_hash`); None for a model folder."""
    return file_hash(path)[:10] if Path(path).is_file() else None


_HASHES: dict[tuple, str] = {}  # (this process's: without a writable cache a file is still read once)


def file_hash(path: str | Path, body: bool = False) -> str:
    """The SHA-256 of a file, or with `body` of a .safetensors file's tensors after its header (kohya's and A1111's
    LoRA hash), kept in cache_dir()/hashes.json under the file's path, size and modification time as A1111 keeps
    its hashes, so that a file is read once."""
    path = Path(path).resolve()
    stat = path.stat()
    body = body and path.suffix == ".safetensors"
    key, stamp, file = f"{path}{'#body' * body}", [stat.st_size, stat.st_mtime_ns], cache_dir() / "hashes.json"
    if (memo := _HASHES.get((key, *stamp))) is not None:
        return memo
    try:
        cache = json.loads(file.read_text())
        cache = cache if isinstance(cache, dict) else {}
    except (OSError, ValueError):
        cache = {}
    entry = cache.get(key)
    if isinstance(entry, dict) and entry.get("stamp") == stamp and isinstance(entry.get("sha256"), str):
        _HASHES[key, *stamp] = entry["sha256"]
        return entry["sha256"]
    digest = hashlib.sha256()
    with path.open("rb") as f:
        if body:
            f.seek(8 + int.from_bytes(f.read(8), "little"))
        while block := f.read(1 << 24):
            digest.update(block)
    cache[key] = {"stamp": stamp, "sha256": digest.hexdigest()}
    _HASHES[key, *stamp] = digest.hexdigest()
    try:  # (atomically; a cache that cannot be written is left out)
        file.parent.mkdir(parents=True, exist_ok=True)
        tmp = file.with_name(f".{file.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cache))
        os.replace(tmp, file)
    except OSError:
        pass
    return digest.hexdigest()


def write(images: Tensor, p: Plan, destination: Destination, model_path: str | Path) -> Path:
    """The grid and each image, 000.png, 001.png, ..., in the folder named after it; each PNG records the
    run's parameters, a single image also its index and own condition. Returns the grid's path. Interrupted
    (a full disk, SIGTERM), it leaves none of the run's files."""
    record = parameters(p, model_path)
    r = p.request
    grid = Path(destination.out) if destination.out else next_numbered(destination.outdir, str(r.seed))
    folder = grid.with_suffix("")
    for old in folder.glob("*.png"):  # (overwrite: no image of the run replaced stays behind)
        if old.stem.isdecimal():
            old.unlink()
    written: list[Path] = []
    try:  # each file is written atomically, and the run's files all or none
        for k, (x, mine) in enumerate(zip(images, p.own)):
            own = {**record, "image": {"index": k, **mine}}
            written.append(save_image(x, folder / f"{k:03d}.png", own, a1111_text(own)))
        return save_grid(images, grid, nrow=r.n, row_labels=p.rows, scale=r.scale, parameters=record,
                         text=a1111_text({**record, "image": p.own[0]}))
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise


def sweep_parameters(first: Plan, axes: Sequence[tuple[str, list[Any]]], model_path: str | Path) -> dict[str, Any]:
    """What a sweep's plot records: its first cell's parameters and the axes (--from-png reruns the sweep)."""
    return {**parameters(first, model_path), "sweep": axis_specs(axes)}


def write_sweep(cells: Iterable[tuple[Plan, Tensor]], axes: Sequence[tuple[str, list[Any]]],
                destination: Destination, model_path: str | Path) -> Path:
    """A sweep's cells, each written as a run of its own as it arrives (`write`: 'cfg=5,steps=20.png' and its
    images, with their parameters) in the folder of the plot's name, then the X/Y/Z plot of the cells' grids,
    labelled with the axes' values, recording the first cell's parameters and the sweep (--from-png reruns it).
    Returns the plot's path."""
    first: Plan | None = None
    tiles = []
    plot = Path(destination.out) if destination.out else None
    for (p, images), label in zip(cells, cell_labels(axes)):
        first = first or p
        if plot is None:
            plot = next_numbered(destination.outdir, str(p.request.seed))
        elif first is p and destination.overwrite:  # no cell of an earlier sweep at `out` stays behind
            for old in plot.with_suffix("").glob("*=*"):
                for image in old.glob("[0-9]*.png") if old.is_dir() else [old]:
                    image.unlink()
                if old.is_dir() and not any(old.iterdir()):
                    old.rmdir()
        write(images, p, Destination(str(plot.with_suffix("") / f"{label}.png"), overwrite=True), model_path)
        tiles.append(grid_image(images, nrow=p.request.n, scale=p.request.scale))
    if first is None:
        raise ValueError("a sweep needs at least one cell")
    labels = [[cell_label({name: v}) for v in values] for name, values in axes] + [[""]] * (MAX_AXES - len(axes))
    record = sweep_parameters(first, axes, model_path)
    return save_plot(tiles, plot, *labels, parameters=record, text=a1111_text({**record, "image": first.own[0]}))


def a1111_text(record: dict[str, Any]) -> str:
    """A1111's infotext of one image's parameters (`parameters` + its own condition under 'image'): prompt (with
    its LoRAs as <lora:name:scale>), 'Negative prompt: ...', then 'Steps: 20, Sampler: DPM++ 2M, ...', with the
    keys of A1111_OURS for what A1111 lacks, so that PNG Info in A1111, civitai and image browsers show it."""
    own = record["image"]
    lora_files = [parse_lora(spec) for spec in record.get("lora") or ()]
    loras = " ".join(f"<lora:{Path(f).stem}:{s:g}>" for f, s in lora_files)
    embeddings = [parse_embedding(spec) for spec in record.get("embedding") or ()]
    hashes = {"Lora hashes": ", ".join(f"{Path(f).stem}: {file_hash(f, body=True)[:12]}" for f, _ in lora_files),
              "TI hashes": ", ".join(f"{t or Path(f).stem}: {file_hash(f)[:12]}" for f, t in embeddings)}
    spacing = record["spacing"]
    fields = {"Steps": record["steps"], "Sampler": A1111_SAMPLERS[record["sampler"]],
              "Schedule type": A1111_SCHEDULES.get(spacing), "CFG scale": record["cfg"], "Seed": record["seed"],
              "Size": f"{record['width']}x{record['height']}", "Model hash": record.get("model_hash"),
              "Model": Path(record["model_path"]).stem,
              "Denoising strength": record["strength"] if record.get("input_image") else None,
              "Spacing": spacing if spacing not in A1111_SCHEDULES else None, "Class": own.get("label"),
              "Upsample Guidance": record["upsample_guidance"],
              "UG eta": record["ug_eta"] if record["upsample_guidance"] is not None else None,
              "Prompt syntax": record["prompt_syntax"] if record["prompt_syntax"] != "a1111" else None,
              **{k: v or None for k, v in hashes.items()},
              "Version": f"diffusekit {record['diffusekit']}"}
    line = ", ".join(f"{k}: {quoted(v)}" for k, v in fields.items() if v is not None)
    prompt = " ".join(filter(None, [own.get("prompt") or "", loras]))
    negative = own.get("negative") and f"Negative prompt: {own['negative']}"
    return "\n".join(filter(None, [prompt, negative, line]))


def quoted(value: Any) -> str:
    """An infotext value, quoted as A1111 does when it holds a comma, colon or quote."""
    text = str(value)
    return json.dumps(text) if any(c in text for c in ',:"') else text


def a1111_fields(text: str, source: str) -> tuple[dict[str, Any], str]:
    """Request fields from A1111's infotext (prompt, negative, steps, sampler and schedule, CFG, seed, size, and
    our own keys), and the model's name; ValueError naming what cannot be reproduced here (hires fix, img2img,
    clip skip, LoRA tags, variation seeds, unknown samplers). The model is not among the fields: A1111 names it
    without a file."""
    lines = text.strip().split("\n")
    params = dict(m.groups() for m in A1111_PARAM.finditer(lines[-1])) if "Steps:" in lines[-1] else {}
    body = lines[:-1] if params else lines
    negative_at = next((i for i, line in enumerate(body) if line.startswith("Negative prompt:")), len(body))
    prompt = "\n".join(body[:negative_at]).strip()
    negative = "\n".join(body[negative_at:]).removeprefix("Negative prompt:").strip()
    params = {k.strip(): json.loads(v) if v.startswith('"') else v.strip() for k, v in params.items()}
    if tags := re.findall(r"<(?:lora|lyco|hypernet):([^:>]+)[^>]*>", prompt):
        raise ValueError(f"{source}: its prompt uses {', '.join(tags)} (A1111 <lora:...> tags): pass the files with "
                         "--lora FILE:SCALE and --prompt without the tags")
    refused = [k for k in params if k.startswith(("Hires", "Refiner", "ControlNet", "ADetailer", "Variation seed",
                                                  "Face restoration", "Mask blur", "Inpaint"))
               or k in ("Denoising strength", "Tiling") or (k == "Clip skip" and params[k] != "1")]
    if refused:
        raise ValueError(f"{source}: A1111's {', '.join(refused)} cannot be reproduced from the infotext here")
    sampler, spacing = params.get("Sampler", A1111_SAMPLERS["dpmpp_2m"]), None
    for ours, theirs in A1111_SCHEDULES.items():  # old style: 'DPM++ 2M Karras'
        if sampler.endswith(f" {theirs}"):
            sampler, spacing = sampler.removesuffix(f" {theirs}"), ours
    schedule = params.get("Schedule type", "Automatic")
    if schedule != "Automatic":
        spacing = next((k for k, v in A1111_SCHEDULES.items() if v == schedule), None)
        if spacing is None:
            raise ValueError(f"{source}: A1111's schedule type {schedule!r} is not one of ours "
                             f"({', '.join(A1111_SCHEDULES.values())}, Automatic)")
    names = {v: k for k, v in A1111_SAMPLERS.items()}
    if sampler not in names:
        raise ValueError(f"{source}: A1111's sampler {sampler!r} has no counterpart here (we have: "
                         f"{', '.join(names)})")
    fields: dict[str, Any] = {"prompt": [prompt] if prompt else None, "negative": [negative] if negative else None,
                              "sampler": names[sampler], "spacing": params.get("Spacing", spacing)}
    for key, name, parse in (("Steps", "steps", int), ("CFG scale", "cfg", float), ("Seed", "seed", int)):
        if key in params:
            fields[name] = parse(params[key])
    if "Size" in params:
        fields["width"], fields["height"] = map(int, params["Size"].split("x"))
    for key, name in A1111_OURS.items():
        if key in params and name != "spacing":
            value = params[key]
            fields[name] = ([int(value)] if name == "labels" else value if name == "prompt_syntax"
                            else float(value) if value != "auto" else value)
    unknown = [k for k in params if k not in (*A1111_IGNORED, *A1111_OURS, "Steps", "Sampler", "Schedule type",
                                              "CFG scale", "Seed", "Size", "Clip skip")]
    if unknown:
        print(f"note: {source}: A1111 fields not read: {', '.join(unknown)}")
    return fields, params.get("Model", "not named")


def read_request(path: str | Path) -> dict[str, Any]:
    """The request fields recorded in a PNG that diffusekit wrote (its grid or one of its images), each checked
    against its type, with the task they imply and the model as an absolute path unless bundled; or read from
    the infotext of a PNG that AUTOMATIC1111 (or a tool writing its format) wrote, without a model."""
    chunks = png_text(path)
    a1111 = PARAMETERS not in chunks and chunks.get("parameters", "").lstrip()[:1] not in ("{", "")
    if a1111:
        saved, model = a1111_fields(chunks["parameters"], str(path))
        print(f"{path} was written by AUTOMATIC1111 (model {model}): its parameters are read; the images will "
              "differ (another noise generator)")
    else:
        saved = read_parameters(path)
    if "model" not in saved and not a1111:
        raise ValueError(f"{path}: its parameters are not those of diffusekit sample (no model)")
    fields = {k: v for k, v in saved.items() if k in RESTORED}
    for key, value in fields.items():
        if problem := type_problem(value, FIELDS[key]):
            raise ValueError(f"{path}: parameter {key} {problem}")
    if "model" in fields and fields["model"] not in MODELS and isinstance(saved.get("model_path"), str):
        fields["model"] = saved["model_path"]
    if not a1111 and saved.get("diffusekit") != version():
        print(f"note: {path} was written by diffusekit {saved.get('diffusekit')}, this is {version()}")
    if isinstance(saved.get("image"), dict):
        print(f"{path} is image {saved['image'].get('index')} of its run: rerunning the run, whose images are "
              f"numbered as before")
    sweep = saved.get("sweep")
    if sweep is not None and not (isinstance(sweep, list) and all(isinstance(a, str) for a in sweep)):
        raise ValueError(f"{path}: parameter sweep must be a list of OPTION=VALUES, got {sweep!r}")
    return {**fields, "task": task_of(fields), **({"sweep": sweep} if sweep else {})}
