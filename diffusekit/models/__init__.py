"""Networks, and the registry that builds one from its type name and config (the names saved in config.json)."""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, Mapping

import torch
from torch import nn

from ..validation import ConfigError, did_you_mean, type_problem
from .autoencoder import AutoencoderKL, VQAutoencoder
from .classifier import MNISTClassifier
from .dit import DiT
from .mmdit import MMDiT
from .unet import UNet

MODELS: dict[str, type[nn.Module]] = {cls.model_type: cls for cls in
                                      (UNet, DiT, MMDiT, AutoencoderKL, VQAutoencoder, MNISTClassifier)}


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


def build(model_type: str, config: Mapping[str, Any] | Any, device: str | torch.device = "cpu") -> nn.Module:
    """Construct a model of a registered type from its config (dataclass or dict, see `model_config`) on `device`."""
    config = model_config(model_type, config)
    with torch.device(device):
        return MODELS[model_type](config)
