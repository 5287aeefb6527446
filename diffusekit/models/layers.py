"""Building blocks shared by the UNet, DiT, MM-DiT and autoencoder (SPEC §3, §4).

All attention goes through torch's scaled_dot_product_attention; nothing here synchronises with the
host or branches on tensor values, so the models compile with fullgraph=True.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def timestep_embedding(t: Tensor, dim: int, flip_sin_to_cos: bool = True, freq_shift: float = 0.0,
                       max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of (fractional) timesteps [B] -> [B, dim] (DDPM / Transformer).

    freqs_i = max_period^(-i / (dim/2 - freq_shift)); output [cos, sin] (flip_sin_to_cos) or [sin, cos]."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / (half - freq_shift))
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([args.cos(), args.sin()] if flip_sin_to_cos else [args.sin(), args.cos()], dim=-1)
    return F.pad(emb, (0, dim % 2))


class TimestepMLP(nn.Module):
    """Linear -> SiLU -> Linear applied to a sinusoidal (or any) embedding."""

    def __init__(self, in_dim: int, dim: int, out_dim: int | None = None):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, out_dim or dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


def attention(q: Tensor, k: Tensor, v: Tensor, heads: int, causal: bool = False) -> Tensor:
    """Multi-head attention on [B, L, H*D] projections -> [B, L, H*D] (`causal`: each token sees only those
    before it, as in CLIP's text transformer)."""
    B, L, _ = q.shape
    q, k, v = (z.unflatten(-1, (heads, -1)).transpose(1, 2) for z in (q, k, v))  # (B, H, L, D)
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal).transpose(1, 2).reshape(B, L, -1)


class Attention(nn.Module):
    """Self-attention (fused qkv) or, with `context_dim`, cross-attention (Q from x, K/V from context)."""

    def __init__(self, dim: int, heads: int, head_dim: int | None = None, context_dim: int | None = None,
                 bias: bool = False, out_bias: bool = True):
        super().__init__()
        inner = heads * (head_dim or dim // heads)
        self.heads = heads
        self.cross = context_dim is not None
        if self.cross:
            self.q = nn.Linear(dim, inner, bias=bias)
            self.kv = nn.Linear(context_dim, 2 * inner, bias=bias)
        else:
            self.qkv = nn.Linear(dim, 3 * inner, bias=bias)
        self.out = nn.Linear(inner, dim, bias=out_bias)

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        if self.cross:
            q, (k, v) = self.q(x), self.kv(context).chunk(2, dim=-1)
        else:
            q, k, v = self.qkv(x).chunk(3, dim=-1)
        return self.out(attention(q, k, v, self.heads))


class FeedForward(nn.Module):
    """Transformer MLP: GEGLU (SD) or Linear -> GELU(tanh) -> Linear (DiT, SD3)."""

    def __init__(self, dim: int, mult: float = 4.0, glu: bool = True, out_bias: bool = True):
        super().__init__()
        inner = int(dim * mult)
        self.glu = glu
        self.proj_in = nn.Linear(dim, 2 * inner if glu else inner)
        self.proj_out = nn.Linear(inner, dim, bias=out_bias)

    def forward(self, x: Tensor) -> Tensor:
        if self.glu:
            h, gate = self.proj_in(x).chunk(2, dim=-1)
            h = h * F.gelu(gate)
        else:
            h = F.gelu(self.proj_in(x), approximate="tanh")
        return self.proj_out(h)


class ResBlock(nn.Module):
    """GroupNorm -> SiLU -> conv, embedding added (or AdaGN scale/shift), GroupNorm -> SiLU -> dropout -> conv,
    plus a (1x1 or identity) skip. Without `emb_dim` it is the autoencoder's unconditioned block."""

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int | None = None, dropout: float = 0.0,
                 groups: int = 32, eps: float = 1e-5, scale_shift: bool = False):
        super().__init__()
        self.scale_shift = scale_shift
        self.norm1 = nn.GroupNorm(groups, in_ch, eps=eps)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb_proj = nn.Linear(emb_dim, out_ch * (2 if scale_shift else 1)) if emb_dim else None
        self.norm2 = nn.GroupNorm(groups, out_ch, eps=eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor | None = None) -> Tensor:
        # in-place SiLU and adds on fresh tensors: no (B, C, H, W) allocation each (autograd-safe)
        h = self.conv1(F.silu(self.norm1(x), inplace=True))
        if self.emb_proj is None:
            h = self.norm2(h)
        else:
            e = self.emb_proj(F.silu(emb))[:, :, None, None]
            if self.scale_shift:  # AdaGN: norm(h) (1 + scale) + shift
                scale, shift = e.chunk(2, dim=1)
                h = self.norm2(h) * (1 + scale) + shift
            else:
                h = self.norm2(h.add_(e))
        return self.conv2(self.dropout(F.silu(h, inplace=True))).add_(self.skip(x))


class Downsample(nn.Module):
    """Stride-2 3x3 conv; `asymmetric` pads (0, 1, 0, 1) as the LDM autoencoder does."""

    def __init__(self, ch: int, out_ch: int | None = None, asymmetric: bool = False):
        super().__init__()
        self.asymmetric = asymmetric
        self.conv = nn.Conv2d(ch, out_ch or ch, 3, stride=2, padding=0 if asymmetric else 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)) if self.asymmetric else x)


class Upsample(nn.Module):
    """Nearest x2 then 3x3 conv."""

    def __init__(self, ch: int, out_ch: int | None = None):
        super().__init__()
        self.conv = nn.Conv2d(ch, out_ch or ch, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class SpatialSelfAttention(nn.Module):
    """GroupNorm + single-block self-attention over the pixels of a feature map, with residual
    (the attention of the LDM autoencoder and of pixel UNets)."""

    def __init__(self, ch: int, heads: int = 1, groups: int = 32, eps: float = 1e-6):
        super().__init__()
        self.norm = nn.GroupNorm(groups, ch, eps=eps)
        self.attn = Attention(ch, heads, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        B, C, H, W = x.shape
        h = self.norm(x).flatten(2).transpose(1, 2)  # (B, HW, C)
        return x + self.attn(h).transpose(1, 2).reshape(B, C, H, W)


class LayoutEncoder(nn.Module):
    """Layouts of boxes -> cross-attention tokens (LDM's layout-to-image: layouts tokenised, through a transformer
    encoder trained with the denoiser). A layout [B, N, 5] holds (class, x0, y0, x1, y1) per box, coordinates in
    [0, 1] of the image's width / height, class -1 for no box (padding, and the whole of CFG's null layout). Each box
    becomes one token, its class embedding (a last row for "no box") plus a linear map of Fourier features of its
    corners, and `depth` pre-norm transformer blocks mix them -> [B, N, dim]. No positional embedding: a layout is
    a set, and permuting its boxes permutes the tokens."""

    def __init__(self, classes: int, dim: int, depth: int = 2, heads: int = 4, frequencies: int = 8):
        super().__init__()
        self.classes, self.frequencies = classes, frequencies
        self.class_embed = nn.Embedding(classes + 1, dim)
        self.box_embed = nn.Linear(8 * frequencies, dim)
        self.blocks = nn.ModuleList(nn.ModuleDict({"norm1": nn.LayerNorm(dim), "attn": Attention(dim, heads),
                                                   "norm2": nn.LayerNorm(dim), "ff": FeedForward(dim, glu=False)})
                                    for _ in range(depth))
        self.norm_out = nn.LayerNorm(dim)

    def forward(self, layout: Tensor) -> Tensor:
        dtype = self.box_embed.weight.dtype
        cls = torch.where(layout[..., 0] < 0, self.classes, layout[..., 0]).long()  # (B, N)
        freqs = 2 * math.pi * 2.0 ** torch.arange(self.frequencies, device=layout.device)
        angles = layout[..., 1:, None].float() * freqs  # (B, N, 4, F)
        fourier = torch.cat([angles.sin(), angles.cos()], dim=-1).flatten(-2).to(dtype)
        h = self.class_embed(cls) + self.box_embed(fourier) * (cls < self.classes)[..., None]
        for b in self.blocks:
            h = h + b["attn"](b["norm1"](h))
            h = h + b["ff"](b["norm2"](h))
        return self.norm_out(h)
