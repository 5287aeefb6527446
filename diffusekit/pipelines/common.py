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
from ..conditioning import Conditioner, TextEncoder
from ..denoisers import Denoiser, DiffusionSettings, NetworkDenoiser
from ..guidance import CFG, UpsampleGuidance
from ..parametrization import Prediction
from ..samplers import Callback, get_sampler


@dataclass
class Pipeline:
    """A denoiser network with everything needed to turn conditions into images."""

    net: nn.Module
    settings: DiffusionSettings
    resolution: tuple[int, int]  # training image size (H, W)
    channels: int  # image channels
    num_classes: int | None = None
    autoencoder: nn.Module | None = None
    text_encoder: TextEncoder | None = None
    text_encoder_name: str = ""

    def __post_init__(self):
        self.schedule = self.settings.make_schedule()
        self.conditioner = Conditioner(self.net, self.text_encoder, self.num_classes)

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    @property
    def factor(self) -> int:
        """Pixels per latent pixel (1 in pixel space)."""
        return self.autoencoder.downsample_factor if self.autoencoder is not None else 1

    def denoiser(self) -> NetworkDenoiser:
        return self.settings.denoiser(self.net, self.schedule)

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
    cond = pipe.conditioner(n, labels, prompts, size=(H, W), device=pipe.device)
    denoiser: Denoiser = pipe.denoiser()
    if cond and cfg_scale != 1:
        denoiser = CFG(denoiser, cfg_scale, pipe.conditioner.null(cond, negative))
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
