"""Original single-file Stable Diffusion (LDM / sgm) UNet weights, `model.diffusion_model.*` -> our UNet.

Our UNet keeps LDM's layout (input_blocks / middle / output_blocks, one skip per input block), so block indices
carry over: LDM's input_blocks.0 is our conv_in and input_blocks.i our input_blocks.(i - 1). Inside a block,
ResBlock names are renamed and SpatialTransformer internals are shared with diffusers' (same names there).
"""

from __future__ import annotations

import re

from torch import Tensor

from ..models.unet import UNetConfig
from .common import KEEP, Rule, linear_from_conv, rename_key, rename_keys, strip_prefix
from .diffusers_unet import CONV_PROJECTIONS, TRANSFORMER

PREFIX = "model.diffusion_model."
RES = [(r"in_layers\.0\.(.+)", r"norm1.\1"), (r"in_layers\.2\.(.+)", r"conv1.\1"),
       (r"emb_layers\.1\.(.+)", r"emb_proj.\1"), (r"out_layers\.0\.(.+)", r"norm2.\1"),
       (r"out_layers\.3\.(.+)", r"conv2.\1"), (r"skip_connection\.(.+)", r"skip.\1"), KEEP]


def _part(prefix: str, part: str, local: str) -> str:
    """One module of an LDM block: ResBlock (part 0), Downsample `op` / Upsample `conv`, or SpatialTransformer."""
    if m := re.fullmatch(r"(?:op|conv)\.(.+)", local):
        return f"{prefix}.resample.conv.{m[1]}"
    if part == "0":
        return f"{prefix}.res.{rename_key(local, RES)}"
    return f"{prefix}.attn.{rename_key(local, TRANSFORMER)}"


LDM_UNET: list[Rule] = [  # keys without the PREFIX; unknown keys pass through (load_weights reports them)
    (r"input_blocks\.0\.0\.(.+)", r"conv_in.\1"),
    (r"input_blocks\.(\d+)\.(\d+)\.(.+)", lambda m: _part(f"input_blocks.{int(m[1]) - 1}", m[2], m[3])),
    (r"output_blocks\.(\d+)\.(\d+)\.(.+)", lambda m: _part(f"output_blocks.{m[1]}", m[2], m[3])),
    (r"middle_block\.([02])\.(.+)", lambda m: f"middle.{int(m[1]) // 2}.res.{rename_key(m[2], RES)}"),
    (r"middle_block\.1\.(.+)", lambda m: f"middle.0.attn.{rename_key(m[1], TRANSFORMER)}"),
    (r"time_embed\.0\.(.+)", r"time_embed.linear_1.\1"), (r"time_embed\.2\.(.+)", r"time_embed.linear_2.\1"),
    (r"label_emb\.0\.0\.(.+)", r"add_embed.linear_1.\1"), (r"label_emb\.0\.2\.(.+)", r"add_embed.linear_2.\1"),
    (r"label_emb\.weight", "class_embed.weight"), (r"out\.0\.(.+)", r"norm_out.\1"), (r"out\.2\.(.+)", r"conv_out.\1"),
    KEEP,
]


def unet_state_from_ldm(sd: dict[str, Tensor], config: UNetConfig) -> dict[str, Tensor]:
    """Our UNet state dict from a full SD 1.x / 2.x / SDXL single-file checkpoint (only `model.diffusion_model.*`
    is used; the autoencoder, text encoders and EMA copies are ignored)."""
    if not config.context_dim:
        raise ValueError("LDM single-file conversion supports the text-conditioned (cross-attention) UNet only")
    return linear_from_conv(rename_keys(strip_prefix(sd, PREFIX), LDM_UNET, "LDM model.diffusion_model"), CONV_PROJECTIONS)

