"""diffusers `AutoencoderKL` and `VQModel` folders -> our AutoencoderKL / VQAutoencoder.

Key layout (diffusers -> ours): down_blocks.i.resnets.j -> down.i.blocks.j (conv_shortcut -> skip),
downsamplers.0 / upsamplers.0 -> resample, mid_block.resnets.{0,1} -> mid.res{1,2}, the mid-block attention
(group_norm, to_q/to_k/to_v fused into one qkv, to_out.0; the deprecated query/key/value/proj_attn names and
1x1-conv weights are accepted too) -> mid.attn, conv_norm_out -> norm_out, quantize.embedding -> quantizer.embedding.
Keys that no rule knows raise CheckpointError.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor

from ..checkpoints import CheckpointError
from ..models.autoencoder import AutoencoderConfig, AutoencoderKL, VQAutoencoder, VQAutoencoderConfig
from .common import SPATIAL_ATTENTION, DiffusersModel, Rule, linear_from_conv, nested, rename_keys

RESNET = r"(norm1|conv1|norm2|conv2)"
PARAM = r"(weight|bias)"
ATTENTION_WEIGHTS = r".+\.mid\.attn\.attn\.\w+\.weight"  # 1x1 convs in LDM files and old diffusers ones

DIFFUSERS_VAE_RULES: list[Rule] = [
    (rf"(encoder|decoder)\.conv_(in|out)\.{PARAM}", r"\1.conv_\2.\3"),
    (rf"(encoder|decoder)\.conv_norm_out\.{PARAM}", r"\1.norm_out.\2"),
    (rf"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.{RESNET}\.{PARAM}", r"encoder.down.\1.blocks.\2.\3.\4"),
    (rf"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.conv_shortcut\.{PARAM}", r"encoder.down.\1.blocks.\2.skip.\3"),
    (rf"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.{PARAM}", r"encoder.down.\1.resample.conv.\2"),
    (rf"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.{RESNET}\.{PARAM}", r"decoder.up.\1.blocks.\2.\3.\4"),
    (rf"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.conv_shortcut\.{PARAM}", r"decoder.up.\1.blocks.\2.skip.\3"),
    (rf"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.{PARAM}", r"decoder.up.\1.resample.conv.\2"),
    (rf"(encoder|decoder)\.mid_block\.resnets\.(0|1)\.{RESNET}\.{PARAM}",
     lambda m: f"{m[1]}.mid.res{int(m[2]) + 1}.{m[3]}.{m[4]}"),
    (r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)", nested(r"\1.mid.attn", SPATIAL_ATTENTION)),
    (rf"(quant_conv|post_quant_conv)\.{PARAM}", r"\1.\2"),
    (r"quantize\.embedding\.weight", "quantizer.embedding.weight"),
]


def _architecture(cfg: Mapping[str, Any], name: str) -> dict[str, Any]:
    """Our config fields shared by KL and VQ, from a diffusers config; CheckpointError if it is not the LDM layout."""
    boc = list(cfg.get("block_out_channels", (64,)))
    checks = {"down_block_types": ("DownEncoderBlock2D", len(boc)), "up_block_types": ("UpDecoderBlock2D", len(boc))}
    for field, (kind, n) in checks.items():
        if list(cfg.get(field, [kind])) != [kind] * n:
            raise CheckpointError(f"{name}: {field} {cfg.get(field)} is not {n} x {kind}")
    if cfg.get("act_fn", "silu") != "silu" or any(c % boc[0] for c in boc):
        raise CheckpointError(f"{name}: unsupported act_fn {cfg.get('act_fn')} or block_out_channels {boc}")
    return dict(in_channels=cfg.get("in_channels", 3), out_channels=cfg.get("out_channels", 3), channels=boc[0],
                channel_mult=tuple(c // boc[0] for c in boc), num_res_blocks=cfg.get("layers_per_block", 1),
                groups=cfg.get("norm_num_groups", 32), mid_attention=cfg.get("mid_block_add_attention", True),
                scaling_factor=cfg.get("scaling_factor", 0.18215))


def vae_config_from_diffusers(cfg: Mapping[str, Any]) -> AutoencoderConfig:
    """diffusers AutoencoderKL config dict -> AutoencoderConfig."""
    if cfg.get("use_quant_conv", True) != cfg.get("use_post_quant_conv", True):
        raise CheckpointError("AutoencoderKL: use_quant_conv and use_post_quant_conv must agree")
    if cfg.get("latents_mean") is not None or cfg.get("latents_std") is not None:
        raise CheckpointError("AutoencoderKL: per-channel latents_mean / latents_std are not supported")
    return AutoencoderConfig(**_architecture(cfg, "AutoencoderKL"), latent_channels=cfg.get("latent_channels", 4),
                             quant_conv=cfg.get("use_quant_conv", True), shift_factor=cfg.get("shift_factor") or 0.0)


def vq_config_from_diffusers(cfg: Mapping[str, Any]) -> VQAutoencoderConfig:
    """diffusers VQModel config dict -> VQAutoencoderConfig."""
    if cfg.get("norm_type", "group") != "group":
        raise CheckpointError(f"VQModel: norm_type {cfg.get('norm_type')!r} (MoVQ) is not supported")
    c = cfg.get("latent_channels", 3)
    return VQAutoencoderConfig(**_architecture(cfg, "VQModel"), latent_channels=c,
                               num_embeddings=cfg.get("num_vq_embeddings", 256), embed_dim=cfg.get("vq_embed_dim") or c)


def _convert(state: Mapping[str, Tensor], source: str) -> dict[str, Tensor]:
    return linear_from_conv(rename_keys(state, DIFFUSERS_VAE_RULES, source), ATTENTION_WEIGHTS)


def vae_state_from_diffusers(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """diffusers AutoencoderKL state dict -> ours."""
    return _convert(state, "diffusers AutoencoderKL")


def vq_state_from_diffusers(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """diffusers VQModel state dict -> ours."""
    return _convert(state, "diffusers VQModel")


KL = DiffusersModel(("AutoencoderKL",), "vae", "autoencoder_kl", vae_config_from_diffusers,
                    lambda state, _: vae_state_from_diffusers(state))
VQ = DiffusersModel(("VQModel",), "vqvae", "autoencoder_vq", vq_config_from_diffusers,
                    lambda state, _: vq_state_from_diffusers(state))


def load_diffusers_vae(folder: str | Path, device: str = "cpu", dtype: torch.dtype | None = None,
                       variant: str | None = None) -> AutoencoderKL:
    """Load a diffusers AutoencoderKL folder (config.json + diffusion_pytorch_model[.variant].safetensors, or
    shards), or the `vae/` of a pipeline folder."""
    return KL.load(folder, device, dtype, variant)


def load_diffusers_vq(folder: str | Path, device: str = "cpu", dtype: torch.dtype | None = None,
                      variant: str | None = None) -> VQAutoencoder:
    """Load a diffusers VQModel folder (config.json + diffusion_pytorch_model[.variant].safetensors, or shards)."""
    return VQ.load(folder, device, dtype, variant)
