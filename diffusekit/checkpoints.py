"""Checkpoints: a folder of config.json + model.safetensors (save_pretrained / from_pretrained).

A model is built by the type name in its config.json (`diffusekit.models.build`) on the meta device and its
weights are assigned straight from the file, so nothing is materialised twice. A checkpoint that does not match
its model raises `CheckpointError` naming the missing and unexpected keys and the shapes that differ; folders
are written atomically (a temporary folder renamed into place).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file
from torch import Tensor, nn

from .models import build, model_config
from .tensorfiles import first_non_finite, read_safetensors
from .validation import ConfigError, type_problem

CONFIG_NAME, WEIGHTS_NAME = "config.json", "model.safetensors"


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit its model."""


def check_state(model: nn.Module, state: Mapping[str, Tensor], source: str = "checkpoint") -> None:
    """Raise CheckpointError unless `state` has exactly the model's keys, each with the model's shape, and no
    NaN or inf in a floating tensor."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}"
              for k, v in expected.items() if k in state and state[k].shape != v.shape]
    if missing or unexpected or shapes:
        def show(items: list[str]) -> str:
            return ", ".join(items[:8]) + (f", ... ({len(items)} in all)" if len(items) > 8 else "")

        problems = [f"{name} ({len(items)}): {show(items)}" for name, items in
                    [("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)] if items]
        raise CheckpointError(f"{source} does not fit {type(model).__name__}: " + "; ".join(problems))
    if (key := first_non_finite(state)) is not None:
        raise CheckpointError(f"{source} is corrupt: tensor {key!r} holds NaN or inf values")


def load_weights(model: nn.Module, state: Mapping[str, Tensor], source: str = "checkpoint") -> nn.Module:
    """Assign `state` to `model` (possibly on the meta device) after checking every key and shape."""
    check_state(model, state, source)
    model.load_state_dict(state, assign=True)
    return model


def read_state_dict(path: str | Path, device: str = "cpu", dtype: torch.dtype | None = None) -> dict[str, Tensor]:
    """Tensors of a .safetensors file, or of a .ckpt / .pt / .bin file given explicitly (weights_only), with the
    floating ones converted to `dtype` one by one as they are read (a bf16 load of fp32 weights never holds a
    full fp32 copy: safetensors are read in pieces, torch files memory-mapped)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint file at {path}")
    if path.suffix == ".safetensors":
        try:
            return read_safetensors(path, device, dtype)
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{path} is not a readable safetensors file: {e}") from e
    if path.suffix in (".ckpt", ".pt", ".pth", ".bin"):
        try:
            state = torch.load(path, map_location=device, weights_only=True, mmap=True)
        except Exception as e:  # torch raises several types for corrupt or unsafe pickles
            raise CheckpointError(f"{path} could not be read as a weights-only torch checkpoint: {e}") from e
        state = state.get("state_dict", state)
        return {k: v.to(dtype) if dtype is not None and isinstance(v, Tensor) and v.is_floating_point() else v
                for k, v in state.items()}
    raise CheckpointError(f"unsupported checkpoint format {path.suffix!r} ({path}); use .safetensors")


def replace_dir(tmp: Path, path: Path) -> None:
    """Move a finished folder `tmp` to `path`, replacing what was there, without a window in which a
    reader finds a half-written folder. A kill between the two renames is repaired by `recover_dir`."""
    old = path.with_name(f".{path.name}.old-{os.getpid()}")
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def recover_dir(path: Path) -> None:
    """Finish or undo an interrupted `save_pretrained` / `replace_dir` of `path`, then remove leftovers.

    A `.NAME.old-*` folder exists only after the new folder was complete, so if `path` is missing the
    newest `.NAME.tmp-*` beside an old one is promoted; an old one alone is restored; a temporary
    folder with no old one beside it was never finished and is dropped."""
    def by_age(kind: str) -> list[Path]:
        return sorted(path.parent.glob(f".{path.name}.{kind}-*"), key=lambda p: p.stat().st_mtime)

    tmps, olds = by_age("tmp"), by_age("old")
    if not path.exists() and olds:
        os.replace(tmps[-1] if tmps else olds[-1], path)
    for p in by_age("tmp") + by_age("old"):
        shutil.rmtree(p, ignore_errors=True)


@contextlib.contextmanager
def staging_dir(path: str | Path) -> Iterator[Path]:
    """Yield an empty temporary folder beside `path`; on success it replaces `path` (`replace_dir`), on
    any failure (disk full, Ctrl-C) it is removed and `path` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_dir(tmp, path)


def write_model(model: nn.Module, folder: Path, dtype: torch.dtype | None = None,
                extra: Mapping[str, Any] | None = None) -> None:
    """Write `folder/config.json` ({model_type, config, **extra}) and `folder/model.safetensors` in place."""
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: (v.to(dtype) if dtype and v.is_floating_point() else v).detach().contiguous()
             for k, v in model.state_dict().items()}
    save_file(state, folder / WEIGHTS_NAME)
    meta = {"model_type": model.model_type, "config": dataclasses.asdict(model.config), **(extra or {})}
    (folder / CONFIG_NAME).write_text(json.dumps(meta, indent=2))


def save_pretrained(model: nn.Module, path: str | Path, dtype: torch.dtype | None = None,
                    extra: Mapping[str, Any] | None = None) -> Path:
    """Write the model folder `path` (config.json + model.safetensors) atomically."""
    with staging_dir(path) as tmp:
        write_model(model, tmp, dtype, extra)
    return Path(path)


def read_config(path: str | Path) -> dict[str, Any]:
    """The config.json of a saved model folder."""
    file = Path(path) / CONFIG_NAME
    if not file.is_file():
        raise CheckpointError(f"{path} is not a diffusekit model folder (no {CONFIG_NAME})")
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{file} is not valid JSON: {e}") from e


def from_pretrained(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> nn.Module:
    """Load a model saved by `save_pretrained`, in eval mode, computing in `dtype` (default: the stored precision,
    but float32 on the CPU, where half precision is slow); a config.json or weights that do not fit raise
    CheckpointError."""
    if dtype is None and torch.device(device).type == "cpu":
        dtype = torch.float32
    meta, file = read_config(path), Path(path) / CONFIG_NAME
    for key, kind in (("model_type", str), ("config", dict)):
        if not isinstance(meta, dict) or key not in meta:
            raise CheckpointError(f"{file} has no {key!r}")
        if problem := type_problem(meta[key], kind):
            raise CheckpointError(f"{file} key {key!r} {problem}")
    try:
        config = model_config(meta["model_type"], meta["config"], source=f"{file}: {meta['model_type']} config")
    except ConfigError as e:
        raise CheckpointError(str(e)) from e
    model = build(meta["model_type"], config, device="meta")
    weights = Path(path) / WEIGHTS_NAME
    model = load_weights(model, read_state_dict(weights, str(device), dtype), source=str(weights))
    return (model.to(dtype) if dtype else model).eval()
