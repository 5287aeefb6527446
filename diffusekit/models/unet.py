"""UNet denoiser: DDPM / ADM pixel UNets and the Stable Diffusion 1.x / 2.x / SDXL latent UNets (SPEC §3, §4).

conv_in -> input blocks (ResBlock [+ attention], Downsample at the end of each level but the last) -> middle
(ResBlock, attention, ResBlock) -> output blocks (num_res_blocks + 1 per level, each taking one skip by
concatenation, Upsample at the end of each level but the first) -> GroupNorm, SiLU, conv_out. The layout follows
LDM's input_blocks / middle_block / output_blocks, so a skip is pushed after every input block and popped by
every output block. Attention is a `SpatialTransformer` (self-attention, cross-attention to `context`, GEGLU MLP)
when the config has a `context_dim`, else single-block spatial self-attention. Conditions are summed into the
time embedding: class labels (optionally with a null row for CFG) and SDXL's pooled text + micro-conditioning.
A layout-to-image UNet (`layout_classes`) encodes its `layout` of boxes into the cross-attention context itself.
`DeepCache` reuses the blocks below a skip connection (`UNet.deep`) from one sampling step to the next.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import layers

PerLevel = int | tuple[int, ...]


@dataclass
class UNetConfig:
    in_channels: int = 4                     # x plus the `concat` channels (9 for SD inpainting)
    out_channels: int = 4
    channels: int = 320                      # base width; level i has channels * channel_mult[i]
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attention_levels: tuple[int, ...] = (0, 1, 2)
    mid_attention: bool = True
    num_heads: PerLevel = 8                  # heads per level (SD 1.x: 8 everywhere); unused if head_dim is set
    head_dim: int | None = None              # channels per head instead (SD 2.x, SDXL: 64)
    context_dim: int | None = 768            # cross-attention width of the text tokens; None or 0: self-attention only
    transformer_depth: PerLevel = 1          # transformer blocks per attention, per level (SDXL: 1, 2, 10)
    dropout: float = 0.0
    norm_groups: int = 32
    norm_eps: float = 1e-5
    scale_shift: bool = False                # AdaGN in the ResBlocks
    asymmetric_downsample: bool = False      # pad (0, 1, 0, 1) + unpadded conv (the original DDPM)
    layout_classes: int = 0                  # layout-to-image: box classes of `layout`, encoded as the context
    layout_boxes: int = 8                    # the most boxes a layout holds
    layout_depth: int = 2                    # transformer blocks of the layout encoder (its width: context_dim)
    num_classes: int | None = None           # class-label embedding added to the time embedding
    null_class: bool = False                 # one more row, index num_classes, as the CFG null label
    addition_time_embed_dim: int | None = None  # SDXL: sinusoid width per time id (256)
    addition_embed_dim: int | None = None    # SDXL: MLP input = pooled width + n_time_ids * addition_time_embed_dim
    learned_sigma: bool = False              # output 2 * out_channels (eps, variance interpolation v)
    flip_sin_to_cos: bool = True
    freq_shift: float = 0.0

    def __post_init__(self):
        for f in ("channel_mult", "attention_levels", "num_heads", "transformer_depth"):  # JSON gives lists back
            if isinstance(getattr(self, f), list):
                setattr(self, f, tuple(getattr(self, f)))


def per_level(value: PerLevel, level: int) -> int:
    return value if isinstance(value, int) else value[level]


def sd15_unet_config() -> UNetConfig:
    """Stable Diffusion 1.x (859,520,964 parameters)."""
    return UNetConfig()


def sdxl_unet_config() -> UNetConfig:
    """SDXL base (2,567,463,684 parameters): pooled text (1280) + 6 time ids x 256 features."""
    return UNetConfig(channel_mult=(1, 2, 4), attention_levels=(1, 2), head_dim=64, context_dim=2048,
                      transformer_depth=(1, 2, 10), addition_time_embed_dim=256, addition_embed_dim=2816)


class TransformerBlock(nn.Module):
    """LayerNorm + self-attention, LayerNorm + cross-attention to the text tokens, LayerNorm + GEGLU MLP."""

    def __init__(self, dim: int, heads: int, context_dim: int):
        super().__init__()
        self.norm1, self.attn1 = nn.LayerNorm(dim), layers.Attention(dim, heads)
        self.norm2, self.attn2 = nn.LayerNorm(dim), layers.Attention(dim, heads, context_dim=context_dim)
        self.norm3, self.ff = nn.LayerNorm(dim), layers.FeedForward(dim)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """GroupNorm, proj_in, transformer blocks over the pixels, proj_out, residual (LDM). The projections are
    linear maps on tokens; SD 1.x's 1x1 convs are the same maps (the converters reshape them)."""

    def __init__(self, ch: int, heads: int, depth: int, context_dim: int, groups: int):
        super().__init__()
        self.norm = nn.GroupNorm(groups, ch, eps=1e-6)
        self.proj_in = nn.Linear(ch, ch)
        self.blocks = nn.ModuleList(TransformerBlock(ch, heads, context_dim) for _ in range(depth))
        self.proj_out = nn.Linear(ch, ch)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        B, C, H, W = x.shape
        h = self.proj_in(self.norm(x).flatten(2).transpose(1, 2))  # (B, HW, C)
        for block in self.blocks:
            h = block(h, context)
        return x + self.proj_out(h).transpose(1, 2).reshape(B, C, H, W)


class SelfAttention2d(layers.SpatialSelfAttention):
    """Spatial self-attention with the (x, context) signature of SpatialTransformer; context is unused."""

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        return super().forward(x)


class Stage(nn.Module):
    """One entry of the input / middle / output lists: ResBlock, attention, resampling (each optional)."""

    def __init__(self, res: nn.Module | None = None, attn: nn.Module | None = None, resample: nn.Module | None = None):
        super().__init__()
        self.res, self.attn, self.resample = res, attn, resample

    def forward(self, x: Tensor, emb: Tensor, context: Tensor | None) -> Tensor:
        if self.res is not None:
            x = self.res(x, emb)
        if self.attn is not None:
            x = self.attn(x, context)
        if self.resample is not None:
            x = self.resample(x)
        return x


class UNet(nn.Module):
    """forward(x, t, context=None, class_labels=None, pooled=None, time_ids=None, concat=None, layout=None) -> eps
    (or the parametrization it was trained for), [B, out_channels (x2 if learned_sigma), H, W]; a `DeepCache`
    passes itself as `cache` to supply the deep features."""

    model_type = "unet"
    config_class = UNetConfig

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = c = config
        emb_dim, last = 4 * c.channels, len(c.channel_mult) - 1
        self.time_embed = layers.TimestepMLP(c.channels, emb_dim)
        self.class_embed = nn.Embedding(c.num_classes + c.null_class, emb_dim) if c.num_classes else None
        self.add_embed = layers.TimestepMLP(c.addition_embed_dim, emb_dim) if c.addition_embed_dim else None
        if c.layout_classes and not c.context_dim:
            raise ValueError("a layout UNet (layout_classes) needs context_dim, its layout tokens' width")
        self.layout_encoder = layers.LayoutEncoder(c.layout_classes, c.context_dim, c.layout_depth,
                                                   max(1, c.context_dim // 32)) if c.layout_classes else None
        self.conv_in = nn.Conv2d(c.in_channels, c.channels, 3, padding=1)

        ch, skips = c.channels, [c.channels]
        self.input_blocks = nn.ModuleList()
        for level, mult in enumerate(c.channel_mult):
            out, attn = mult * c.channels, level in c.attention_levels
            for _ in range(c.num_res_blocks):
                self.input_blocks.append(Stage(self._res(ch, out), self._attn(out, level) if attn else None))
                ch = out
                skips.append(ch)
            if level < last:
                self.input_blocks.append(Stage(resample=layers.Downsample(ch, asymmetric=c.asymmetric_downsample)))
                skips.append(ch)
        mid_attn = self._attn(ch, last) if c.mid_attention else None
        self.middle = nn.ModuleList([Stage(self._res(ch, ch), mid_attn), Stage(self._res(ch, ch))])
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(c.channel_mult))):
            out, attn = mult * c.channels, level in c.attention_levels
            for i in range(c.num_res_blocks + 1):
                up = layers.Upsample(out) if level > 0 and i == c.num_res_blocks else None
                res = self._res(ch + skips.pop(), out)
                self.output_blocks.append(Stage(res, self._attn(out, level) if attn else None, up))
                ch = out
        self.norm_out = nn.GroupNorm(c.norm_groups, ch, eps=c.norm_eps)
        self.conv_out = nn.Conv2d(ch, c.out_channels * (2 if c.learned_sigma else 1), 3, padding=1)

    def _res(self, in_ch: int, out_ch: int) -> layers.ResBlock:
        c = self.config
        return layers.ResBlock(in_ch, out_ch, 4 * c.channels, c.dropout, c.norm_groups, c.norm_eps, c.scale_shift)

    def _attn(self, ch: int, level: int) -> nn.Module:
        c = self.config
        heads = ch // c.head_dim if c.head_dim else per_level(c.num_heads, level)
        if not c.context_dim:
            return SelfAttention2d(ch, heads, c.norm_groups, c.norm_eps)
        return SpatialTransformer(ch, heads, per_level(c.transformer_depth, level), c.context_dim, c.norm_groups)

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.config.channel_mult) - 1)

    @property
    def cond_keys(self) -> tuple[str, ...]:
        """The condition keywords forward takes (besides `concat`, which task pipelines supply)."""
        keys = (("layout",) if self.layout_encoder is not None else ("context",)) if self.uses_context else ()
        keys += ("class_labels",) if self.class_embed is not None else ()
        return keys + (("pooled", "time_ids") if self.add_embed is not None else ())

    @property
    def null_class(self) -> int | None:
        """The label of the classifier-free-guidance null embedding (None without one)."""
        c = self.config
        return c.num_classes if c.num_classes and c.null_class else None

    @property
    def uses_context(self) -> bool:
        c = self.config
        return bool(c.context_dim) and (c.mid_attention or len(c.attention_levels) > 0)

    def forward(self, x: Tensor, t: Tensor | float, context: Tensor | None = None, class_labels: Tensor | None = None,
                pooled: Tensor | None = None, time_ids: Tensor | None = None, concat: Tensor | None = None,
                layout: Tensor | None = None, cache: "DeepCache | None" = None) -> Tensor:
        if concat is not None:
            x = torch.cat([x, concat.to(x.dtype)], dim=1)  # (B, in_channels, H, W)
        if (self.layout_encoder is None) != (layout is None):
            raise ValueError(f"this UNet needs a `layout` [B, N <= {self.config.layout_boxes}, 5] of boxes"
                             if layout is None else "this UNet takes no `layout` (layout_classes is not set)")
        if layout is not None:
            if layout.ndim != 3 or layout.shape[-1] != 5 or layout.shape[1] > self.config.layout_boxes:
                raise ValueError(f"layout must be [B, N <= {self.config.layout_boxes}, 5] boxes (class, x0, y0, x1, "
                                 f"y1), got {tuple(layout.shape)}")
            context = self.layout_encoder(layout)
        self._check(x, context, class_labels, pooled, time_ids)
        emb = self.embed(x, t, class_labels, pooled, time_ids)  # (B, 4 * channels)
        context = context.to(x.dtype) if context is not None else None
        depth = len(self.input_blocks) if cache is None else cache.depth
        h = self.conv_in(x)
        hs = [h]
        for block in self.input_blocks[:depth]:
            h = block(h, emb, context)
            hs.append(h)
        h = self.deep(h, emb, context, depth) if cache is None else cache.deep(h, emb, context, tuple(x.shape))
        for block in self.output_blocks[-len(hs):]:
            h = block(torch.cat([h, hs.pop()], dim=1), emb, context)
        return self.conv_out(F.silu(self.norm_out(h), inplace=True))

    def deep(self, h: Tensor, emb: Tensor, context: Tensor | None, depth: int) -> Tensor:
        """The blocks below the depth-th skip connection: input blocks depth.., the middle, and the output blocks
        that take their skips; h is the depth-th input block's output (conv_in's for depth 0)."""
        hs = []
        for block in self.input_blocks[depth:]:
            h = block(h, emb, context)
            hs.append(h)
        for block in self.middle:
            h = block(h, emb, context)
        for block in self.output_blocks[:len(hs)]:
            h = block(torch.cat([h, hs.pop()], dim=1), emb, context)
        return h

    def embed(self, x: Tensor, t: Tensor | float, class_labels: Tensor | None, pooled: Tensor | None,
              time_ids: Tensor | None) -> Tensor:
        """Time embedding plus the class-label and SDXL additional embeddings, [B, 4 * channels]."""
        c, B = self.config, x.shape[0]
        t = torch.as_tensor(t, device=x.device).reshape(-1).expand(B)
        emb = self.time_embed(layers.timestep_embedding(t, c.channels, c.flip_sin_to_cos, c.freq_shift).to(x.dtype))
        if self.class_embed is not None:
            emb = emb + self.class_embed(class_labels)
        if self.add_embed is not None:
            d = c.addition_time_embed_dim
            fourier = layers.timestep_embedding(time_ids.flatten(), d, c.flip_sin_to_cos, c.freq_shift).reshape(B, -1)
            emb = emb + self.add_embed(torch.cat([pooled.to(x.dtype), fourier.to(x.dtype)], dim=-1))
        return emb

    def _check(self, x: Tensor, context: Tensor | None, class_labels: Tensor | None, pooled: Tensor | None,
               time_ids: Tensor | None) -> None:
        """Raise ValueError for inputs that do not fit the config (shapes only: no host-device sync)."""
        c, f = self.config, self.downsample_factor
        if x.ndim != 4 or x.shape[1] != c.in_channels:
            raise ValueError(f"UNet expects [B, {c.in_channels}, H, W] (x and concat together), got {tuple(x.shape)}")
        if x.shape[2] % f or x.shape[3] % f:
            raise ValueError(f"image size {tuple(x.shape[2:])} is not divisible by the UNet's factor {f}")
        if self.uses_context != (context is not None):
            raise ValueError("this UNet needs `context` [B, L, d] text tokens" if self.uses_context
                             else "this UNet takes no `context` (no cross-attention)")
        if context is not None and (context.ndim != 3 or context.shape[-1] != c.context_dim):
            raise ValueError(f"context must be [B, L, {c.context_dim}], got {tuple(context.shape)}")
        if (self.class_embed is None) != (class_labels is None):
            raise ValueError("this UNet needs `class_labels` [B]" if class_labels is None
                             else "this UNet takes no `class_labels` (num_classes is not set)")
        if (self.add_embed is None) != (pooled is None) or (pooled is None) != (time_ids is None):
            raise ValueError("this UNet needs `pooled` [B, d] and `time_ids` [B, n]" if self.add_embed is not None
                             else "this UNet takes no `pooled` / `time_ids` (addition_embed_dim is not set)")
        width = None if pooled is None else pooled.shape[-1] + time_ids.shape[-1] * c.addition_time_embed_dim
        if width != c.addition_embed_dim:
            raise ValueError(f"pooled {tuple(pooled.shape)} and time_ids {tuple(time_ids.shape)} do not give the "
                             f"{c.addition_embed_dim} = pooled + n_ids * {c.addition_time_embed_dim} features expected")


class DeepCache(nn.Module):
    """DeepCache (Ma et al. 2024): a UNet whose deep features change slowly from step to step, so they are computed
    on every `interval`-th call and reused on the calls between, while the blocks above the `depth`-th skip
    connection (conv_in, the first `depth` input blocks, the last depth + 1 output blocks) run on every call.
    Calls are counted per input shape, so CFG's doubled batch, Upsample Guidance's low-resolution call and a
    batch that halves when CFG stops each keep their own features. interval 1 is the plain UNet; one instance
    serves one sampling run (`reset` starts another)."""

    def __init__(self, unet: UNet, interval: int, depth: int = 1):
        super().__init__()
        if not isinstance(unet, UNet):
            raise ValueError(f"DeepCache needs a UNet; this model's network is a {type(unet).__name__}")
        if interval < 1 or not 0 <= depth <= len(unet.input_blocks):
            raise ValueError(f"DeepCache needs interval >= 1 and 0 <= depth <= {len(unet.input_blocks)} (the UNet's "
                             f"input blocks), got interval {interval}, depth {depth}")
        self.unet, self.config, self.interval, self.depth = unet, unet.config, interval, depth
        self.reset()

    def reset(self) -> None:
        self.calls: dict[tuple[int, ...], int] = {}
        self.features: dict[tuple[int, ...], Tensor] = {}

    def forward(self, x: Tensor, t: Tensor | float, **cond: Tensor) -> Tensor:
        return self.unet(x, t, **cond, cache=self)

    def deep(self, h: Tensor, emb: Tensor, context: Tensor | None, key: tuple[int, ...]) -> Tensor:
        """UNet.deep(h, ...) on every interval-th call for inputs of shape `key`, its last result in between."""
        n = self.calls.get(key, 0)
        self.calls[key] = n + 1
        if n % self.interval == 0:
            self.features[key] = self.unet.deep(h, emb, context, self.depth)
        return self.features[key]
