"""Original single-file Stable Diffusion (LDM / sgm) UNet weights, `model.diffusion_model.*` -> our UNet.

Our UNet keeps LDM's layout (input_blocks / middle / output_blocks, one skip per input block), so block indices
carry over: LDM's input_blocks.0 is our conv_in and input_blocks.i our input_blocks.(i - 1). Inside a block,
ResBlock names are renamed and SpatialTransformer internals are shared with diffusers' (same names there).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import Tensor

from ..checkpoints import build, load_weights, read_state_dict
from ..models.unet import UNet, UNetConfig
from .diffusers_unet import TRANSFORMER_NAMES, fuse_attention, rename

PREFIX = "model.diffusion_model."
RES_NAMES = [(r"^in_layers\.0\.", "norm1."), (r"^in_layers\.2\.", "conv1."), (r"^emb_layers\.1\.", "emb_proj."),
             (r"^out_layers\.0\.", "norm2."), (r"^out_layers\.3\.", "conv2."), (r"^skip_connection\.", "skip.")]
TOP_NAMES = [(r"^time_embed\.0\.", "time_embed.linear_1."), (r"^time_embed\.2\.", "time_embed.linear_2."),
             (r"^label_emb\.0\.0\.", "add_embed.linear_1."), (r"^label_emb\.0\.2\.", "add_embed.linear_2."),
             (r"^label_emb\.weight$", "class_embed.weight"), (r"^out\.0\.", "norm_out."), (r"^out\.2\.", "conv_out.")]
MIDDLE = {"0": "middle.0.res", "1": "middle.0.attn", "2": "middle.1.res"}


def _part(prefix: str, part: int, local: str) -> str:
    """One module of an LDM block: ResBlock (part 0), Downsample `op` / Upsample `conv`, or SpatialTransformer."""
    if re.match(r"(op|conv)\.", local):
        return f"{prefix}.resample.conv.{local.split('.', 1)[1]}"
    if part == 0:
        return f"{prefix}.res.{rename(local, RES_NAMES)}"
    return f"{prefix}.attn.{rename(local, TRANSFORMER_NAMES)}"


def _key(key: str) -> str:
    """LDM UNet key (prefix removed) -> ours; unknown keys unchanged."""
    m = re.match(r"(input|output)_blocks\.(\d+)\.(\d+)\.(.*)", key)
    if m:
        side, i, part, local = m[1], int(m[2]), int(m[3]), m[4]
        if side == "input" and i == 0:
            return f"conv_in.{local}"
        return _part(f"{side}_blocks.{i - 1 if side == 'input' else i}", part, local)
    m = re.match(r"middle_block\.(\d+)\.(.*)", key)
    if m and m[1] in MIDDLE:
        return f"{MIDDLE[m[1]]}.{rename(m[2], RES_NAMES if m[1] != '1' else TRANSFORMER_NAMES)}"
    return rename(key, TOP_NAMES)


def unet_state_from_ldm(sd: dict[str, Tensor], config: UNetConfig) -> dict[str, Tensor]:
    """Our UNet state dict from a full SD 1.x / 2.x / SDXL single-file checkpoint (only `model.diffusion_model.*`
    is used; the autoencoder, text encoders and EMA copies are ignored)."""
    if config.context_dim is None:
        raise ValueError("LDM single-file conversion supports the text-conditioned (cross-attention) UNet only")
    state = {_key(k[len(PREFIX):]): v for k, v in sd.items() if k.startswith(PREFIX)}
    return fuse_attention(state)


def load_ldm_unet(path: str | Path, config: UNetConfig, device: str = "cpu", dtype: torch.dtype | None = None) -> UNet:
    """Our UNet from an original Stable Diffusion .safetensors / .ckpt file, for the given config
    (e.g. `sd15_unet_config()`)."""
    state = unet_state_from_ldm(read_state_dict(path, device=device), config)
    model = load_weights(build("unet", config, device="meta"), state, source=str(path))
    return model.to(dtype) if dtype else model
