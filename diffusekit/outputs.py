"""Where a run's images go and what they record: a grid at OUT (or the next numbered file in OUTDIR) and each
image beside it in the folder of the grid's name, every PNG carrying the parameters of the request that made
it, from which `read_request` restores that request (`--from-png`)."""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor

from .bundled import MODELS
from .images import check_output_path, check_writable, next_numbered, read_parameters, save_grid, save_image
from .requests import FIELDS, Plan, task_of
from .validation import type_problem

RESTORED = [name for name in FIELDS if name not in ("task", "device", "compile")]  # what a PNG gives back
OUTDIR = "out"


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
    the model's absolute path, the device and this version."""
    r = p.request
    return {**{k: getattr(r, k) for k in RESTORED}, "model_path": str(Path(model_path).resolve()),
            "device": r.device, "diffusekit": version()}


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
            written.append(save_image(x, folder / f"{k:03d}.png", {**record, "image": {"index": k, **mine}}))
        return save_grid(images, grid, nrow=r.n, row_labels=p.rows, scale=r.scale, parameters=record)
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise


def read_request(path: str | Path) -> dict[str, Any]:
    """The request fields recorded in a PNG that diffusekit wrote (its grid or one of its images), each checked
    against its type, with the task they imply and the model as an absolute path unless bundled."""
    saved = read_parameters(path)
    if "model" not in saved:
        raise ValueError(f"{path}: its parameters are not those of diffusekit sample (no model)")
    fields = {k: v for k, v in saved.items() if k in RESTORED}
    for key, value in fields.items():
        if problem := type_problem(value, FIELDS[key]):
            raise ValueError(f"{path}: parameter {key} {problem}")
    if fields["model"] not in MODELS and isinstance(saved.get("model_path"), str):
        fields["model"] = saved["model_path"]
    if saved.get("diffusekit") != version():
        print(f"note: {path} was written by diffusekit {saved.get('diffusekit')}, this is {version()}")
    if isinstance(saved.get("image"), dict):
        print(f"{path} is image {saved['image'].get('index')} of its run: rerunning the run, whose images are "
              f"numbered as before")
    return {**fields, "task": task_of(fields)}
