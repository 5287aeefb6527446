"""What a pipeline is: a denoiser network with its diffusion settings, training size, conditioning, and for
latent models its autoencoder; what it can do follows from these (its conditioning kind, its tasks).

A diffusekit model folder holds the network (config.json + model.safetensors, whose config.json also records
the diffusion settings, the training image size and the conditioning), and for latent models its frozen
autoencoder in `autoencoder/` (see `loading`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from .. import defaults
from ..conditioning import Conditioner, PromptEncoder, SD3TextEncoder, SDXLTextEncoder, TextEncoder
from ..denoisers import DiffusionSettings, NetworkDenoiser
from ..models.unet import DeepCache
from .generate import generate


DECODE_TENSORS = 8  # a decode holds about this many full-resolution activations of the decoder's first width
# (measured: SD's VAE decoding 1024x1024 in float32 peaks 3.77 GB over its weights, 7.5 x 1024^2 x 128 x 4 bytes)


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
    map_classes: tuple[str, ...] = ()  # semantic-map models: the class of each map index, one-hot concatenated
    layout_classes: tuple[str, ...] = ()  # layout models: the class of each box class index

    def __post_init__(self):
        self.schedule = self.settings.make_schedule()
        self.conditioner = Conditioner(self.net, self.text_encoder, self.num_classes)

    def __call__(self, prompt: str | Sequence[str] | None = None, negative_prompt: str | Sequence[str] | None = None,
                 class_labels: int | Sequence[int] | None = None, num_images_per_prompt: int = 1,
                 num_inference_steps: int = defaults.STEPS, guidance_scale: float = defaults.CFG,
                 seed: int | None = None, mask_image: Tensor | None = None, **kw: Any) -> Tensor:
        """diffusers-style call, an adapter from diffusers' names to `generate`'s: images [n, C, H, W] in
        [-1, 1] for each prompt / class label (or unconditional) times num_images_per_prompt; every other
        keyword goes to `generate` (height, width, sampler, generator, upsample_guidance, image, strength, ...)."""
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
                        cfg=guidance_scale, mask=mask_image, **kw)

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    @property
    def conditioning(self) -> str:
        """What the network is conditioned on: 'class' (labels), 'text' (prompts), 'layout' (boxes) or
        'unconditional'."""
        if self.num_classes:
            return "class"
        return "text" if self.text_encoder is not None else "layout" if self.layout_classes else "unconditional"

    @property
    def clip_encoders(self) -> dict[str, TextEncoder]:
        """The CLIP text encoders, by the component names LoRA and embedding files use ('text_encoder', and SDXL's
        and SD3's 'text_encoder_2')."""
        te = self.text_encoder
        encoders = [te.clip_l, te.clip_g] if isinstance(te, (SDXLTextEncoder, SD3TextEncoder)) else [te]
        return {name: enc for name, enc in zip(("text_encoder", "text_encoder_2"), encoders)
                if isinstance(enc, TextEncoder) and enc.is_clip}

    @property
    def factor(self) -> int:
        """Pixels per latent pixel (1 in pixel space)."""
        return self.autoencoder.downsample_factor if self.autoencoder is not None else 1

    @property
    def latent_channels(self) -> int:
        """Channels of the diffusion state (the autoencoder's latent channels, or the image's)."""
        return self.autoencoder.config.latent_channels if self.autoencoder is not None else self.channels

    @property
    def is_inpainting(self) -> bool:
        """Whether the network is a dedicated inpainting model (SD's 9-channel form: noisy state + mask + the masked
        image's latent), which needs an image and a mask."""
        return not self.low_res_factor and not self.map_classes and self.net.config.in_channels != self.latent_channels

    @property
    def tasks(self) -> tuple[str, ...]:
        """What the pipeline can do: 'upscale' (super-resolution models), 'inpaint' and 'outpaint' (inpainting
        models), or 'sample', 'img2img', 'inpaint' and 'outpaint' (training-free) for every other model
        (semantic-map models: of a map)."""
        if self.low_res_factor:
            return ("upscale",)
        return ("inpaint", "outpaint") if self.is_inpainting else ("sample", "img2img", "inpaint", "outpaint")

    @property
    def size_multiple(self) -> int:
        """Image heights and widths must be multiples of this (the network's and the autoencoder's downsampling)."""
        return getattr(self.net, "downsample_factor", 1) * self.factor

    def denoiser(self, cache: int = 1, cache_depth: int = defaults.CACHE_DEPTH) -> NetworkDenoiser:
        """The network as a denoiser; with `cache` > 1 its UNet's deep features are recomputed every `cache` calls
        (`DeepCache`, a fresh one per call of this method)."""
        net = self.net if cache == 1 else DeepCache(self.net, cache, cache_depth)
        return self.settings.denoiser(net, self.schedule)

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        """Shape (C, h, w) of the diffusion state for an image of height x width."""
        if height % self.size_multiple or width % self.size_multiple:
            raise ValueError(f"image size {height}x{width} must be divisible by {self.size_multiple} for this model")
        return self.latent_channels, height // self.factor, width // self.factor

    def encode(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Images -> float32 diffusion states (the posterior mean, or a sample drawn with `generator`)."""
        if self.autoencoder is None:
            return x
        return self.autoencoder.to_latent(x.to(next(self.autoencoder.parameters()).dtype), generator).float()

    def decode(self, z: Tensor, tile: int | None = None) -> Tensor:
        """Diffusion states -> float32 images. Latent models decode in overlapping tile x tile pixel windows,
        blended, for a `tile` given; 0 decodes whole; None (the default) decodes whole what fits in
        defaults.DECODE_MEMORY (exact) and anything larger in the fewest tiles that fit (`decode_tile`)."""
        if self.autoencoder is None:
            return z
        if tile and tile % self.factor:
            raise ValueError(f"the decode tile {tile} must be a multiple of the autoencoder's factor {self.factor}")
        latent_tile = self.decode_tile(z) if tile is None else tile // self.factor or None
        return self.autoencoder.from_latent(z.to(next(self.autoencoder.parameters()).dtype), latent_tile).float()

    def decode_tile(self, z: Tensor) -> int | None:
        """The latent tile side that decodes z within defaults.DECODE_MEMORY with the fewest tiles per side (tiles
        overlap by a quarter), or None if z fits whole."""
        ae = self.autoencoder
        per_latent_pixel = len(z) * self.factor**2 * ae.config.channels * next(ae.parameters()).element_size()
        fits = max(math.isqrt(defaults.DECODE_MEMORY // (per_latent_pixel * DECODE_TENSORS)), 8)
        side, n = max(z.shape[-2:]), 1
        while (tile := math.ceil(side / (n - (n - 1) / 4))) > fits:
            n += 1
        return None if n == 1 else tile
