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
import torch.nn.functional as F
from torch import Tensor, nn

from ..checkpoints import from_pretrained, read_config, staging_dir, write_model
from ..conditioning import Conditioner, PromptEncoder
from ..denoisers import Denoiser, DiffusionSettings, NetworkDenoiser
from ..guidance import CFG, Inpaint, UpsampleGuidance
from ..parametrization import Prediction
from ..samplers import Callback, get_sampler
from ..schedules import img2img_grid


@dataclass
class Pipeline:
    """A denoiser network with everything needed to turn conditions into images."""

    net: nn.Module
    settings: DiffusionSettings
    resolution: tuple[int, int]  # training image size (H, W)
    channels: int  # image channels
    num_classes: int | None = None
    autoencoder: nn.Module | None = None
    text_encoder: PromptEncoder | None = None
    text_encoder_name: str = ""
    low_res_factor: int = 0  # super-resolution models: the low-resolution input is H / f x W / f
    low_res_noise: float = 0.0  # and is noise-augmented with this standard deviation

    def __post_init__(self):
        self.schedule = self.settings.make_schedule()
        self.conditioner = Conditioner(self.net, self.text_encoder, self.num_classes)

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device = "cpu", **kw: Any) -> "Pipeline":
        """A model folder (ours or a diffusers pipeline's) or an SD single file; see `load_pipeline`."""
        return load_pipeline(path, device, **kw)

    def __call__(self, prompt: str | Sequence[str] | None = None, negative_prompt: str | Sequence[str] | None = None,
                 class_labels: int | Sequence[int] | None = None, num_images_per_prompt: int = 1,
                 num_inference_steps: int = 50, guidance_scale: float = 1.0, seed: int | None = None,
                 mask_image: Tensor | None = None, **kw: Any) -> Tensor:
        """diffusers-style call: images [n, C, H, W] in [-1, 1] for each prompt / class label (or
        unconditional) times num_images_per_prompt; every other keyword goes to `generate` (height, width,
        sampler, generator, upsample_guidance, image, strength, low_res, ...)."""
        def repeat(v: Any) -> list[Any] | None:  # each prompt / label num_images_per_prompt times
            return None if v is None else [x for x in ([v] if isinstance(v, (str, int)) else v)
                                           for _ in range(num_images_per_prompt)]

        prompts, labels = repeat(prompt), repeat(class_labels)
        negative = [negative_prompt] if isinstance(negative_prompt, str) else repeat(negative_prompt)
        labels = torch.tensor(labels) if labels is not None else None
        n = len(prompts) if prompts else len(labels) if labels is not None else num_images_per_prompt
        if seed is not None:
            kw.setdefault("generator", torch.Generator().manual_seed(seed))
        return generate(self, n, labels=labels, prompts=prompts, negative=negative, steps=num_inference_steps,
                        cfg_scale=guidance_scale, mask=mask_image, **kw)

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    @property
    def factor(self) -> int:
        """Pixels per latent pixel (1 in pixel space)."""
        return self.autoencoder.downsample_factor if self.autoencoder is not None else 1

    def denoiser(self) -> NetworkDenoiser:
        return self.settings.denoiser(self.net, self.schedule)

    @property
    def size_multiple(self) -> int:
        """Image heights and widths must be multiples of this (the network's and the autoencoder's downsampling)."""
        return getattr(self.net, "downsample_factor", 1) * self.factor

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        """Shape (C, h, w) of the diffusion state for an image of height x width."""
        if height % self.size_multiple or width % self.size_multiple:
            raise ValueError(f"image size {height}x{width} must be divisible by {self.size_multiple} for this model")
        c = self.autoencoder.config.latent_channels if self.autoencoder is not None else self.channels
        return c, height // self.factor, width // self.factor

    def encode(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Images -> float32 diffusion states (the posterior mean, or a sample drawn with `generator`)."""
        if self.autoencoder is None:
            return x
        return self.autoencoder.to_latent(x.to(next(self.autoencoder.parameters()).dtype), generator).float()

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
             upsample_guidance: float | None = None, ug_eta: float = 1.0, image: Tensor | None = None,
             strength: float = 1.0, mask: Tensor | None = None, low_res: Tensor | None = None,
             latents: Tensor | None = None, denoising_start: float = 0.0, denoising_end: float = 1.0,
             output: str = "image", original_size: tuple[int, int] | None = None,
             crop_top_left: tuple[int, int] = (0, 0), target_size: tuple[int, int] | None = None,
             generator: torch.Generator | None = None, wrap: Callable[[Denoiser], Denoiser] | None = None,
             progress: bool = False, **sampler_kw: Any) -> Tensor:
    """Sample n images [n, C, H, W] in [-1, 1] (or, with output='latent', the diffusion state):
    conditions -> CFG -> inpainting -> Upsample Guidance -> (wrap) -> sampler -> decode.

    - text-to-image / class-conditional / unconditional: `prompts` (+ `negative`), `labels`, or neither;
    - image-to-image (SDEdit): `image` [1 or n, C, H, W] in [-1, 1] is encoded and noised to the time
      a fraction `strength` in (0, 1] down the grid; strength 1 starts from pure noise (text-to-image);
    - inpainting: `image` and `mask` [1 or n, 1, H, W] (1 = generate); dedicated 9-channel models also
      get mask + masked-image latent concatenated; every model keeps the known region (`Inpaint`);
    - super-resolution models: `low_res` [1 or n, C, H / f, W / f];
    - refiner hand-off: `denoising_end` < 1 stops a fraction of the way down the grid (use output='latent'),
      `denoising_start` > 0 with those `latents` finishes it;
    - SDXL micro-conditioning: `original_size`, `crop_top_left`, `target_size` (default: the output size).
    A state that turns NaN / inf raises FloatingPointError naming the first such step."""
    if n < 1 or steps < 1:
        raise ValueError(f"n and steps must be positive, got n={n}, steps={steps}")
    if not math.isfinite(cfg_scale) or (upsample_guidance is not None and not math.isfinite(upsample_guidance)):
        raise ValueError(f"guidance weights must be finite, got {cfg_scale=}, {upsample_guidance=}")
    if not 0 <= ug_eta <= 1:
        raise ValueError(f"ug_eta must be in [0, 1], got {ug_eta}")
    if not 0 <= denoising_start < denoising_end <= 1:
        raise ValueError(f"need 0 <= denoising_start < denoising_end <= 1, got {denoising_start}, {denoising_end}")
    if output not in ("image", "latent"):
        raise ValueError(f"output must be 'image' or 'latent', got {output!r}")
    H, W = height or pipe.resolution[0], width or pipe.resolution[1]
    shape, image, mask, low_res = check_inputs(pipe, n, H, W, image, mask, low_res, upsample_guidance)
    size = tuple(original_size or target_size or (H, W))
    cond = pipe.conditioner(n, labels, prompts, size=tuple(target_size or (H, W)), device=pipe.device,
                            original_size=torch.tensor([size]).expand(n, 2),
                            crop_top_left=torch.tensor([crop_top_left]).expand(n, 2))
    known = keep = None
    if image is not None:
        image = image.to(pipe.device)
        known = pipe.encode(image)
    if mask is not None:
        mask = mask.to(pipe.device)
        keep = 1 - F.max_pool2d(mask, pipe.factor)  # a latent pixel is known if all its pixels are
        if pipe.net.config.in_channels == 2 * shape[0] + 1:  # SD-inpainting form: noisy + mask + masked image
            masked = pipe.encode(image * (1 - mask))
            cond["concat"] = torch.cat([F.interpolate(mask, size=shape[1:]), masked], dim=1)
    if low_res is not None:
        low_res = low_res.to(pipe.device)
        z = randn(low_res.shape, generator, pipe.device)
        cond["concat"] = low_res_condition(low_res, shape[1:], z, pipe.low_res_noise)
    denoiser: Denoiser = pipe.denoiser()
    if pipe.conditioner.keys and cfg_scale != 1:  # (a concatenated image alone is no condition to guide by)
        denoiser = CFG(denoiser, cfg_scale, pipe.conditioner.null(cond, negative))
    if keep is not None:
        denoiser = Inpaint(denoiser, pipe.schedule, known, keep)
    if upsample_guidance is not None:
        denoiser = UpsampleGuidance(denoiser, pipe.schedule, upsample_factor(pipe, H, W), upsample_guidance, ug_eta)
    if wrap is not None:
        denoiser = wrap(denoiser)
    ts = pipe.settings.grid(pipe.schedule, steps, spacing)
    ts = ts[round(steps * denoising_start):round(steps * denoising_end) + 1]
    if image is not None:
        ts = img2img_grid(ts, strength)
    if latents is not None:  # (no noise drawn: a hand-off continues the generator's stream)
        if latents.shape != (n, *shape):
            raise ValueError(f"latents must have shape {(n, *shape)}, got {tuple(latents.shape)}")
        x = latents.to(pipe.device)
    else:
        x = randn((n, *shape), generator, pipe.device)
        if image is not None and strength < 1:
            a, b = (c.item() for c in pipe.schedule.alpha_sigma(ts[0]))
            x = a * known + b * x
    run = partial(get_sampler(sampler), denoiser, x, ts, pipe.schedule, cond, generator=generator, progress=progress)
    with torch.no_grad():
        z = run_finite(run, f"sampler {sampler}", len(ts) - 1, **sampler_kw)
        if output == "latent":
            return z
        out = pipe.decode(z).float().clamp(-1, 1)
        return out if keep is None or pipe.autoencoder is not None else torch.where(keep.bool(), image, out)


def check_inputs(pipe: Pipeline, n: int, height: int, width: int, image: Tensor | None = None,
                 mask: Tensor | None = None, low_res: Tensor | None = None,
                 upsample_guidance: float | None = None) -> tuple[tuple[int, int, int], Tensor | None,
                                                                  Tensor | None, Tensor | None]:
    """generate's checks of its inputs against the model, cheap enough to run before queueing the work: the
    diffusion state's shape (C, h, w), and the image, mask and low-resolution input as n images each (or None).
    Raises ValueError naming the problem (size not divisible, wrong channels, mask size, UG size, ...)."""
    shape = pipe.latent_shape(height, width)
    if image is not None:
        image = check_image(image, n, pipe.channels, (height, width), "image")
    if mask is not None:
        if image is None:
            raise ValueError("inpainting needs the image as well as the mask")
        mask = check_mask(mask, n, (height, width))
    elif pipe.net.config.in_channels != shape[0] and not pipe.low_res_factor:
        raise ValueError(f"this is an inpainting model ({pipe.net.config.in_channels} input channels): pass image and mask")
    if (low_res is not None) != bool(pipe.low_res_factor):
        raise ValueError("low_res is for super-resolution models, and they need it" if pipe.low_res_factor
                         else "this model is not a super-resolution model: it takes no low_res")
    if low_res is not None:
        f = pipe.low_res_factor
        low_res = check_image(low_res, n, pipe.channels, (height // f, width // f), "low_res")
    if upsample_guidance is not None:
        upsample_factor(pipe, height, width)
    return shape, image, mask, low_res


def randn(shape: Sequence[int], generator: torch.Generator | None, device: torch.device) -> Tensor:
    """N(0, I) noise drawn on the generator's device (the CPU without one), so that a seed gives the same
    noise wherever the model runs; then moved to `device`."""
    return torch.randn(tuple(shape), generator=generator, device=generator.device if generator else "cpu").to(device)


def check_image(image: Tensor, n: int, channels: int, size: tuple[int, int], what: str,
                value_range: tuple[float, float] = (-1.0, 1.0)) -> Tensor:
    """An input batch [1 or n, channels, H, W] of values in `value_range`, as n images (never modified in place)."""
    if not torch.is_tensor(image) or image.ndim != 4:
        raise ValueError(f"{what} must be a tensor [N, C, H, W], got {getattr(image, 'shape', type(image).__name__)}")
    if image.shape[0] not in (1, n):
        raise ValueError(f"{what} holds {image.shape[0]} images; pass 1 or {n}")
    if image.shape[1] != channels:
        raise ValueError(f"{what} has {image.shape[1]} channels; this model takes {channels}")
    if tuple(image.shape[-2:]) != tuple(size):
        raise ValueError(f"{what} is {image.shape[-2]}x{image.shape[-1]}; it must be {size[0]}x{size[1]}")
    lo, hi = value_range
    if not bool(torch.isfinite(image).all()) or image.min() < lo - 1e-3 or image.max() > hi + 1e-3:
        raise ValueError(f"{what} values must be finite and in [{lo:g}, {hi:g}] "
                         f"(got [{image.min():.3g}, {image.max():.3g}])")
    return image.float().expand(n, -1, -1, -1)


def check_mask(mask: Tensor, n: int, size: tuple[int, int]) -> Tensor:
    """A binary(-ish) inpainting mask [1 or n, 1, H, W] in [0, 1] (1 = generate), thresholded at 0.5."""
    mask = check_image(mask, n, 1, size, "mask", (0.0, 1.0))
    undecided = ((mask > 0.1) & (mask < 0.9)).float().mean().item()
    if undecided > 0.05:
        raise ValueError(f"mask is not binary: {undecided:.0%} of its values lie between 0.1 and 0.9")
    return (mask > 0.5).float()


def low_res_condition(low_res: Tensor, size: Sequence[int], z: Tensor, noise: float) -> Tensor:
    """Super-resolution's concatenated condition: the low-resolution image plus noise * z (noise
    augmentation), resized (bilinear) to the diffusion state's size."""
    return F.interpolate(low_res + noise * z, size=tuple(size), mode="bilinear", align_corners=False)


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
                                                          "text_encoder": pipe.text_encoder_name,
                                                          "low_res_factor": pipe.low_res_factor,
                                                          "low_res_noise": pipe.low_res_noise}}
    with staging_dir(path) as tmp:  # one atomic replace, so a network never goes without its autoencoder
        write_model(pipe.net, tmp, dtype, extra)
        if pipe.autoencoder is not None:
            write_model(pipe.autoencoder, tmp / "autoencoder", dtype)
    return path


def load_pipeline(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = torch.float32,
                  text_encoder: str | Path | None = None) -> Pipeline:
    """Load a model folder written by `save_pipeline` (or by the trainer), computing in `dtype` whatever
    precision the weights are stored in (None keeps the stored one); a diffusers pipeline folder
    (model_index.json) or an original Stable Diffusion single file (with the `text_encoder` folder for its
    prompts) loads through `diffusekit.interop`."""
    path = Path(path)
    if path.is_file():
        from ..interop.pipelines import load_sd_single_file

        return load_sd_single_file(path, str(device), dtype, text_encoder=text_encoder)
    if text_encoder is not None:
        raise ValueError("a text encoder is given only with a Stable Diffusion single file (the folders name theirs)")
    if (path / "model_index.json").is_file():
        from ..interop.pipelines import load_diffusers_pipeline

        return load_diffusers_pipeline(path, str(device), dtype)
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
                    meta["image"]["channels"], cond.get("num_classes"), ae, text_encoder, cond.get("text_encoder", ""),
                    cond.get("low_res_factor", 0), cond.get("low_res_noise", 0.0))
