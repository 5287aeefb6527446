"""What every pipeline shares: the model folder, conditions, latent encode/decode, and `generate`.

A diffusekit model folder holds the denoiser network (config.json + model.safetensors, whose
config.json also records the diffusion settings, the training image size and the conditioning), and
for latent models its frozen autoencoder in `autoencoder/`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from ..checkpoints import from_pretrained, read_config, staging_dir, write_model
from ..denoisers import Denoiser, NetworkDenoiser
from ..guidance import CFG, UpsampleGuidance
from ..parametrization import Prediction
from ..samplers import Callback, get_sampler
from ..schedules import Schedule, make_schedule


@dataclass
class DiffusionSettings:
    """How a network's outputs and times are read (stored in the model folder's config.json)."""

    schedule: str = "linear"
    timesteps: int = 1000
    zero_terminal_snr: bool = False
    shift: float = 1.0
    prediction: str = "eps"
    timestep_scale: float = 1.0
    beta_range: tuple[float, float] | None = None  # None: the named schedule's own
    spacing: str = ""  # default sampling grid: leading, trailing, linspace ("" = the schedule's default)
    steps_offset: int = 0

    def __post_init__(self):
        if self.beta_range is not None:
            self.beta_range = tuple(self.beta_range)

    def make_schedule(self) -> Schedule:
        return make_schedule(self.schedule, self.timesteps, self.zero_terminal_snr, self.shift, self.beta_range)

    def grid(self, schedule: Schedule, steps: int, spacing: str | None = None) -> torch.Tensor:
        """The sampling grid: `spacing` if given, else this model's default."""
        spacing = spacing or self.spacing
        if not spacing:
            return schedule.timesteps(steps)
        return schedule.timesteps(steps, spacing, self.steps_offset if spacing == "leading" else 0)


@dataclass
class Pipeline:
    """A denoiser network with everything needed to turn conditions into images."""

    net: nn.Module
    settings: DiffusionSettings
    resolution: tuple[int, int]  # training image size (H, W)
    channels: int  # image channels
    num_classes: int | None = None
    autoencoder: nn.Module | None = None
    text_encoder: Any = None  # conditioning.TextEncoder
    text_encoder_name: str = ""

    def __post_init__(self):
        self.schedule = self.settings.make_schedule()

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    @property
    def factor(self) -> int:
        """Pixels per latent pixel (1 in pixel space)."""
        return self.autoencoder.downsample_factor if self.autoencoder is not None else 1

    def denoiser(self) -> NetworkDenoiser:
        return NetworkDenoiser(self.net, self.schedule, self.settings.prediction, self.settings.timestep_scale)

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        """Shape (C, h, w) of the diffusion state for an image of height x width."""
        net_factor = getattr(self.net, "downsample_factor", 1) * self.factor
        if height % net_factor or width % net_factor:
            raise ValueError(f"image size {height}x{width} must be divisible by {net_factor} for this model")
        c = self.autoencoder.config.latent_channels if self.autoencoder is not None else self.channels
        return c, height // self.factor, width // self.factor

    def encode(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        return x if self.autoencoder is None else self.autoencoder.to_latent(x, generator)

    def decode(self, z: Tensor) -> Tensor:
        if self.autoencoder is None:
            return z
        return self.autoencoder.from_latent(z.to(next(self.autoencoder.parameters()).dtype))

    def conditions(self, n: int, labels: Tensor | None = None, prompts: Sequence[str] | None = None,
                   negative: Sequence[str] | None = None) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """(cond, uncond) for n samples: class labels against the null class, prompts against the
        negative prompts or the empty prompt."""
        cond, uncond = {}, {}
        if self.num_classes:
            if labels is None:
                raise ValueError(f"this model is class-conditional ({self.num_classes} classes): pass labels")
            labels = torch.as_tensor(labels, device=self.device).long()
            if labels.shape != (n,) or bool(((labels < 0) | (labels >= self.num_classes)).any()):
                raise ValueError(f"labels must be {n} integers in [0, {self.num_classes}), got {labels.tolist()}")
            cond["class_labels"], uncond["class_labels"] = labels, torch.full_like(labels, self.num_classes)
        if self.text_encoder is not None:
            if prompts is None or len(prompts) != n:
                raise ValueError(f"this model is text-conditional: pass {n} prompts")
            negative = list(negative) if negative else [""] * n
            if len(negative) == 1:
                negative = negative * n
            tokens, pooled = self.text_encoder(list(prompts) + negative)
            for d, sl in ((cond, slice(0, n)), (uncond, slice(n, 2 * n))):
                d["context"] = tokens[sl]
                if "pooled" in getattr(self.net, "cond_keys", ()):
                    d["pooled"] = pooled[sl]
        return cond, uncond


def upsample_factor(pipe: Pipeline, height: int, width: int) -> int:
    """s = height / training height for Upsample Guidance (an integer >= 2, dividing the width too); the
    low-resolution call then runs at (height / s) x (width / s), which may be non-square."""
    h = pipe.resolution[0]
    s = height // h
    if height % h or s < 2 or width % s:
        raise ValueError(f"Upsample Guidance needs the height {height} to be an integer multiple s >= 2 of the "
                         f"training height {h}, and the width {width} divisible by that s")
    pipe.latent_shape(height // s, width // s)  # the low-resolution call must fit the network too
    return s


def generate(pipe: Pipeline, n: int, *, labels: Tensor | None = None, prompts: Sequence[str] | None = None,
             negative: Sequence[str] | None = None, height: int | None = None, width: int | None = None,
             sampler: str = "ddim", steps: int = 50, cfg_scale: float = 1.0, spacing: str | None = None,
             upsample_guidance: float | None = None, ug_eta: float = 1.0, generator: torch.Generator | None = None,
             wrap: Callable[[Denoiser], Denoiser] | None = None, progress: bool = False, **sampler_kw: Any) -> Tensor:
    """Sample n images [n, C, H, W] in [-1, 1]: conditions -> CFG -> Upsample Guidance (weight
    `upsample_guidance`, for sizes s x the training one) -> (wrap) -> sampler -> decode. A state that turns
    NaN / inf raises FloatingPointError naming the first such step."""
    if n < 1 or steps < 1:
        raise ValueError(f"n and steps must be positive, got n={n}, steps={steps}")
    if not math.isfinite(cfg_scale) or (upsample_guidance is not None and not math.isfinite(upsample_guidance)):
        raise ValueError(f"guidance weights must be finite, got {cfg_scale=}, {upsample_guidance=}")
    if not 0 <= ug_eta <= 1:
        raise ValueError(f"ug_eta must be in [0, 1], got {ug_eta}")
    H, W = height or pipe.resolution[0], width or pipe.resolution[1]
    shape = pipe.latent_shape(H, W)
    cond, uncond = pipe.conditions(n, labels, prompts, negative)
    denoiser: Denoiser = pipe.denoiser()
    if cond and cfg_scale != 1:
        denoiser = CFG(denoiser, cfg_scale, uncond)
    if upsample_guidance is not None:
        denoiser = UpsampleGuidance(denoiser, pipe.schedule, upsample_factor(pipe, H, W), upsample_guidance, ug_eta)
    if wrap is not None:
        denoiser = wrap(denoiser)
    ts = pipe.settings.grid(pipe.schedule, steps, spacing)
    x = torch.randn((n, *shape), generator=generator, device=generator.device if generator else "cpu").to(pipe.device)
    run = partial(get_sampler(sampler), denoiser, x, ts, pipe.schedule, cond, generator=generator, progress=progress)
    with torch.no_grad():
        z = run_finite(run, f"sampler {sampler}", len(ts) - 1, **sampler_kw)
        return pipe.decode(z).float().clamp(-1, 1)


def run_finite(run: Callable[..., Tensor], what: str, steps: int, callback: Callback | None = None,
               **kw: Any) -> Tensor:
    """run(callback=..., **kw) for a sampler run of `steps` steps, raising FloatingPointError that names the
    first step whose state is NaN / inf. The per-step flags stay on the device: one host sync, at the end."""
    finite: list[Tensor] = []

    def watch(i: int, t: float, x: Tensor, p: Prediction) -> None:
        finite.append(torch.isfinite(x).all())
        if callback is not None:
            callback(i, t, x, p)

    z = run(callback=watch, **kw)
    if not bool(torch.isfinite(z).all()):
        bad = torch.stack(finite).logical_not().nonzero().flatten().tolist() if finite else []
        at = f"step {bad[0] + 1} of {steps}" if bad else f"the end of {steps} steps"
        raise FloatingPointError(f"sampling produced NaN/inf at {at} ({what})")
    return z


def save_pipeline(pipe: Pipeline, path: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Write the model folder: network + settings, and the autoencoder in autoencoder/."""
    path = Path(path)
    extra = {"diffusion": dataclasses.asdict(pipe.settings), "image": {"resolution": list(pipe.resolution),
             "channels": pipe.channels}, "conditioning": {"num_classes": pipe.num_classes,
                                                          "text_encoder": pipe.text_encoder_name}}
    with staging_dir(path) as tmp:  # one atomic replace, so a network never goes without its autoencoder
        write_model(pipe.net, tmp, dtype, extra)
        if pipe.autoencoder is not None:
            write_model(pipe.autoencoder, tmp / "autoencoder", dtype)
    return path


def load_pipeline(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = torch.float32) -> Pipeline:
    """Load a model folder written by `save_pipeline` (or by the trainer), computing in `dtype` whatever
    precision the weights are stored in (None keeps the stored one)."""
    path = Path(path)
    meta = read_config(path)
    for key in ("diffusion", "image"):
        if key not in meta:
            raise ValueError(f"{path} holds a bare network, not a diffusion model (no {key!r} in config.json)")
    net = from_pretrained(path, device, dtype).eval()
    ae = from_pretrained(path / "autoencoder", device, dtype).eval() if (path / "autoencoder").is_dir() else None
    cond = meta.get("conditioning", {})
    text_encoder = None
    if cond.get("text_encoder"):
        from ..conditioning import load_text_encoder

        text_encoder = load_text_encoder(cond["text_encoder"], device=device)
    return Pipeline(net, DiffusionSettings(**meta["diffusion"]), tuple(meta["image"]["resolution"]),
                    meta["image"]["channels"], cond.get("num_classes"), ae, text_encoder, cond.get("text_encoder", ""))
