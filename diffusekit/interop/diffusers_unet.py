"""diffusers UNet2DModel / UNet2DConditionModel folders -> our UNet (config, weights, loader).

Supported: DownBlock2D / AttnDownBlock2D / CrossAttnDownBlock2D and their mirrored up blocks, UNetMidBlock2D /
UNetMidBlock2DCrossAttn, positional time embeddings, class labels (num_class_embeds), resnet_time_scale_shift
default | scale_shift, SD 1.x conv projections, SD 2.x linear projections and per-level heads, SDXL text_time
additional embeddings and transformer_layers_per_block. Any other option raises ValueError naming it.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..checkpoints import build, load_weights, read_config, read_state_dict
from ..models.unet import UNet, UNetConfig

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


def _unsupported(key: str, value: Any, allowed: Any) -> ValueError:
    return ValueError(f"diffusers option {key}={value!r} is not supported (supported: {allowed!r})")


def _single(cfg: dict, key: str) -> Any:
    """A per-level option that we only support with one value for all levels."""
    value = cfg[key]
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise _unsupported(key, value, "the same value at every level")
        value = value[0]
    return value


def _check_options(cfg: dict, conditional: bool) -> None:
    """Raise ValueError naming the first diffusers option our UNet cannot express."""
    for key, allowed in SUPPORTED.items():
        value = cfg.get(key, allowed[0])
        if (value[0] if isinstance(value, (list, tuple)) and len(set(value)) == 1 else value) not in allowed:
            raise _unsupported(key, value, allowed)
    blocks, down, up = BLOCKS[conditional], list(cfg["down_block_types"]), list(cfg["up_block_types"])
    if any(b not in blocks for b in down) or [blocks[b] for b in reversed(down)] != up:
        raise _unsupported("down_block_types / up_block_types", (down, up), f"{sorted(blocks)}, mirrored")
    if cfg["mid_block_type"] != DEFAULTS[conditional]["mid_block_type"]:
        raise _unsupported("mid_block_type", cfg["mid_block_type"], DEFAULTS[conditional]["mid_block_type"])
    if not conditional and cfg["add_attention"]:  # diffusers drops the mid-attention norm for scale_shift
        groups = cfg["attn_norm_num_groups"]
        if groups is None and cfg["resnet_time_scale_shift"] == "default":
            groups = cfg["norm_num_groups"]
        if groups != cfg["norm_num_groups"]:
            raise _unsupported("attn_norm_num_groups", cfg["attn_norm_num_groups"], cfg["norm_num_groups"])
    if any(c % cfg["block_out_channels"][0] for c in cfg["block_out_channels"]):
        raise _unsupported("block_out_channels", cfg["block_out_channels"], "multiples of the first")


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
        raise _unsupported("transformer_layers_per_block", depth, "one int per level")
    text_time = cfg["addition_embed_type"] == "text_time"
    return UNetConfig(**common, num_heads=heads if isinstance(heads, int) else tuple(heads), head_dim=None,
                      context_dim=_single(cfg, "cross_attention_dim"),
                      transformer_depth=depth if isinstance(depth, int) else tuple(depth),
                      addition_time_embed_dim=cfg["addition_time_embed_dim"] if text_time else None,
                      addition_embed_dim=cfg["projection_class_embeddings_input_dim"] if text_time else None)


# Module renames inside a block, diffusers -> ours (applied to the key after the block prefix).
RES_NAMES = [(r"^time_emb_proj\.", "emb_proj."), (r"^conv_shortcut\.", "skip.")]
SELF_ATTN_NAMES = [(r"^group_norm\.", "norm."), (r"^(query|key|value)\.", lambda m: f"attn.to_{m[1][0]}."),
                   (r"^to_([qkv])\.", r"attn.to_\1."), (r"^(to_out\.0|proj_attn)\.", "attn.out.")]
TRANSFORMER_NAMES = [(r"^transformer_blocks\.", "blocks."), (r"\.to_out\.0\.", ".out."),
                     (r"\.ff\.net\.0\.proj\.", ".ff.proj_in."), (r"\.ff\.net\.2\.", ".ff.proj_out.")]


def rename(local: str, rules: list) -> str:
    """Apply (pattern, replacement) regex rules in order."""
    for pattern, repl in rules:
        local = re.sub(pattern, repl, local)
    return local


def _block_key(key: str, config: UNetConfig) -> str:
    """diffusers key -> ours for everything in down_blocks / mid_block / up_blocks; other keys unchanged."""
    per = config.num_res_blocks + 1
    m = re.match(r"(down|up)_blocks\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.*)", key)
    if m:
        side, level, kind, j, local = m[1], int(m[2]), m[3], int(m[4]), m[5]
        index = level * per + (config.num_res_blocks if kind.endswith("samplers") else j)
        prefix = f"{'input' if side == 'down' else 'output'}_blocks.{index}"
    else:
        m = re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.*)", key)
        if not m:
            return key
        kind, local = m[1], m[3]
        prefix = f"middle.{m[2]}"
    if kind == "resnets":
        return f"{prefix}.res.{rename(local, RES_NAMES)}"
    if kind == "attentions":
        return f"{prefix}.attn.{rename(local, SELF_ATTN_NAMES if config.context_dim is None else TRANSFORMER_NAMES)}"
    return f"{prefix}.resample.{local}"


TOP_NAMES = [(r"^time_embedding\.", "time_embed."), (r"^class_embedding\.", "class_embed."),
             (r"^add_embedding\.", "add_embed."), (r"^conv_norm_out\.", "norm_out.")]


def fuse_attention(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """to_q / to_k / to_v -> qkv (self-attention) or q + kv (cross-attention `attn2`); 1x1-conv transformer
    projections -> linear. Incomplete q/k/v groups are left as they are (they surface as unexpected keys)."""
    for key in [k for k in state if re.search(r"\.to_q\.(weight|bias)$", k)]:
        names = [key.replace(".to_q.", f".to_{p}.") for p in "qkv"]
        if not all(n in state for n in names):
            continue
        q, k, v = (state.pop(n) for n in names)
        if ".attn2." in key:
            state[key.replace(".to_q.", ".q.")] = q
            state[key.replace(".to_q.", ".kv.")] = torch.cat([k, v])
        else:
            state[key.replace(".to_q.", ".qkv.")] = torch.cat([q, k, v])
    for key in [k for k in state if re.search(r"\.attn\.proj_(in|out)\.weight$", k)]:
        if state[key].ndim == 4:
            state[key] = state[key].flatten(1)
    return state


def unet_state_from_diffusers(sd: dict[str, Tensor], config: UNetConfig) -> dict[str, Tensor]:
    """Rename a diffusers UNet state dict to our UNet's keys (fusing q/k/v); unknown keys pass through unchanged
    so that `load_weights` reports them."""
    state = {rename(_block_key(k, config), TOP_NAMES): v for k, v in sd.items()}
    return fuse_attention(state)


def load_diffusers_unet(folder: str | Path, device: str = "cpu", dtype: torch.dtype | None = None,
                        variant: str | None = None) -> UNet:
    """Our UNet from a diffusers `unet` folder (config.json + diffusion_pytorch_model[.variant].safetensors)."""
    config = unet_config_from_diffusers(read_config(folder))
    name = f"diffusion_pytorch_model.{variant}.safetensors" if variant else "diffusion_pytorch_model.safetensors"
    state = unet_state_from_diffusers(read_state_dict(Path(folder) / name, device=device), config)
    model = load_weights(build("unet", config, device="meta"), state, source=str(folder))
    return model.to(dtype) if dtype else model
