"""DiT: a diffusion transformer with adaLN-Zero blocks (Peebles & Xie 2023; SPEC §3).

x [B, C, H, W] -> p x p patches -> tokens + 2-D sin-cos positions -> adaLN-Zero blocks driven by
c = time embedding + label embedding -> final adaLN + linear -> unpatchify -> [B, C (2C), H, W].
Positions are computed in forward for the input's token grid, so the model runs at any size divisible
by p; with `interpolate_positions` set, a grid larger than the trained one (input_size / p) gets its
positions scaled to span the trained range instead of extrapolating past it (position interpolation,
Chen et al. 2023, as for length extrapolation in language models). The pieces (blocks, final layer,
positions) are shared with MM-DiT (mmdit.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .layers import FeedForward, TimestepMLP, attention, timestep_embedding

FREQ_DIM = 256  # width of the sinusoidal timestep features fed to the timestep MLP


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN: x (1 + scale) + shift, per-sample [B, D] shift and scale broadcast over the tokens of x [B, T, D]."""
    return x * (1 + scale[:, None]) + shift[:, None]


def sincos_2d(dim: int, h: int, w: int, scale: float | tuple[float, float] = 1.0,
              device: torch.device | None = None) -> Tensor:
    """2-D sin-cos positions of an h x w token grid -> [h*w, dim] float64 (MAE, DiT).

    The first half of each vector encodes the column, the second the row, each as [sin, cos] of
    (index * scale) at frequencies 10000^(-i / (dim/4)); tokens are in row-major order. `scale` is one
    factor or (row, column) factors."""
    omega = 10000.0 ** -(torch.arange(dim // 4, dtype=torch.float64, device=device) / (dim / 4))
    row_scale, col_scale = scale if isinstance(scale, tuple) else (scale, scale)

    def embed(n: int, step: float) -> Tensor:  # (n, dim/2)
        args = (torch.arange(n, dtype=torch.float64, device=device) * step)[:, None] * omega
        return torch.cat([args.sin(), args.cos()], dim=-1)

    cols, rows = embed(w, col_scale), embed(h, row_scale)
    return torch.cat([cols[None].expand(h, -1, -1), rows[:, None].expand(-1, w, -1)], dim=-1).reshape(h * w, dim)


def check_input(x: Tensor, t: Tensor, channels: int, p: int) -> Tensor:
    """Raise ValueError unless x is [B, channels, H, W] with H, W divisible by p and t holds B timesteps
    (or one, broadcast); return t as [B]."""
    if x.ndim != 4 or x.shape[1] != channels:
        raise ValueError(f"expected x of shape [B, {channels}, H, W], got {tuple(x.shape)}")
    if x.shape[2] % p or x.shape[3] % p:
        raise ValueError(f"image size {tuple(x.shape[2:])} is not divisible by the patch size {p}")
    if t.numel() not in (1, x.shape[0]):
        raise ValueError(f"t has {t.numel()} timesteps for a batch of {x.shape[0]}")
    return t.reshape(-1).expand(x.shape[0])


def check_width(dim: int, heads: int) -> None:
    """ValueError unless the width splits into heads and into the four sin-cos quarters of the positions."""
    if dim % heads or dim % 4:
        raise ValueError(f"hidden_size {dim} must be divisible by num_heads ({heads}) and by 4")


def unpatchify(x: Tensor, h: int, w: int, p: int) -> Tensor:
    """Tokens [B, h*w, p*p*C] -> image [B, C, h*p, w*p]."""
    x = x.reshape(x.shape[0], h, w, p, p, -1)
    return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], -1, h * p, w * p)


class DiTBlock(nn.Module):
    """adaLN-Zero block: x += gate_msa Attn(modulate(LN x)); x += gate_mlp MLP(modulate(LN x)).

    Split into pre_attention / post_attention so that MM-DiT can join two of them (text and image
    streams) in one attention; `pre_only` keeps only the part before attention (SD3's last text block),
    `qk_norm` adds a per-head RMSNorm of queries and keys."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, qk_norm: bool = False,
                 pre_only: bool = False, mlp_norm_eps: float = 1e-6):
        super().__init__()
        self.heads, self.pre_only = heads, pre_only
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = nn.RMSNorm(dim // heads, eps=1e-6) if qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(dim // heads, eps=1e-6) if qk_norm else nn.Identity()
        self.adaLN_modulation = nn.Linear(dim, (2 if pre_only else 6) * dim)
        if not pre_only:
            self.proj = nn.Linear(dim, dim)
            self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=mlp_norm_eps)
            self.mlp = FeedForward(dim, mlp_ratio, glu=False)

    def pre_attention(self, x: Tensor, c: Tensor) -> tuple[tuple[Tensor, Tensor, Tensor], list[Tensor]]:
        """Queries, keys, values [B, T, D] of the modulated tokens, and the modulations left for post_attention."""
        shift_msa, scale_msa, *rest = self.adaLN_modulation(F.silu(c)).chunk(2 if self.pre_only else 6, dim=1)
        q, k, v = self.qkv(modulate(self.norm1(x), shift_msa, scale_msa)).chunk(3, dim=-1)  # (B, T, D) each
        q = self.q_norm(q.unflatten(-1, (self.heads, -1))).flatten(-2)
        k = self.k_norm(k.unflatten(-1, (self.heads, -1))).flatten(-2)
        return (q, k, v), rest

    def post_attention(self, x: Tensor, a: Tensor, rest: list[Tensor]) -> Tensor:
        """Gated residual of the attention output a [B, T, D], then the gated, modulated MLP."""
        gate_msa, shift_mlp, scale_mlp, gate_mlp = rest
        x = x + gate_msa[:, None] * self.proj(a)
        return x + gate_mlp[:, None] * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        (q, k, v), rest = self.pre_attention(x, c)
        return self.post_attention(x, attention(q, k, v, self.heads), rest)  # (B, T, D)


class FinalLayer(nn.Module):
    """Final adaLN (shift, scale from c) + linear to p*p*C_out values per token."""

    def __init__(self, dim: int, p: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.adaLN_modulation = nn.Linear(dim, 2 * dim)
        self.linear = nn.Linear(dim, p * p * out_channels)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(F.silu(c)).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))  # (B, T, p*p*C_out)


def init_weights(model: nn.Module) -> None:
    """DiT's initialisation: Xavier-uniform linears and patch projection, zero biases, N(0, 0.02) label
    table and timestep MLP; adaLN-Zero: every modulation and the final linear start at zero."""
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)
    nn.init.xavier_uniform_(model.x_embedder.weight.view(model.x_embedder.out_channels, -1))
    nn.init.zeros_(model.x_embedder.bias)
    nn.init.normal_(model.t_embedder.linear_1.weight, std=0.02)
    nn.init.normal_(model.t_embedder.linear_2.weight, std=0.02)
    for name, m in model.named_modules():
        if name.endswith("adaLN_modulation") or name == "final_layer.linear":
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)


@dataclass
class DiTConfig:
    """DiT sizes. `input_size` is the training latent size (informative: any size divisible by p runs).
    `class_dropout_prob` > 0 adds the null-class row (label `num_classes`) used for CFG; labels are
    dropped by the training loop, not inside the model. num_classes = 0 makes it unconditional.
    `freq_shift` and `mlp_norm_eps` are 0 and 1e-6 in DiT; diffusers' port uses 1 and its norm_eps."""

    input_size: int = 32
    patch_size: int = 2
    in_channels: int = 4
    out_channels: int | None = None
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    num_classes: int = 1000
    class_dropout_prob: float = 0.1
    learned_sigma: bool = True
    freq_shift: float = 0.0
    mlp_norm_eps: float = 1e-6

    def __post_init__(self):
        check_width(self.hidden_size, self.num_heads)


class DiT(nn.Module):
    """Diffusion transformer: forward(x, t, class_labels) -> eps (and the variance interpolation v if
    learned_sigma) [B, C (2C), H, W]."""

    model_type = "dit"
    config_class = DiTConfig

    def __init__(self, config: DiTConfig):
        super().__init__()
        self.config = cfg = config
        D, p = cfg.hidden_size, cfg.patch_size
        self.out_channels = (cfg.out_channels or cfg.in_channels) * (2 if cfg.learned_sigma else 1)
        self.x_embedder = nn.Conv2d(cfg.in_channels, D, p, stride=p)
        self.t_embedder = TimestepMLP(FREQ_DIM, D)
        self.y_embedder = nn.Embedding(cfg.num_classes + (cfg.class_dropout_prob > 0), D) if cfg.num_classes else None
        self.blocks = nn.ModuleList(DiTBlock(D, cfg.num_heads, cfg.mlp_ratio, mlp_norm_eps=cfg.mlp_norm_eps)
                                    for _ in range(cfg.depth))
        self.final_layer = FinalLayer(D, p, self.out_channels)
        self.interpolate_positions = False
        init_weights(self)

    def position_scale(self, h: int, w: int) -> tuple[float, float]:
        """(row, column) factors of the token indices: 1, or trained grid / grid along each axis larger than
        the trained grid when `interpolate_positions` is set."""
        n = self.config.input_size // self.config.patch_size
        if not self.interpolate_positions:
            return 1.0, 1.0
        return min(1.0, n / h), min(1.0, n / w)

    @property
    def downsample_factor(self) -> int:
        return self.config.patch_size

    @property
    def cond_keys(self) -> tuple[str, ...]:
        """The condition keywords forward takes."""
        return ("class_labels",) if self.config.num_classes else ()

    @property
    def null_class(self) -> int | None:
        """The label whose embedding is the null condition of classifier-free guidance (None if absent)."""
        cfg = self.config
        return cfg.num_classes if cfg.num_classes and cfg.class_dropout_prob > 0 else None

    def embed_condition(self, t: Tensor, class_labels: Tensor | None, batch: int, dtype: torch.dtype) -> Tensor:
        """c = time embedding + label embedding [B, D]."""
        c = self.t_embedder(timestep_embedding(t, FREQ_DIM, freq_shift=self.config.freq_shift).to(dtype))
        if (class_labels is None) != (self.y_embedder is None):
            raise ValueError("this DiT is class-conditional: pass class_labels [B]" if class_labels is None
                             else "this DiT is unconditional (num_classes = 0) but got class_labels")
        if class_labels is None:
            return c
        if class_labels.shape != (batch,):
            raise ValueError(f"class_labels must have shape [{batch}], got {tuple(class_labels.shape)}")
        return c + self.y_embedder(class_labels)

    def forward(self, x: Tensor, t: Tensor, class_labels: Tensor | None = None) -> Tensor:
        """x [B, C, H, W], t [B] (fractional) timesteps, class_labels [B] (label num_classes: the null class)."""
        p, D = self.config.patch_size, self.config.hidden_size
        t = check_input(x, t, self.config.in_channels, p)
        c = self.embed_condition(t, class_labels, x.shape[0], x.dtype)  # (B, D)
        x = self.x_embedder(x)  # (B, D, h, w)
        h, w = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2) + sincos_2d(D, h, w, self.position_scale(h, w), x.device).to(x.dtype)
        for block in self.blocks:
            x = block(x, c)  # (B, h*w, D)
        return unpatchify(self.final_layer(x, c), h, w, p)  # (B, C_out, H, W)


DIT_SIZES = {"XL": (28, 1152, 16), "L": (24, 1024, 16), "B": (12, 768, 12), "S": (12, 384, 6)}  # depth, D, heads
DIT_CONFIGS: dict[str, Callable[..., DiTConfig]] = {
    f"DiT-{name}/{p}": partial(DiTConfig, depth=depth, hidden_size=D, num_heads=heads, patch_size=p)
    for name, (depth, D, heads) in DIT_SIZES.items() for p in (2, 4, 8)
}
