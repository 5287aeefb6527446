"""Autoencoders of latent diffusion (SPEC §6): the LDM encoder E and decoder D, regularised by a diagonal
Gaussian posterior (KL) or by vector quantisation (VQ).

Diffusion runs on z = (E(x) - shift_factor) * scaling_factor (SD: scale 0.18215, no shift; SD3 shifts too);
images come from D(z / scaling_factor + shift_factor). `to_latent` / `from_latent` apply this convention.
Large images can be encoded and decoded in overlapping tiles, blended linearly (`tile_size`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .layers import Downsample, ResBlock, SpatialSelfAttention, Upsample

EPS = 1e-6  # GroupNorm epsilon of the LDM autoencoder


@dataclass
class AutoencoderConfig:
    in_channels: int = 3
    out_channels: int = 3
    channels: int = 128  # base channels; level l has channels * channel_mult[l]
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)  # f = 2^(levels - 1)
    num_res_blocks: int = 2  # per encoder level (the decoder has one more)
    latent_channels: int = 4  # c
    groups: int = 32
    mid_attention: bool = True
    quant_conv: bool = True  # 1x1 convs around the latent (absent in SD3 / Flux)
    scaling_factor: float = 1.0
    shift_factor: float = 0.0

    def __post_init__(self):
        self.channel_mult = tuple(self.channel_mult)  # JSON gives a list


@dataclass
class VQAutoencoderConfig(AutoencoderConfig):
    num_embeddings: int = 8192  # codebook size
    embed_dim: int = 4  # codebook vector size (quant_conv maps latent_channels -> embed_dim)
    beta: float = 0.25  # commitment loss weight


def sd_vae_config() -> AutoencoderConfig:
    """The KL-f8 autoencoder of Stable Diffusion 1.x / 2.x (83.7M parameters)."""
    return AutoencoderConfig(in_channels=3, out_channels=3, channels=128, channel_mult=(1, 2, 4, 4), num_res_blocks=2,
                             latent_channels=4, groups=32, scaling_factor=0.18215)


class DiagonalGaussian:
    """Posterior N(mean, diag(exp(logvar))) from moments [B, 2c, h, w]; logvar clamped to [-30, 20] as in LDM."""

    def __init__(self, moments: Tensor):
        self.mean, logvar = moments.chunk(2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        """mean + std * n, n ~ N(0, I) drawn with `generator` (on its device, then moved)."""
        device = generator.device if generator is not None else self.mean.device
        n = torch.randn(self.mean.shape, generator=generator, device=device, dtype=self.mean.dtype)
        return self.mean + self.std * n.to(self.mean.device)

    def mode(self) -> Tensor:
        return self.mean

    def kl(self) -> Tensor:
        """KL(q || N(0, I)) summed over latent dimensions -> [B]."""
        return 0.5 * (self.mean.square() + self.std.square() - 1.0 - self.logvar).sum(dim=(1, 2, 3))


class MidBlock(nn.Module):
    """ResBlock -> single-head self-attention -> ResBlock at the lowest resolution."""

    def __init__(self, ch: int, groups: int, attention: bool):
        super().__init__()
        self.res1 = ResBlock(ch, ch, groups=groups, eps=EPS)
        self.attn = SpatialSelfAttention(ch, groups=groups, eps=EPS) if attention else nn.Identity()
        self.res2 = ResBlock(ch, ch, groups=groups, eps=EPS)

    def forward(self, x: Tensor) -> Tensor:
        return self.res2(self.attn(self.res1(x)))


class Level(nn.Module):
    """`n` ResBlocks (in_ch -> out_ch) followed by a resampler (or nothing)."""

    def __init__(self, in_ch: int, out_ch: int, n: int, groups: int, resample: nn.Module | None):
        super().__init__()
        self.blocks = nn.ModuleList(ResBlock(in_ch if i == 0 else out_ch, out_ch, groups=groups, eps=EPS)
                                    for i in range(n))
        self.resample = resample or nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            x = block(x)
        return self.resample(x)


class Encoder(nn.Module):
    """conv_in -> levels of ResBlocks, each but the last ending in an asymmetric stride-2 conv -> mid block
    -> GroupNorm, SiLU, conv_out."""

    def __init__(self, in_channels: int, out_channels: int, chs: Sequence[int], num_res_blocks: int, groups: int,
                 mid_attention: bool):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, chs[0], 3, padding=1)
        self.down = nn.ModuleList(
            Level(c_in, c, num_res_blocks, groups, Downsample(c, asymmetric=True) if l < len(chs) - 1 else None)
            for l, (c_in, c) in enumerate(zip([chs[0], *chs[:-1]], chs)))
        self.mid = MidBlock(chs[-1], groups, mid_attention)
        self.norm_out = nn.GroupNorm(groups, chs[-1], eps=EPS)
        self.conv_out = nn.Conv2d(chs[-1], out_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)  # (B, chs[0], H, W)
        for level in self.down:
            h = level(h)  # (B, chs[l], H / 2^(l+1), W / 2^(l+1)), the last level keeps its size
        h = self.mid(h)  # (B, chs[-1], H / f, W / f)
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, out_channels, H / f, W / f)


class Decoder(nn.Module):
    """conv_in -> mid block -> levels (deepest first) of ResBlocks, each but the last ending in nearest x2
    upsampling + conv -> GroupNorm, SiLU, conv_out."""

    def __init__(self, in_channels: int, out_channels: int, chs: Sequence[int], num_res_blocks: int, groups: int,
                 mid_attention: bool):
        super().__init__()
        rev = list(chs)[::-1]
        self.conv_in = nn.Conv2d(in_channels, rev[0], 3, padding=1)
        self.mid = MidBlock(rev[0], groups, mid_attention)
        self.up = nn.ModuleList(
            Level(c_in, c, num_res_blocks + 1, groups, Upsample(c) if l < len(rev) - 1 else None)
            for l, (c_in, c) in enumerate(zip([rev[0], *rev[:-1]], rev)))
        self.norm_out = nn.GroupNorm(groups, rev[-1], eps=EPS)
        self.conv_out = nn.Conv2d(rev[-1], out_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid(self.conv_in(z))  # (B, chs[-1], h, w)
        for level in self.up:
            h = level(h)  # (B, rev[l], 2^(l+1) h, 2^(l+1) w), the last level keeps its size
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, out_channels, f h, f w)


def _tile_starts(n: int, tile: int, stride: int) -> list[int]:
    return [*range(0, max(n - tile, 0), stride), max(n - tile, 0)]


def _ramp(m: int, overlap: int, like: Tensor) -> Tensor:
    """Blending weights [m] rising linearly over `overlap` samples at both ends (positive everywhere)."""
    u = torch.arange(m, device=like.device, dtype=like.dtype)
    return (torch.minimum(u + 0.5, m - u - 0.5) / max(overlap, 1)).clamp(max=1.0)


def tiled(fn: Callable[[Tensor], Tensor], x: Tensor, tile: int, overlap: int, scale: float) -> Tensor:
    """Apply `fn`, which scales spatial size by `scale`, to overlapping tile x tile windows of x [B, C, H, W]
    (stride tile - overlap; tile * scale and overlap * scale must be integers) and blend the outputs with
    weights that ramp linearly across each tile's edges, normalised by their sum."""
    H, W = x.shape[-2:]
    out = weight = None
    for i in _tile_starts(H, tile, tile - overlap):
        for j in _tile_starts(W, tile, tile - overlap):
            y = fn(x[..., i:i + tile, j:j + tile])  # (B, C', m, n)
            (m, n), o = y.shape[-2:], int(overlap * scale)
            w = _ramp(m, o, y)[:, None] * _ramp(n, o, y)  # (m, n)
            if out is None:
                out = y.new_zeros(*y.shape[:2], int(H * scale), int(W * scale))
                weight = y.new_zeros(out.shape[-2:])
            rows, cols = slice(int(i * scale), int(i * scale) + m), slice(int(j * scale), int(j * scale) + n)
            out[..., rows, cols] += y * w
            weight[rows, cols] += w
    return out / weight


class LatentAutoencoder(nn.Module):
    """Encoder -> quant_conv -> (regulariser) -> post_quant_conv -> Decoder, shared by the KL and VQ models.

    The encoder outputs `moments * latent_channels` channels, quant_conv maps them to `moments * z_channels`
    (KL: mean and logvar, moments = 2; VQ: one codebook-sized vector, moments = 1) and post_quant_conv maps
    z_channels back to latent_channels for the decoder."""

    def __init__(self, config: AutoencoderConfig, z_channels: int, moments: int):
        super().__init__()
        self.config = config
        c = config.latent_channels
        if not config.quant_conv and z_channels != c:
            raise ValueError(f"without quant_conv the codebook dim ({z_channels}) must equal latent_channels ({c})")
        chs = [config.channels * m for m in config.channel_mult]
        blocks = (chs, config.num_res_blocks, config.groups, config.mid_attention)
        self.encoder = Encoder(config.in_channels, moments * c, *blocks)
        self.quant_conv = nn.Conv2d(moments * c, moments * z_channels, 1) if config.quant_conv else nn.Identity()
        self.post_quant_conv = nn.Conv2d(z_channels, c, 1) if config.quant_conv else nn.Identity()
        self.decoder = Decoder(c, config.out_channels, *blocks)
        self.z_channels = z_channels

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.config.channel_mult) - 1)

    def _check(self, x: Tensor, channels: int, what: str, factor: int) -> None:
        if x.ndim != 4 or x.shape[1] != channels:
            raise ValueError(f"{what} must be [B, {channels}, H, W], got {tuple(x.shape)}")
        if x.shape[-2] % factor or x.shape[-1] % factor:
            raise ValueError(f"{what} size {tuple(x.shape[-2:])} is not divisible by the downsampling factor {factor}")

    def _encode(self, x: Tensor, tile_size: int | None) -> Tensor:
        """x [B, in, H, W] -> quant_conv(E(x)) [B, moments * z_channels, H / f, W / f], in tiles if asked."""
        f = self.downsample_factor
        self._check(x, self.config.in_channels, "image", f)
        if tile_size is None:
            return self.quant_conv(self.encoder(x))
        if tile_size % f:
            raise ValueError(f"tile_size {tile_size} is not divisible by the downsampling factor {f}")
        return tiled(lambda t: self._encode(t, None), x, tile_size, f * (tile_size // f // 4), 1 / f)

    def _decode(self, z: Tensor, tile_size: int | None) -> Tensor:
        """z [B, z_channels, h, w] -> D(post_quant_conv(z)) [B, out, f h, f w], in tiles if asked."""
        self._check(z, self.z_channels, "latent", 1)
        if tile_size is None:
            return self.decoder(self.post_quant_conv(z))
        return tiled(lambda t: self._decode(t, None), z, tile_size, tile_size // 4, self.downsample_factor)

    def scale(self, z: Tensor) -> Tensor:
        """Autoencoder latent -> diffusion latent: (z - shift) * scale."""
        return (z - self.config.shift_factor) * self.config.scaling_factor

    def unscale(self, z: Tensor) -> Tensor:
        """Diffusion latent -> autoencoder latent: z / scale + shift."""
        return z / self.config.scaling_factor + self.config.shift_factor


class AutoencoderKL(LatentAutoencoder):
    """KL-regularised autoencoder (LDM, Stable Diffusion): E(x) parametrises a diagonal Gaussian posterior."""

    model_type = "autoencoder_kl"
    config_class = AutoencoderConfig

    def __init__(self, config: AutoencoderConfig):
        super().__init__(config, config.latent_channels, moments=2)

    def encode(self, x: Tensor, tile_size: int | None = None) -> DiagonalGaussian:
        """Posterior q(z | x) for images x [B, in, H, W] (H, W divisible by f)."""
        return DiagonalGaussian(self._encode(x, tile_size))

    def decode(self, z: Tensor, tile_size: int | None = None) -> Tensor:
        """Latents z [B, c, h, w] -> images [B, out, f h, f w]."""
        return self._decode(z, tile_size)

    def forward(self, x: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, DiagonalGaussian]:
        """Reconstruction from a posterior sample, and the posterior (for the KL term)."""
        posterior = self.encode(x)
        return self.decode(posterior.sample(generator)), posterior

    def latent_moments(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(mean, std) of the posterior of images x, in autoencoder units (`scale` maps a sample to diffusion's)."""
        posterior = self.encode(x)
        return posterior.mean, posterior.std

    def to_latent(self, x: Tensor, generator: torch.Generator | None = None, tile_size: int | None = None) -> Tensor:
        """Diffusion latent of images: the posterior mean, or a posterior sample drawn with `generator` if given."""
        posterior = self.encode(x, tile_size)
        return self.scale(posterior.mode() if generator is None else posterior.sample(generator))

    def from_latent(self, z: Tensor, tile_size: int | None = None) -> Tensor:
        """Images from diffusion latents."""
        return self.decode(self.unscale(z), tile_size)


class VectorQuantizer(nn.Module):
    """Nearest-codebook-vector quantisation with the straight-through estimator (VQ-VAE, van den Oord 2017)."""

    def __init__(self, num_embeddings: int, dim: int, beta: float):
        super().__init__()
        self.beta = beta
        self.embedding = nn.Embedding(num_embeddings, dim)

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """z [B, e, h, w] -> (z_q with straight-through gradient, codebook + beta * commitment loss,
        indices [B, h, w])."""
        B, e, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, e)  # (B h w, e)
        indices = torch.cdist(flat, self.embedding.weight).argmin(dim=1)  # (B h w,)
        z_q = self.lookup(indices.view(B, h, w))  # (B, e, h, w)
        loss = F.mse_loss(z_q, z.detach()) + self.beta * F.mse_loss(z, z_q.detach())
        return z + (z_q - z).detach(), loss, indices.view(B, h, w)

    def lookup(self, indices: Tensor) -> Tensor:
        """Codebook vectors of indices [B, h, w] -> [B, e, h, w]."""
        return self.embedding(indices).permute(0, 3, 1, 2)


class VQAutoencoder(LatentAutoencoder):
    """VQ-regularised autoencoder (LDM VQ-f4 / f8): E(x) is snapped to the nearest codebook vector.

    Diffusion runs on the unquantised encoding (as in LDM); `from_latent` quantises before decoding."""

    model_type = "autoencoder_vq"
    config_class = VQAutoencoderConfig

    def __init__(self, config: VQAutoencoderConfig):
        super().__init__(config, config.embed_dim, moments=1)
        self.quantizer = VectorQuantizer(config.num_embeddings, config.embed_dim, config.beta)

    def encode(self, x: Tensor, tile_size: int | None = None) -> Tensor:
        """Images [B, in, H, W] -> unquantised encodings [B, embed_dim, H / f, W / f]."""
        return self._encode(x, tile_size)

    def quantize(self, h: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Encodings -> (quantised z_q, VQ loss, code indices [B, h, w])."""
        return self.quantizer(h)

    def decode(self, z_q: Tensor, tile_size: int | None = None) -> Tensor:
        """Quantised latents [B, embed_dim, h, w] -> images [B, out, f h, f w]."""
        return self._decode(z_q, tile_size)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(reconstruction, VQ loss, code indices)."""
        z_q, loss, indices = self.quantize(self.encode(x))
        return self.decode(z_q), loss, indices

    def latent_moments(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(encoding, 0): a VQ latent is deterministic; the same interface as the KL posterior's moments."""
        h = self.encode(x)
        return h, torch.zeros_like(h)

    def to_latent(self, x: Tensor, generator: torch.Generator | None = None, tile_size: int | None = None) -> Tensor:
        """Diffusion latent of images (deterministic; `generator` is accepted for a common signature)."""
        return self.scale(self.encode(x, tile_size))

    def from_latent(self, z: Tensor, tile_size: int | None = None) -> Tensor:
        """Images from diffusion latents, quantised first."""
        return self.decode(self.quantize(self.unscale(z))[0], tile_size)
