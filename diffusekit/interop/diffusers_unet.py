"""diffusers UNet2DModel / UNet2DConditionModel folders -> our UNet (config, weights, loader).

Supported: DownBlock2D / AttnDownBlock2D / CrossAttnDownBlock2D and their mirrored up blocks, UNetMidBlock2D /
UNetMidBlock2DCrossAttn, positional time embeddings, class labels (num_class_embeds), resnet_time_scale_shift
default | scale_shift, SD 1.x conv projections, SD 2.x linear projections and per-level heads, SDXL text_time
additional embeddings and transformer_layers_per_block. Any other option raises CheckpointError (a ValueError)
naming it.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..models.unet import UNet, UNetConfig
from .common import (FEED_FORWARD, KEEP, SPATIAL_ATTENTION, DiffusersModel, Rule, check_options, linear_from_conv,
                     nested, rename_key, rename_keys, unsupported)

# Options with the values we accept (a per-level list counts as its value when all levels agree).
SUPPORTED = {
    "center_input_sample": (False,), "time_embedding_type": ("positional",), "time_embedding_dim": (None,),
    "mid_block_scale_factor": (1,), "resnet_out_scale_factor": (1,), "act_fn": ("silu",), "class_embed_type": (None,),
    "downsample_type": ("conv",), "upsample_type": ("conv",), "conv_in_kernel": (3,), "conv_out_kernel": (3,),
    "only_cross_attention": (False,), "mid_block_only_cross_attention": (None, False), "dual_cross_attention": (False,),
    "encoder_hid_dim": (None,), "encoder_hid_dim_type": (None,), "reverse_transformer_layers_per_block": (None,),
    "num_attention_heads": (None,), "resnet_skip_time_act": (False,), "time_embedding_act_fn": (None,),
    "timestep_post_act": (None,), "time_cond_proj_dim": (None,), "attention_type": ("default",),
    "class_embeddings_concat": (False,), "cross_attention_norm": (None,), "addition_embed_type": (None, "text_time"),
    "resnet_time_scale_shift": ("default", "scale_shift"), "downsample_padding": (0, 1),
}
SHARED_DEFAULTS = dict(layers_per_block=2, norm_num_groups=32, norm_eps=1e-5, dropout=0.0, flip_sin_to_cos=True,
                       freq_shift=0, resnet_time_scale_shift="default", downsample_padding=1, num_class_embeds=None,
                       attention_head_dim=8)
DEFAULTS = {  # keyed by "is a UNet2DConditionModel"
    False: dict(SHARED_DEFAULTS, in_channels=3, out_channels=3, mid_block_type="UNetMidBlock2D", add_attention=True,
                attn_norm_num_groups=None),
    True: dict(SHARED_DEFAULTS, in_channels=4, out_channels=4, mid_block_type="UNetMidBlock2DCrossAttn",
               cross_attention_dim=1280, transformer_layers_per_block=1, addition_embed_type=None,
               addition_time_embed_dim=None, projection_class_embeddings_input_dim=None),
}
BLOCKS = {False: {"DownBlock2D": "UpBlock2D", "AttnDownBlock2D": "AttnUpBlock2D"},
          True: {"DownBlock2D": "UpBlock2D", "CrossAttnDownBlock2D": "CrossAttnUpBlock2D"}}


MODEL = "diffusers UNet"


def _single(cfg: dict, key: str) -> Any:
    """A per-level option that we only support with one value for all levels."""
    value = cfg[key]
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise unsupported(MODEL, key, value, "the same value at every level")
        value = value[0]
    return value


def _check_options(cfg: dict, conditional: bool) -> None:
    """Raise CheckpointError (a ValueError) naming the first diffusers option our UNet cannot express."""
    check_options(cfg, SUPPORTED, MODEL)
    blocks, down, up = BLOCKS[conditional], list(cfg["down_block_types"]), list(cfg["up_block_types"])
    if any(b not in blocks for b in down) or [blocks[b] for b in reversed(down)] != up:
        raise unsupported(MODEL, "down_block_types / up_block_types", (down, up), f"{sorted(blocks)}, mirrored")
    if cfg["mid_block_type"] != DEFAULTS[conditional]["mid_block_type"]:
        raise unsupported(MODEL, "mid_block_type", cfg["mid_block_type"], DEFAULTS[conditional]["mid_block_type"])
    if not conditional and cfg["add_attention"]:  # diffusers drops the mid-attention norm for scale_shift
        groups = cfg["attn_norm_num_groups"]
        if groups is None and cfg["resnet_time_scale_shift"] == "default":
            groups = cfg["norm_num_groups"]
        if groups != cfg["norm_num_groups"]:
            raise unsupported(MODEL, "attn_norm_num_groups", cfg["attn_norm_num_groups"], cfg["norm_num_groups"])
    if any(c % cfg["block_out_channels"][0] for c in cfg["block_out_channels"]):
        raise unsupported(MODEL, "block_out_channels", cfg["block_out_channels"], "multiples of the first")


def unet_config_from_diffusers(cfg: dict) -> UNetConfig:
    """Our UNetConfig for a diffusers UNet2DModel or UNet2DConditionModel config.json dict."""
    conditional = cfg.get("_class_name") == "UNet2DConditionModel" or "cross_attention_dim" in cfg
    cfg = {**DEFAULTS[conditional], **cfg}
    _check_options(cfg, conditional)
    channels, down = cfg["block_out_channels"], cfg["down_block_types"]
    common = dict(
        in_channels=cfg["in_channels"], out_channels=cfg["out_channels"], channels=channels[0],
        channel_mult=tuple(c // channels[0] for c in channels), num_res_blocks=_single(cfg, "layers_per_block"),
        attention_levels=tuple(i for i, b in enumerate(down) if b != "DownBlock2D"), dropout=cfg["dropout"],
        norm_groups=cfg["norm_num_groups"], norm_eps=cfg["norm_eps"], num_classes=cfg["num_class_embeds"],
        scale_shift=cfg["resnet_time_scale_shift"] == "scale_shift", flip_sin_to_cos=cfg["flip_sin_to_cos"],
        asymmetric_downsample=cfg["downsample_padding"] == 0, freq_shift=cfg["freq_shift"],
    )
    if not conditional:  # attention_head_dim is the channels per head here (None: one head)
        return UNetConfig(**common, mid_attention=cfg["add_attention"], num_heads=1,
                          head_dim=cfg["attention_head_dim"], context_dim=None)
    heads, depth = cfg["attention_head_dim"], cfg["transformer_layers_per_block"]  # heads, despite the name
    if not isinstance(depth, int) and not all(isinstance(d, int) for d in depth):
        raise unsupported(MODEL, "transformer_layers_per_block", depth, "one int per level")
    text_time = cfg["addition_embed_type"] == "text_time"
    return UNetConfig(**common, num_heads=heads if isinstance(heads, int) else tuple(heads), head_dim=None,
                      context_dim=_single(cfg, "cross_attention_dim"),
                      transformer_depth=depth if isinstance(depth, int) else tuple(depth),
                      addition_time_embed_dim=cfg["addition_time_embed_dim"] if text_time else None,
                      addition_embed_dim=cfg["projection_class_embeddings_input_dim"] if text_time else None)


# Renames inside a block, diffusers -> ours (unknown names pass through: load_weights reports them).
RES = [(r"time_emb_proj\.(.+)", r"emb_proj.\1"), (r"conv_shortcut\.(.+)", r"skip.\1"), KEEP]
TRANSFORMER = [  # diffusers' Transformer2DModel; LDM's SpatialTransformer uses the same names
    (r"transformer_blocks\.(\d+)\.attn1\.to_([qkv])\.(\w+)", r"blocks.\1.attn1.qkv.\3#\2"),
    (r"transformer_blocks\.(\d+)\.attn2\.to_q\.(\w+)", r"blocks.\1.attn2.q.\2"),
    (r"transformer_blocks\.(\d+)\.attn2\.to_([kv])\.(\w+)", r"blocks.\1.attn2.kv.\3#\2"),
    (r"transformer_blocks\.(\d+)\.(attn[12])\.to_out\.0\.(\w+)", r"blocks.\1.\2.out.\3"),
    (r"transformer_blocks\.(\d+)\.ff\.(.+)", nested(r"blocks.\1.ff", FEED_FORWARD)),
    (r"transformer_blocks\.(.+)", r"blocks.\1"),
    KEEP,
]
CONV_PROJECTIONS = r".+\.attn\.proj_(in|out)\.weight"  # SD 1.x's 1x1-conv proj_in / proj_out


def unet_rules(config: UNetConfig) -> list[Rule]:
    """Renaming rules for a diffusers UNet with our `config`: down_blocks.i.resnets.j -> input_blocks.n.res, ...,
    mid_block -> middle, up_blocks -> output_blocks (one stage per resnet, resamplers in the last)."""
    per = config.num_res_blocks + 1
    local = {"resnets": ("res", RES),
             "attentions": ("attn", [*SPATIAL_ATTENTION, KEEP] if not config.context_dim else TRANSFORMER)}

    def stage(prefix: str, kind: str, rest: str) -> str:
        if kind not in local:
            return f"{prefix}.resample.{rest}"
        name, rules = local[kind]
        return f"{prefix}.{name}.{rename_key(rest, rules)}"

    def block(m: re.Match) -> str:
        side, level, kind, j = m[1], int(m[2]), m[3], int(m[4])
        index = level * per + (config.num_res_blocks if kind.endswith("samplers") else j)
        return stage(f"{'input' if side == 'down' else 'output'}_blocks.{index}", kind, m[5])

    return [
        (r"(down|up)_blocks\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.+)", block),
        (r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", lambda m: stage(f"middle.{m[2]}", m[1], m[3])),
        (r"time_embedding\.(.+)", r"time_embed.\1"), (r"class_embedding\.(.+)", r"class_embed.\1"),
        (r"add_embedding\.(.+)", r"add_embed.\1"), (r"conv_norm_out\.(.+)", r"norm_out.\1"),
        KEEP,
    ]


def unet_state_from_diffusers(sd: dict[str, Tensor], config: UNetConfig) -> dict[str, Tensor]:
    """Rename a diffusers UNet state dict to our UNet's keys (fusing q/k/v); unknown keys pass through unchanged
    so that `load_weights` reports them."""
    return linear_from_conv(rename_keys(sd, unet_rules(config), "diffusers UNet"), CONV_PROJECTIONS)


UNET = DiffusersModel(("UNet2DConditionModel", "UNet2DModel"), "unet", "unet", unet_config_from_diffusers,
                      unet_state_from_diffusers)


def load_diffusers_unet(folder: str | Path, device: str = "cpu", dtype: torch.dtype | None = None,
                        variant: str | None = None) -> UNet:
    """Our UNet from a diffusers `unet` folder (config.json + diffusion_pytorch_model[.variant].safetensors, or
    shards), or from a pipeline folder holding one."""
    return UNET.load(folder, device, dtype, variant)
