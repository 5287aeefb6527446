"""Networks, and the registry that builds one from its type name and config (the names saved in config.json)."""

from __future__ import annotations

import contextlib
import dataclasses
import typing
from typing import Any, Mapping

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from ..validation import ConfigError, did_you_mean, type_problem
from .autoencoder import AutoencoderKL, VQAutoencoder
from .clip import CLIPTextTransformer
from .classifier import MNISTClassifier, NoisyClassifier
from .dit import DiT
from .mmdit import MMDiT
from .unet import UNet

MODELS: dict[str, type[nn.Module]] = {cls.model_type: cls for cls in
                                      (UNet, DiT, MMDiT, AutoencoderKL, VQAutoencoder, MNISTClassifier,
                                                   NoisyClassifier, CLIPTextTransformer)}


def model_config(model_type: str, config: Mapping[str, Any] | Any, source: str = "") -> Any:
    """The config dataclass of a model type from a dict (a dataclass passes through), after checking the type
    name, and the dict's keys and value types against the dataclass; `source` names it in errors (ConfigError)."""
    if model_type not in MODELS:
        raise ConfigError(f"unknown model type {model_type!r}; known: {sorted(MODELS)}"
                          f"{did_you_mean(model_type, MODELS)}")
    if not isinstance(config, Mapping):
        return config
    source, cls = source or f"{model_type} config", MODELS[model_type].config_class
    fields, hints = {f.name for f in dataclasses.fields(cls)}, typing.get_type_hints(cls)
    unknown = set(config) - fields
    if unknown:
        raise ConfigError(f"{source} has unknown keys {sorted(unknown)}; valid: {sorted(fields)}")
    for key, value in config.items():
        if problem := type_problem(value, hints[key]):
            raise ConfigError(f"{source} key {key!r} {problem}")
    return cls(**config)


class _SkipInit(TorchFunctionMode):
    """torch.nn.init does nothing: on the meta device there are no values to initialise (the weights are loaded
    next), and meta tensors would route each init through torch._refs, whose first use imports torch._dynamo
    (over a second of a command's start-up)."""

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if getattr(func, "__module__", None) == "torch.nn.init":  # init.f(tensor, ...) returns its tensor
            return args[0] if args else kwargs["tensor"]
        return func(*args, **kwargs)


def build(model_type: str, config: Mapping[str, Any] | Any, device: str | torch.device = "cpu") -> nn.Module:
    """Construct a model of a registered type from its config (dataclass or dict, see `model_config`) on `device`
    (on the meta device without initialising its weights)."""
    config = model_config(model_type, config)
    skip_init = _SkipInit() if torch.device(device).type == "meta" else contextlib.nullcontext()
    with torch.device(device), skip_init:
        return MODELS[model_type](config)
