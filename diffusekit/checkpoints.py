"""Checkpoints: a folder of config.json + model.safetensors (save_pretrained / from_pretrained).

Models register under a type name; a model is built on the meta device and its weights are assigned
straight from the file, so nothing is materialised twice. A checkpoint that does not match its model
raises `CheckpointError` naming the missing and unexpected keys and the shapes that differ; folders
are written atomically (a temporary folder renamed into place).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import types
import typing
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, TypeVar

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


def _fits(value: Any, hint: Any) -> bool:
    """Whether a JSON / TOML value fits a type annotation: ints pass for floats but bools never for numbers, lists
    pass for tuples (of the annotated length and element types)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, a) for a in args)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return False
        if origin is tuple and Ellipsis not in args:
            return len(value) == len(args) and all(map(_fits, value, args))
        return not args or all(_fits(v, args[0]) for v in value)
    if hint in (int, float) and isinstance(value, bool):
        return False
    if hint is float:
        return isinstance(value, (int, float))
    return hint is Any or isinstance(value, origin or hint)


def _describe(hint: Any) -> str:
    """A type annotation in words: 'int or None', 'a list of 2 floats', 'a table'."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(map(_describe, args))
    if origin in (list, tuple):
        n = f"{len(args)} " if origin is tuple and Ellipsis not in args else ""
        return f"a list of {n}{_describe(args[0])}s" if args else "a list"
    if origin is dict:
        return "a table"
    return "None" if hint is type(None) else getattr(hint, "__name__", str(hint))


def type_problem(value: Any, hint: Any) -> str | None:
    """None if a JSON / TOML value fits the type annotation `hint`, else 'must be <type>, got <value>'."""
    return None if _fits(value, hint) else f"must be {_describe(hint)}, got {type(value).__name__} {value!r}"


def model_config(model_type: str, config: Mapping[str, Any] | Any, source: str = "") -> Any:
    """The config dataclass of a registered model type from a dict (a dataclass passes through), after checking the
    type name, and the dict's keys and value types against the dataclass; `source` names it in errors."""
    import diffusekit.models  # noqa: F401  (registers the model classes)

    if model_type not in MODELS:
        raise CheckpointError(f"unknown model type {model_type!r}; known: {sorted(MODELS)}")
    if not isinstance(config, Mapping):
        return config
    source, cls = source or f"{model_type} config", MODELS[model_type].config_class
    fields, hints = {f.name for f in dataclasses.fields(cls)}, typing.get_type_hints(cls)
    unknown = set(config) - fields
    if unknown:
        raise CheckpointError(f"{source} has unknown keys {sorted(unknown)}; valid: {sorted(fields)}")
    for key, value in config.items():
        if problem := type_problem(value, hints[key]):
            raise CheckpointError(f"{source} key {key!r} {problem}")
    return cls(**config)


def build(model_type: str, config: Mapping[str, Any] | Any, device: str | torch.device = "cpu") -> nn.Module:
    """Construct a registered model from its config (dataclass or dict, see `model_config`) on `device`."""
    config = model_config(model_type, config)
    with torch.device(device):
        return MODELS[model_type](config)


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
    for key, v in state.items():
        if v.is_floating_point() and not v.is_meta and not v.isfinite().all():
            raise CheckpointError(f"{source} is corrupt: tensor {key!r} holds NaN or inf values")


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
    """Load a model saved by `save_pretrained`; a config.json or weights that do not fit raise CheckpointError."""
    meta, file = read_config(path), Path(path) / CONFIG_NAME
    for key, kind in (("model_type", str), ("config", dict)):
        if not isinstance(meta, dict) or key not in meta:
            raise CheckpointError(f"{file} has no {key!r}")
        if problem := type_problem(meta[key], kind):
            raise CheckpointError(f"{file} key {key!r} {problem}")
    config = model_config(meta["model_type"], meta["config"], source=f"{file}: {meta['model_type']} config")
    model = build(meta["model_type"], config, device="meta")
    weights = Path(path) / WEIGHTS_NAME
    model = load_weights(model, read_state_dict(weights, device=str(device)), source=str(weights))
    return model.to(dtype) if dtype else model
