"""Checkpoints: a folder of config.json + model.safetensors (save_pretrained / from_pretrained).

Models register under a type name; a model is built on the meta device and its weights are assigned
straight from the file, so nothing is materialised twice. A checkpoint that does not match its model
raises `CheckpointError` naming the missing and unexpected keys and the shapes that differ; folders
are written atomically (a temporary folder renamed into place).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Mapping, TypeVar

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

CONFIG_NAME, WEIGHTS_NAME = "config.json", "model.safetensors"
MODELS: dict[str, type[nn.Module]] = {}
M = TypeVar("M", bound=type[nn.Module])


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit its model."""


def register(name: str) -> Callable[[M], M]:
    """Class decorator: make a model class (with a dataclass `config_class`) loadable by type name."""

    def deco(cls: M) -> M:
        cls.model_type = name
        MODELS[name] = cls
        return cls

    return deco


def build(model_type: str, config: Mapping[str, Any] | Any, device: str | torch.device = "cpu") -> nn.Module:
    """Construct a registered model from its config (dataclass or dict) on `device` (e.g. 'meta')."""
    import diffusekit.models  # noqa: F401  (registers the model classes)

    if model_type not in MODELS:
        raise CheckpointError(f"unknown model type {model_type!r}; known: {sorted(MODELS)}")
    cls = MODELS[model_type]
    if isinstance(config, Mapping):
        fields = {f.name for f in dataclasses.fields(cls.config_class)}
        unknown = set(config) - fields
        if unknown:
            raise CheckpointError(f"{model_type} config has unknown keys {sorted(unknown)}; valid: {sorted(fields)}")
        config = cls.config_class(**config)
    with torch.device(device):
        return cls(config)


def check_state(model: nn.Module, state: Mapping[str, Tensor], source: str = "checkpoint") -> None:
    """Raise CheckpointError unless `state` has exactly the model's keys, each with the model's shape."""
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


def load_weights(model: nn.Module, state: Mapping[str, Tensor], source: str = "checkpoint") -> nn.Module:
    """Assign `state` to `model` (possibly on the meta device) after checking every key and shape."""
    check_state(model, state, source)
    model.load_state_dict(state, assign=True)
    return model


def read_state_dict(path: str | Path, device: str = "cpu") -> dict[str, Tensor]:
    """Tensors of a .safetensors file, or of a .ckpt / .pt / .bin file given explicitly (weights_only)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint file at {path}")
    if path.suffix == ".safetensors":
        try:
            return load_file(path, device=device)
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{path} is not a readable safetensors file: {e}") from e
    if path.suffix in (".ckpt", ".pt", ".pth", ".bin"):
        try:
            state = torch.load(path, map_location=device, weights_only=True)
        except Exception as e:  # torch raises several types for corrupt or unsafe pickles
            raise CheckpointError(f"{path} could not be read as a weights-only torch checkpoint: {e}") from e
        return state.get("state_dict", state)
    raise CheckpointError(f"unsupported checkpoint format {path.suffix!r} ({path}); use .safetensors")


def replace_dir(tmp: Path, path: Path) -> None:
    """Move a finished folder `tmp` to `path`, replacing what was there, without a window in which a
    reader finds a half-written folder."""
    old = path.with_name(f".{path.name}.old-{os.getpid()}")
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def save_pretrained(model: nn.Module, path: str | Path, dtype: torch.dtype | None = None,
                    extra: Mapping[str, Any] | None = None) -> Path:
    """Write `path/config.json` ({model_type, config, **extra}) and `path/model.safetensors`, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    state = {k: (v.to(dtype) if dtype and v.is_floating_point() else v).detach().contiguous()
             for k, v in model.state_dict().items()}
    save_file(state, tmp / WEIGHTS_NAME)
    meta = {"model_type": model.model_type, "config": dataclasses.asdict(model.config), **(extra or {})}
    (tmp / CONFIG_NAME).write_text(json.dumps(meta, indent=2))
    replace_dir(tmp, path)
    return path


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
    """Load a model saved by `save_pretrained`."""
    meta = read_config(path)
    model = build(meta["model_type"], meta["config"], device="meta")
    state = read_state_dict(Path(path) / WEIGHTS_NAME, device=str(device))
    model = load_weights(model, state, source=str(path))
    return model.to(dtype) if dtype else model
