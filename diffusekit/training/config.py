"""Typed training configuration, read from TOML (or YAML) with command-line overrides.

    diffusekit train configs/mnist_unet.toml --set train.lr=1e-4 --set train.steps=2000

An unknown key anywhere is an error naming the key and the valid ones.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


@dataclass
class ModelSection:
    type: str = "unet"  # a registered model type: unet, dit, mmdit
    config: dict[str, Any] = field(default_factory=dict)  # that model's config fields


@dataclass
class DiffusionSection:
    schedule: str = "linear"  # linear, scaled_linear, cosine, flow
    timesteps: int = 1000
    zero_terminal_snr: bool = False
    shift: float = 1.0  # rectified-flow resolution shift
    beta_range: list[float] | None = None  # another beta range for linear / scaled_linear
    prediction: str = "eps"  # eps, x0, v, flow
    timestep_scale: float = 1.0  # network timestep = t * scale (1000 for SD3-style flow)
    spacing: str = ""  # the model's default sampling grid: leading, trailing, linspace ("" = trailing)
    steps_offset: int = 0
    t_sampling: str = "uniform"  # uniform, logit_normal
    logit_mean: float = 0.0
    logit_std: float = 1.0
    min_snr_gamma: float = 0.0  # 0 = off; 5 is the paper's choice
    offset_noise: float = 0.0  # SDXL uses 0.1
    p_uncond: float = 0.1  # condition dropout for classifier-free guidance


@dataclass
class DataSection:
    dataset: str = "mnist"  # mnist, folder, shapes
    path: str = ""  # image folder
    resolution: int = 28
    pad: int = 0  # mnist: background pixels added around each digit before resizing
    channels: int = 1
    random_flip: bool = False
    random_crop: bool = False
    size: int = 10_000  # shapes: number of distinct images
    holdout: int = 0  # mnist: keep the last N digits out of training
    num_workers: int = 0


@dataclass
class LatentSection:
    autoencoder: str = ""  # folder of a trained autoencoder; empty = pixel space
    cache: bool = True  # encode the dataset once and keep the posteriors
    sample_posterior: bool = True


@dataclass
class TextSection:
    encoder: str = ""  # "minilm" (bundled offline), a local CLIP / transformers folder, or empty
    max_length: int = 77


@dataclass
class TrainSection:
    steps: int = 1000
    batch_size: int = 64  # global micro-batch (split across processes)
    grad_accum: int = 1
    lr: float = 2e-4
    warmup: int = 100
    lr_schedule: str = "constant"  # constant, cosine (after warm-up)
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    mixed_precision: str = "no"  # no, bf16, fp16
    seed: int = 0
    log_every: int = 50
    sample_every: int = 500
    ckpt_every: int = 500
    keep_last: int = 3
    out_dir: str = "runs/default"
    device: str = "auto"
    tensorboard: bool = False
    compile: bool = False


@dataclass
class SampleSection:
    sampler: str = "ddim"
    steps: int = 50
    cfg_scale: float = 3.0
    n: int = 8  # images per class (class-conditional) or in all
    prompts: list[str] = field(default_factory=list)  # text models: prompts for the periodic grids


@dataclass
class AutoencoderSection:
    """Losses of the autoencoder trainer (model.type = autoencoder_kl / autoencoder_vq)."""

    kl_weight: float = 1e-6
    perceptual_weight: float = 1.0  # LPIPS, used when its weights are available locally
    disc_start: int = 1000  # step at which the adversarial loss starts
    disc_weight: float = 0.5
    disc_layers: int = 2
    disc_channels: int = 32
    disc_lr: float = 2e-4
    scale_samples: int = 2000  # images used to estimate the latent scaling factor 1 / std


@dataclass
class TrainConfig:
    model: ModelSection = field(default_factory=ModelSection)
    diffusion: DiffusionSection = field(default_factory=DiffusionSection)
    data: DataSection = field(default_factory=DataSection)
    latent: LatentSection = field(default_factory=LatentSection)
    text: TextSection = field(default_factory=TextSection)
    train: TrainSection = field(default_factory=TrainSection)
    sample: SampleSection = field(default_factory=SampleSection)
    autoencoder: AutoencoderSection = field(default_factory=AutoencoderSection)


def from_dict(cls: type, data: dict[str, Any], where: str = "") -> Any:
    """Build dataclass `cls` from a nested dict; unknown keys raise naming the key and the valid ones."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(f"unknown config key '{where}{unknown[0]}'; valid keys{' in ' + where[:-1] if where else ''}: "
                         f"{sorted(fields)}")
    kwargs = {}
    for name, value in data.items():
        default = fields[name].default_factory() if fields[name].default_factory is not dataclasses.MISSING else fields[name].default
        if dataclasses.is_dataclass(default):
            if not isinstance(value, dict):
                raise ValueError(f"config key {where}{name} must be a table")
            value = from_dict(type(default), value, f"{where}{name}.")
        elif isinstance(default, tuple):
            value = tuple(value)
        kwargs[name] = value
    return cls(**kwargs)


def _parse_value(text: str) -> Any:
    """A TOML literal (number, bool, string, list), or the bare text as a string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_override(data: dict[str, Any], assignment: str) -> None:
    """Apply 'section.key=value' (any depth) to a nested dict."""
    if "=" not in assignment:
        raise ValueError(f"override {assignment!r} must look like section.key=value")
    key, value = assignment.split("=", 1)
    *parents, leaf = key.strip().split(".")
    node = data
    for p in parents:
        node = node.setdefault(p, {})
    node[leaf] = _parse_value(value.strip())


def read_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config file {path} does not exist")
    if path.suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError as e:
            raise ValueError("YAML configs need pyyaml (pip install pyyaml); TOML needs nothing") from e
        return yaml.safe_load(path.read_text()) or {}
    return tomllib.loads(path.read_text())


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> TrainConfig:
    """A TrainConfig from a TOML / YAML file and 'a.b=value' overrides."""
    data = read_file(path) if path else {}
    for o in overrides:
        apply_override(data, o)
    return from_dict(TrainConfig, data)


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)
