"""diffusers `AutoencoderKL` and `VQModel` folders -> our AutoencoderKL / VQAutoencoder.

Key layout (diffusers -> ours): down_blocks.i.resnets.j -> down.i.blocks.j (conv_shortcut -> skip),
downsamplers.0 / upsamplers.0 -> resample, mid_block.resnets.{0,1} -> mid.res{1,2}, the mid-block attention
(group_norm, to_q/to_k/to_v fused into one qkv, to_out.0; the deprecated query/key/value/proj_attn names and
1x1-conv weights are accepted too) -> mid.attn, conv_norm_out -> norm_out, quantize.embedding -> quantizer.embedding.
Keys that no rule knows raise CheckpointError.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import Tensor

from ..checkpoints import CheckpointError, build, load_weights, read_config, read_state_dict
from ..models.autoencoder import AutoencoderConfig, AutoencoderKL, VQAutoencoder, VQAutoencoderConfig

Rule = tuple[str, str | Callable[[re.Match], str]]
RESNET = r"(norm1|conv1|norm2|conv2)"
PARAM = r"(weight|bias)"

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
    (rf"(encoder|decoder)\.mid_block\.attentions\.0\.group_norm\.{PARAM}", r"\1.mid.attn.norm.\2"),
    (rf"(encoder|decoder)\.mid_block\.attentions\.0\.(to_q|query)\.{PARAM}", r"\1.mid.attn.attn.q.\3"),
    (rf"(encoder|decoder)\.mid_block\.attentions\.0\.(to_k|key)\.{PARAM}", r"\1.mid.attn.attn.k.\3"),
    (rf"(encoder|decoder)\.mid_block\.attentions\.0\.(to_v|value)\.{PARAM}", r"\1.mid.attn.attn.v.\3"),
    (rf"(encoder|decoder)\.mid_block\.attentions\.0\.(to_out\.0|proj_attn)\.{PARAM}", r"\1.mid.attn.attn.out.\3"),
    (rf"(quant_conv|post_quant_conv)\.{PARAM}", r"\1.\2"),
    (r"quantize\.embedding\.weight", "quantizer.embedding.weight"),
]


def rename_keys(state: Mapping[str, Tensor], rules: list[Rule], source: str) -> dict[str, Tensor]:
    """Rename every key by the first rule whose pattern matches it whole; CheckpointError on keys no rule knows."""
    compiled = [(re.compile(pattern), repl) for pattern, repl in rules]

    def rename(key: str) -> str | None:
        for pattern, repl in compiled:
            if m := pattern.fullmatch(key):
                return m.expand(repl) if isinstance(repl, str) else repl(m)
        return None

    names = {k: rename(k) for k in state}
    unknown = [k for k, n in names.items() if n is None]
    if unknown:
        raise CheckpointError(f"{source}: {len(unknown)} unknown keys: {', '.join(unknown[:8])}")
    if len(set(names.values())) < len(names):
        raise CheckpointError(f"{source}: several keys map to the same parameter (old and new names mixed?)")
    return {names[k]: v for k, v in state.items()}


def fuse_attention(state: dict[str, Tensor], source: str) -> dict[str, Tensor]:
    """Concatenate `<prefix>.q/k/v.<param>` into `<prefix>.qkv.<param>` and turn 1x1-conv attention weights
    [C, C, 1, 1] (LDM, old diffusers) into linear ones [C, C]."""
    for key in [k for k in state if re.search(r"\.attn\.attn\.q\.(weight|bias)$", k)]:
        prefix, param = key.rsplit(".q.", 1)
        parts = [f"{prefix}.{n}.{param}" for n in "qkv"]
        if any(p not in state for p in parts):
            raise CheckpointError(f"{source}: attention {prefix} lacks one of {parts}")
        state[f"{prefix}.qkv.{param}"] = torch.cat([state.pop(p) for p in parts])
    for key, w in state.items():
        if ".attn.attn." in key and w.ndim == 4 and w.shape[2:] == (1, 1):
            state[key] = w.flatten(1)
    return state


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
    return fuse_attention(rename_keys(state, DIFFUSERS_VAE_RULES, source), source)


def vae_state_from_diffusers(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """diffusers AutoencoderKL state dict -> ours."""
    return _convert(state, "diffusers AutoencoderKL")


def vq_state_from_diffusers(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """diffusers VQModel state dict -> ours."""
    return _convert(state, "diffusers VQModel")


def _load(folder: str | Path, class_name: str, model_type: str, to_config: Callable, to_state: Callable,
          device: str) -> Any:
    cfg = read_config(folder)
    if cfg.get("_class_name", class_name) != class_name:
        raise CheckpointError(f"{folder} holds a {cfg['_class_name']}, not a {class_name}")
    model = build(model_type, to_config(cfg), device="meta")
    state = to_state(read_state_dict(Path(folder) / "diffusion_pytorch_model.safetensors", device=device))
    return load_weights(model, state, source=str(folder))


def load_diffusers_vae(folder: str | Path, device: str = "cpu") -> AutoencoderKL:
    """Load a diffusers AutoencoderKL folder (config.json + diffusion_pytorch_model.safetensors)."""
    return _load(folder, "AutoencoderKL", "autoencoder_kl", vae_config_from_diffusers, vae_state_from_diffusers, device)


def load_diffusers_vq(folder: str | Path, device: str = "cpu") -> VQAutoencoder:
    """Load a diffusers VQModel folder (config.json + diffusion_pytorch_model.safetensors)."""
    return _load(folder, "VQModel", "autoencoder_vq", vq_config_from_diffusers, vq_state_from_diffusers, device)
