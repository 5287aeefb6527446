"""MM-DiT: the multimodal diffusion transformer of Stable Diffusion 3 (Esser et al. 2024; SPEC §3).

Latent patches (+ positions cropped from an M x M table) and text tokens (projected to the model width)
keep separate weights (adaLN, qkv, QK norm, output, MLP) and meet in one attention over their
concatenation in every block; c = timestep embedding + pooled-text embedding drives every adaLN. The
last block is `pre_only` on the text side (its text output is unused). For rectified flow, t is in the
network's units (SD3 passes sigma * 1000).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch
from torch import Tensor, nn

from .dit import (FREQ_DIM, DiTBlock, FinalLayer, check_input, check_width, init_weights, sincos_2d,
                  unpatchify)
from .layers import TimestepMLP, attention, timestep_embedding

QK_NORMS = (None, "rms_norm")


class JointBlock(nn.Module):
    """Two adaLN-Zero blocks, image (x) and text (context), joined in one attention over [x; context]."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, qk_norm: bool, pre_only: bool):
        super().__init__()
        self.heads = heads
        self.x_block = DiTBlock(dim, heads, mlp_ratio, qk_norm)
        self.context_block = DiTBlock(dim, heads, mlp_ratio, qk_norm, pre_only=pre_only)

    def forward(self, x: Tensor, context: Tensor, c: Tensor) -> tuple[Tensor, Tensor | None]:
        qkv_x, rest_x = self.x_block.pre_attention(x, c)  # (B, N, D) each
        qkv_c, rest_c = self.context_block.pre_attention(context, c)  # (B, L, D) each
        q, k, v = (torch.cat(pair, dim=1) for pair in zip(qkv_x, qkv_c))  # (B, N + L, D)
        a_x, a_c = attention(q, k, v, self.heads).split([x.shape[1], context.shape[1]], dim=1)
        x = self.x_block.post_attention(x, a_x, rest_x)
        if self.context_block.pre_only:
            return x, None
        return x, self.context_block.post_attention(context, a_c, rest_c)


@dataclass
class MMDiTConfig:
    """MM-DiT sizes (defaults: SD3 medium). `sample_size` is the training latent size; it only sets the
    scale of the initial sin-cos position table of pos_embed_max_size^2 entries (loaded from checkpoints)."""

    sample_size: int = 128
    patch_size: int = 2
    in_channels: int = 16
    out_channels: int | None = None
    hidden_size: int = 1536
    depth: int = 24
    num_heads: int = 24
    mlp_ratio: float = 4.0
    context_dim: int = 4096
    pooled_dim: int = 2048
    pos_embed_max_size: int = 192
    qk_norm: str | None = None

    def __post_init__(self):
        check_width(self.hidden_size, self.num_heads)
        if self.qk_norm not in QK_NORMS:
            raise ValueError(f"qk_norm must be one of {QK_NORMS}, got {self.qk_norm!r}")


class MMDiT(nn.Module):
    """forward(x, t, context, pooled) -> [B, C_out, H, W] (velocity for SD3)."""

    model_type = "mmdit"
    config_class = MMDiTConfig

    def __init__(self, config: MMDiTConfig):
        super().__init__()
        self.config = cfg = config
        D, p, M = cfg.hidden_size, cfg.patch_size, cfg.pos_embed_max_size
        self.x_embedder = nn.Conv2d(cfg.in_channels, D, p, stride=p)
        table = sincos_2d(D, M, M, scale=cfg.sample_size // p / M)  # SD3's initial table
        self.register_buffer("pos_embed", table.float()[None])  # (1, M*M, D), stored in checkpoints
        self.t_embedder = TimestepMLP(FREQ_DIM, D)
        self.y_embedder = TimestepMLP(cfg.pooled_dim, D)
        self.context_embedder = nn.Linear(cfg.context_dim, D)
        self.joint_blocks = nn.ModuleList(
            JointBlock(D, cfg.num_heads, cfg.mlp_ratio, cfg.qk_norm is not None, pre_only=i == cfg.depth - 1)
            for i in range(cfg.depth))
        self.final_layer = FinalLayer(D, p, cfg.out_channels or cfg.in_channels)
        init_weights(self)

    @property
    def downsample_factor(self) -> int:
        return self.config.patch_size

    @property
    def cond_keys(self) -> tuple[str, ...]:
        """The condition keywords forward takes."""
        return ("context", "pooled")

    null_class = None  # the null condition is the empty prompt

    def cropped_pos_embed(self, h: int, w: int) -> Tensor:
        """The centre h x w crop of the M x M position table -> [1, h*w, D] (SD3)."""
        M = self.config.pos_embed_max_size
        if h > M or w > M:
            raise ValueError(f"token grid {h}x{w} exceeds pos_embed_max_size {M}")
        top, left = (M - h) // 2, (M - w) // 2
        return self.pos_embed.unflatten(1, (M, M))[:, top:top + h, left:left + w].flatten(1, 2)

    def check_condition(self, context: Tensor | None, pooled: Tensor | None, batch: int) -> None:
        """Raise ValueError unless context is [B, L, context_dim] and pooled is [B, pooled_dim]."""
        cfg = self.config
        if context is None or context.ndim != 3 or context.shape[0] != batch or context.shape[2] != cfg.context_dim:
            got = None if context is None else tuple(context.shape)
            raise ValueError(f"MM-DiT needs context of shape [{batch}, L, {cfg.context_dim}], got {got}")
        if pooled is None or pooled.shape != (batch, cfg.pooled_dim):
            got = None if pooled is None else tuple(pooled.shape)
            raise ValueError(f"MM-DiT needs pooled of shape [{batch}, {cfg.pooled_dim}], got {got}")

    def forward(self, x: Tensor, t: Tensor, context: Tensor | None = None, pooled: Tensor | None = None) -> Tensor:
        """x [B, C, H, W], t [B] (sigma * 1000 for SD3), context [B, L, d_text], pooled [B, d_pool]."""
        t = check_input(x, t, self.config.in_channels, self.config.patch_size)
        self.check_condition(context, pooled, x.shape[0])
        x = self.x_embedder(x)  # (B, D, h, w)
        h, w = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2) + self.cropped_pos_embed(h, w).to(x.dtype)  # (B, h*w, D)
        c = self.t_embedder(timestep_embedding(t, FREQ_DIM).to(x.dtype)) + self.y_embedder(pooled)  # (B, D)
        context = self.context_embedder(context)  # (B, L, D)
        for block in self.joint_blocks:
            x, context = block(x, context, c)  # (B, h*w, D), (B, L, D)
        return unpatchify(self.final_layer(x, c), h, w, self.config.patch_size)  # (B, C_out, H, W)


MMDIT_CONFIGS: dict[str, Callable[..., MMDiTConfig]] = {
    "SD3-medium": partial(MMDiTConfig, depth=24, hidden_size=1536, num_heads=24),
    "SD3.5-large": partial(MMDiTConfig, depth=38, hidden_size=2432, num_heads=38, qk_norm="rms_norm"),
}
