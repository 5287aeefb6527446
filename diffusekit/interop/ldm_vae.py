"""The autoencoder of an original single-file Stable Diffusion checkpoint (`first_stage_model.*`) -> our AutoencoderKL.

LDM layout: encoder.down.i.block.j (nin_shortcut -> skip), down.i.downsample, mid.block_{1,2}, mid.attn_1
(norm, q/k/v/proj_out as 1x1 convs), norm_out, quant_conv / post_quant_conv, and decoder.up.i numbered from the
highest resolution, so that our decoder.up (in execution order, deepest first) is up.{L-1-i}.
"""

from __future__ import annotations

from typing import Mapping

from torch import Tensor

from ..models.autoencoder import AutoencoderConfig
from .common import Rule, linear_from_conv, rename_keys, strip_prefix
from .diffusers_vae import ATTENTION_WEIGHTS, PARAM, RESNET

PREFIX = "first_stage_model."


def ldm_vae_rules(levels: int) -> list[Rule]:
    """Renaming rules for the LDM autoencoder with `levels` resolution levels."""
    up = lambda m: f"decoder.up.{levels - 1 - int(m[1])}"  # noqa: E731
    return [
        (rf"(encoder|decoder)\.(conv_in|conv_out|norm_out)\.{PARAM}", r"\1.\2.\3"),
        (rf"encoder\.down\.(\d+)\.block\.(\d+)\.{RESNET}\.{PARAM}", r"encoder.down.\1.blocks.\2.\3.\4"),
        (rf"encoder\.down\.(\d+)\.block\.(\d+)\.nin_shortcut\.{PARAM}", r"encoder.down.\1.blocks.\2.skip.\3"),
        (rf"encoder\.down\.(\d+)\.downsample\.conv\.{PARAM}", r"encoder.down.\1.resample.conv.\2"),
        (rf"decoder\.up\.(\d+)\.block\.(\d+)\.{RESNET}\.{PARAM}", lambda m: f"{up(m)}.blocks.{m[2]}.{m[3]}.{m[4]}"),
        (rf"decoder\.up\.(\d+)\.block\.(\d+)\.nin_shortcut\.{PARAM}", lambda m: f"{up(m)}.blocks.{m[2]}.skip.{m[3]}"),
        (rf"decoder\.up\.(\d+)\.upsample\.conv\.{PARAM}", lambda m: f"{up(m)}.resample.conv.{m[2]}"),
        (rf"(encoder|decoder)\.mid\.block_(1|2)\.{RESNET}\.{PARAM}", r"\1.mid.res\2.\3.\4"),
        (rf"(encoder|decoder)\.mid\.attn_1\.norm\.{PARAM}", r"\1.mid.attn.norm.\2"),
        (rf"(encoder|decoder)\.mid\.attn_1\.(q|k|v)\.{PARAM}", r"\1.mid.attn.attn.qkv.\3#\2"),
        (rf"(encoder|decoder)\.mid\.attn_1\.proj_out\.{PARAM}", r"\1.mid.attn.attn.out.\2"),
        (rf"(quant_conv|post_quant_conv)\.{PARAM}", r"\1.\2"),
    ]


def vae_state_from_ldm(sd: Mapping[str, Tensor], config: AutoencoderConfig) -> dict[str, Tensor]:
    """Our AutoencoderKL state dict from a full single-file SD checkpoint dict (only `first_stage_model.*` is used)."""
    rules = ldm_vae_rules(len(config.channel_mult))
    return linear_from_conv(rename_keys(strip_prefix(sd, PREFIX), rules, "LDM first_stage_model"), ATTENTION_WEIGHTS)
