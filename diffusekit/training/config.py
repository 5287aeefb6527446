"""Typed training configuration, read from TOML (or YAML) with command-line overrides.

    diffusekit train configs/mnist_unet.toml --set train.lr=1e-4 --set train.steps=2000

Every key, type and value is checked at load (`--set` overrides too): an unknown key, a value of the wrong type
(from the dataclass annotations) or one outside its range or set of names (CHECKS) is a ValueError naming the key.
"""

from __future__ import annotations

import dataclasses
import re
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from .. import defaults
from ..data import DATASETS
from ..denoisers import DiffusionSettings
from ..models import MODELS, model_config
from ..parametrization import PREDICTION_TYPES
from ..samplers import SAMPLERS
from ..schedules import SCHEDULES, SPACINGS, T_DISTRIBUTIONS
from ..validation import Check, at_least, did_you_mean, finite, one_of, positive, type_problem, within


@dataclass
class ModelSection:
    type: str = "unet"  # a registered model type: unet, dit, mmdit
    config: dict[str, Any] = field(default_factory=dict)  # that model's config fields


@dataclass
class DiffusionSection(DiffusionSettings):
    """The model's diffusion settings (saved with it), and how training draws times and noise."""

    t_sampling: str = "uniform"  # uniform, logit_normal
    logit_mean: float = 0.0
    logit_std: float = 1.0
    min_snr_gamma: float = 0.0  # 0 = off; 5 is the paper's choice
    offset_noise: float = 0.0  # SDXL uses 0.1
    p_uncond: float = 0.1  # condition dropout for classifier-free guidance

    def settings(self) -> DiffusionSettings:
        """The part stored in the model folder."""
        return DiffusionSettings(**{f.name: getattr(self, f.name) for f in dataclasses.fields(DiffusionSettings)})


@dataclass
class DataSection:
    dataset: str = "mnist"  # a name in data.DATASETS: mnist, folder, shapes, shape_maps, shape_layouts, shape_captions
    path: str = ""  # image folder
    resolution: int = 28
    pad: int = 0  # mnist: background pixels added around each digit before resizing
    channels: int = 1
    random_flip: bool = False
    random_crop: bool = False
    size: int = 10_000  # procedural datasets (shapes, shape_*): number of distinct images
    holdout: int = 0  # mnist: keep the last N digits out of training
    num_workers: int = 0


@dataclass
class LowResSection:
    """Super-resolution models: conditioned on the image downsampled by `factor` (0 = not one), with
    Gaussian noise of standard deviation `noise` added (noise augmentation), concatenated to the input."""

    factor: int = 0
    noise: float = 0.1


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
    """What every trainer does: steps, batches, learning rate, logs, previews, checkpoints."""

    steps: int = 1000
    batch_size: int = 64  # global micro-batch (split across processes)
    lr: float = 2e-4
    warmup: int = 100
    lr_schedule: str = "constant"  # constant, cosine (after warm-up)
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    seed: int = 0
    log_every: int = 50
    sample_every: int = 500
    ckpt_every: int = 500
    keep_last: int = 3
    out_dir: str = "runs/default"
    device: str = "auto"
    tensorboard: bool = False


@dataclass
class DiffusionTrainSection(TrainSection):
    """What only the diffusion trainer does: accumulation, AdamW betas, EMA, mixed precision, compile."""

    grad_accum: int = 1
    betas: tuple[float, float] = (0.9, 0.999)
    ema_decay: float = 0.999
    mixed_precision: str = "no"  # no, bf16, fp16, auto (bf16 where the device computes it natively, else no)
    compile: bool = False


@dataclass
class SampleSection:
    """The preview grids drawn while training (their defaults: the library's)."""

    sampler: str = defaults.SAMPLER
    steps: int = defaults.STEPS
    cfg: float = defaults.CFG
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
    """A diffusion model's training run."""

    model: ModelSection = field(default_factory=ModelSection)
    diffusion: DiffusionSection = field(default_factory=DiffusionSection)
    data: DataSection = field(default_factory=DataSection)
    latent: LatentSection = field(default_factory=LatentSection)
    text: TextSection = field(default_factory=TextSection)
    low_res: LowResSection = field(default_factory=LowResSection)
    train: DiffusionTrainSection = field(default_factory=DiffusionTrainSection)
    sample: SampleSection = field(default_factory=SampleSection)


@dataclass
class AutoencoderTrainConfig:
    """An autoencoder's training run (model.type autoencoder_kl / autoencoder_vq): its own sections, so
    that a key it would ignore is an unknown key."""

    model: ModelSection = field(default_factory=lambda: ModelSection("autoencoder_kl"))
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    autoencoder: AutoencoderSection = field(default_factory=AutoencoderSection)


def beta_range(v: list[float] | None) -> str | None:
    ok = v is None or len(v) == 2 and all(0 <= b <= 1 for b in v)
    return None if ok else f"must be 2 floats in [0, 1], got {v!r}"


def device_name(v: str) -> str | None:
    return None if re.fullmatch(r"auto|cpu|cuda(:\d+)?", v) else f"must be auto, cpu, cuda or cuda:N, got {v!r}"


CHECKS: dict[str, Check] = {  # by full key, after the type check against the annotation
    "model.type": one_of(MODELS),
    "diffusion.schedule": one_of(SCHEDULES),
    "diffusion.timesteps": at_least(1),
    "diffusion.shift": positive,
    "diffusion.beta_range": beta_range,
    "diffusion.prediction": one_of(PREDICTION_TYPES),
    "diffusion.timestep_scale": positive,
    "diffusion.spacing": one_of(("", *SPACINGS)),
    "diffusion.steps_offset": at_least(0),
    "diffusion.t_sampling": one_of(T_DISTRIBUTIONS),
    "diffusion.logit_std": positive,
    "diffusion.min_snr_gamma": at_least(0),
    "diffusion.p_uncond": within(0, 1),
    "data.dataset": one_of(DATASETS),
    "data.resolution": at_least(1),
    "data.pad": at_least(0),
    "data.channels": one_of((1, 3)),  # grayscale or RGB images
    "data.size": at_least(1),
    "data.holdout": at_least(0),
    "data.num_workers": at_least(0),
    "text.max_length": at_least(1),
    "low_res.factor": at_least(0),
    "low_res.noise": at_least(0),
    **{f"train.{k}": at_least(1) for k in ("steps", "batch_size", "grad_accum", "log_every", "sample_every",
                                           "ckpt_every", "keep_last")},
    "train.lr": positive,
    "train.warmup": at_least(0),
    "train.lr_schedule": one_of(("constant", "cosine")),
    "train.weight_decay": at_least(0),
    "train.grad_clip": at_least(0),
    "train.ema_decay": within(0, 1),
    "train.mixed_precision": one_of(("no", "bf16", "fp16", "auto")),
    "train.device": device_name,
    "sample.sampler": one_of(SAMPLERS),
    "sample.steps": at_least(1),
    "sample.cfg": finite,
    "sample.n": at_least(1),
}


def from_dict(cls: type, data: dict[str, Any], where: str = "") -> Any:
    """Build dataclass `cls` from a nested dict, checking each key, its type (the annotation) and CHECKS."""
    fields, hints = {f.name for f in dataclasses.fields(cls)}, typing.get_type_hints(cls)
    unknown = sorted(set(data) - fields)
    if unknown:
        raise ValueError(f"unknown config key '{where}{unknown[0]}'; valid keys{' in ' + where[:-1] if where else ''}: "
                         f"{sorted(fields)}{did_you_mean(unknown[0], fields)}")
    kwargs = {}
    for name, value in data.items():
        key, hint = f"{where}{name}", hints[name]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                raise ValueError(f"config key '{key}' must be a table, got {value!r}")
            value = from_dict(hint, value, f"{key}.")
        elif problem := type_problem(value, hint) or (CHECKS[key](value) if key in CHECKS else None):
            raise ValueError(f"config key '{key}' {problem}")
        elif typing.get_origin(hint) is tuple:
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
    for i, p in enumerate(parents):
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ValueError(f"override {assignment!r}: config key '{'.'.join(parents[:i + 1])}' is not a table")
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
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"config file {path} must hold a mapping of sections")
        return data
    return tomllib.loads(path.read_text())


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> TrainConfig | AutoencoderTrainConfig:
    """A TrainConfig (an AutoencoderTrainConfig for model.type autoencoder_*) from a TOML / YAML file and
    'a.b=value' overrides, every value checked (see `from_dict`)."""
    data = read_file(path) if path else {}
    for o in overrides:
        apply_override(data, o)
    model_type = data.get("model", {}).get("type", "") if isinstance(data.get("model"), dict) else ""
    cfg = from_dict(AutoencoderTrainConfig if str(model_type).startswith("autoencoder") else TrainConfig, data)
    model_config(cfg.model.type, cfg.model.config, source="model.config")
    return cfg


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)
