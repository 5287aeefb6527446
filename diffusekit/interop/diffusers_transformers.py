"""diffusers transformer checkpoints -> DiT (DiTTransformer2DModel) and MM-DiT (SD3Transformer2DModel).

Keys are renamed by full-match rules (see common.py); q, k, v projections are concatenated into fused qkv weights;
keys that no rule knows pass through unchanged, so `load_weights` names them as unexpected.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from ..checkpoints import CheckpointError
from ..models.dit import DiTConfig
from ..models.mmdit import QK_NORMS, MMDiTConfig
from .common import FEED_FORWARD, KEEP, DiffusersModel, Rule, check_options, nested, rename_keys

DIT_OPTIONS = {"norm_type": ("ada_norm_zero",), "activation_fn": ("gelu-approximate",),
               "norm_elementwise_affine": (False,), "attention_bias": (True,)}

DIT_RULES: list[Rule] = [
    (r"pos_embed\.proj\.(\w+)", r"x_embedder.\1"),
    (r"transformer_blocks\.0\.norm1\.emb\.timestep_embedder\.(linear_[12]\.\w+)", r"t_embedder.\1"),
    (r"transformer_blocks\.0\.norm1\.emb\.class_embedder\.embedding_table\.weight", "y_embedder.weight"),
    (r"transformer_blocks\.(\d+)\.norm1\.linear\.(\w+)", r"blocks.\1.adaLN_modulation.\2"),
    (r"transformer_blocks\.(\d+)\.attn1\.to_([qkv])\.(\w+)", r"blocks.\1.qkv.\3#\2"),
    (r"transformer_blocks\.(\d+)\.attn1\.to_out\.0\.(\w+)", r"blocks.\1.proj.\2"),
    (r"transformer_blocks\.(\d+)\.ff\.(.+)", nested(r"blocks.\1.mlp", FEED_FORWARD)),
    (r"proj_out_1\.(\w+)", r"final_layer.adaLN_modulation.\1"),
    (r"proj_out_2\.(\w+)", r"final_layer.linear.\1"),
    KEEP,
]
MMDIT_RULES: list[Rule] = [
    (r"pos_embed\.proj\.(\w+)", r"x_embedder.\1"),
    (r"pos_embed\.pos_embed", "pos_embed"),
    (r"time_text_embed\.timestep_embedder\.(linear_[12]\.\w+)", r"t_embedder.\1"),
    (r"time_text_embed\.text_embedder\.(linear_[12]\.\w+)", r"y_embedder.\1"),
    (r"context_embedder\.(\w+)", r"context_embedder.\1"),
    (r"transformer_blocks\.(\d+)\.norm1\.linear\.(\w+)", r"joint_blocks.\1.x_block.adaLN_modulation.\2"),
    (r"transformer_blocks\.(\d+)\.norm1_context\.linear\.(\w+)", r"joint_blocks.\1.context_block.adaLN_modulation.\2"),
    (r"transformer_blocks\.(\d+)\.attn\.to_([qkv])\.(\w+)", r"joint_blocks.\1.x_block.qkv.\3#\2"),
    (r"transformer_blocks\.(\d+)\.attn\.add_([qkv])_proj\.(\w+)", r"joint_blocks.\1.context_block.qkv.\3#\2"),
    (r"transformer_blocks\.(\d+)\.attn\.norm_([qk])\.weight", r"joint_blocks.\1.x_block.\2_norm.weight"),
    (r"transformer_blocks\.(\d+)\.attn\.norm_added_([qk])\.weight", r"joint_blocks.\1.context_block.\2_norm.weight"),
    (r"transformer_blocks\.(\d+)\.attn\.to_out\.0\.(\w+)", r"joint_blocks.\1.x_block.proj.\2"),
    (r"transformer_blocks\.(\d+)\.attn\.to_add_out\.(\w+)", r"joint_blocks.\1.context_block.proj.\2"),
    (r"transformer_blocks\.(\d+)\.ff\.(.+)", nested(r"joint_blocks.\1.x_block.mlp", FEED_FORWARD)),
    (r"transformer_blocks\.(\d+)\.ff_context\.(.+)", nested(r"joint_blocks.\1.context_block.mlp", FEED_FORWARD)),
    (r"norm_out\.linear\.(\w+)", r"final_layer.adaLN_modulation.\1"),
    (r"proj_out\.(\w+)", r"final_layer.linear.\1"),
    KEEP,
]
SCALE_SHIFT = re.compile(r"norm_out\.linear\.\w+|transformer_blocks\.\d+\.norm1_context\.linear\.\w+")


def swap_halves(x: Tensor) -> Tensor:
    """(scale, shift) rows -> (shift, scale): diffusers' AdaLayerNormContinuous order -> ours."""
    return torch.cat(x.chunk(2)[::-1])


def dit_config_from_diffusers(cfg: Mapping[str, Any]) -> DiTConfig:
    """DiTTransformer2DModel config.json -> DiTConfig (out_channels = 2 * in_channels means learned sigma)."""
    check_options(cfg, DIT_OPTIONS, "DiTTransformer2DModel")
    heads, c_in = cfg.get("num_attention_heads", 16), cfg.get("in_channels", 4)
    c_out = cfg.get("out_channels") or c_in
    learned_sigma = c_out == 2 * c_in
    return DiTConfig(input_size=cfg.get("sample_size", 32), patch_size=cfg.get("patch_size", 2), in_channels=c_in,
                     out_channels=c_out // 2 if learned_sigma else c_out,
                     hidden_size=heads * cfg.get("attention_head_dim", 72), depth=cfg.get("num_layers", 28),
                     num_heads=heads, num_classes=cfg.get("num_embeds_ada_norm", 1000),
                     class_dropout_prob=0.1,  # diffusers' LabelEmbedding always has the null-class row
                     learned_sigma=learned_sigma, freq_shift=1.0, mlp_norm_eps=cfg.get("norm_eps", 1e-5))


def dit_state_from_diffusers(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """DiTTransformer2DModel state dict -> DiT's. diffusers stores a copy of the time / label embedder
    in every block; the copies must equal block 0's (they do in converted DiT checkpoints)."""
    shared = re.compile(r"transformer_blocks\.(\d+)\.norm1\.emb\.(.+)")
    kept = {}
    for key, value in state.items():
        m = shared.fullmatch(key)
        if m and m[1] != "0":
            first = state.get(f"transformer_blocks.0.norm1.emb.{m[2]}")
            if first is None or not torch.equal(value, first):
                raise CheckpointError(f"{key} differs from block 0's copy; DiT shares one embedder across blocks")
            continue
        kept[key] = value
    return rename_keys(kept, DIT_RULES, "diffusers DiTTransformer2DModel")


def mmdit_config_from_diffusers(cfg: Mapping[str, Any]) -> MMDiTConfig:
    """SD3Transformer2DModel config.json -> MMDiTConfig (SD3.5's dual-attention layers are not supported)."""
    if cfg.get("dual_attention_layers"):
        raise CheckpointError("SD3Transformer2DModel with dual_attention_layers (SD3.5 MMDiT-X) is not supported")
    check_options(cfg, {"qk_norm": QK_NORMS}, "SD3Transformer2DModel")
    heads, c_in = cfg.get("num_attention_heads", 18), cfg.get("in_channels", 16)
    D, caption_dim = heads * cfg.get("attention_head_dim", 64), cfg.get("caption_projection_dim", 1152)
    if caption_dim != D:
        raise CheckpointError(f"caption_projection_dim {caption_dim} must equal the model width {D} "
                              "(num_attention_heads * attention_head_dim)")
    return MMDiTConfig(sample_size=cfg.get("sample_size", 128), patch_size=cfg.get("patch_size", 2),
                       in_channels=c_in, out_channels=cfg.get("out_channels") or c_in, hidden_size=D,
                       depth=cfg.get("num_layers", 18), num_heads=heads,
                       context_dim=cfg.get("joint_attention_dim", 4096),
                       pooled_dim=cfg.get("pooled_projection_dim", 2048),
                       pos_embed_max_size=cfg.get("pos_embed_max_size", 96), qk_norm=cfg.get("qk_norm"))


def is_scale_shift(state: Mapping[str, Tensor], key: str) -> bool:
    """Whether `key` belongs to an AdaLayerNormContinuous linear (2D rows of scale, shift): the final norm and
    the text norm of the last (context_pre_only) block."""
    weight = state.get(key.rpartition(".")[0] + ".weight")
    return bool(SCALE_SHIFT.fullmatch(key)) and weight is not None and weight.shape[0] == 2 * weight.shape[1]


def mmdit_state_from_diffusers(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """SD3Transformer2DModel state dict -> MM-DiT's; AdaLayerNormContinuous rows are reordered to (shift, scale)."""
    state = {k: swap_halves(v) if is_scale_shift(state, k) else v for k, v in state.items()}
    return rename_keys(state, MMDIT_RULES, "diffusers SD3Transformer2DModel")


DIT = DiffusersModel(("DiTTransformer2DModel", "Transformer2DModel"), "transformer", "dit", dit_config_from_diffusers,
                     lambda state, _: dit_state_from_diffusers(state))
MMDIT = DiffusersModel(("SD3Transformer2DModel",), "transformer", "mmdit", mmdit_config_from_diffusers,
                       lambda state, _: mmdit_state_from_diffusers(state))


def load_diffusers_dit(folder: str | Path, device: str = "cpu", dtype: torch.dtype | None = None,
                       variant: str | None = None) -> nn.Module:
    """A DiT from a diffusers DiTTransformer2DModel folder (or a DiT pipeline folder; the hub's DiT checkpoints
    name the class Transformer2DModel, with norm_type ada_norm_zero)."""
    return DIT.load(folder, device, dtype, variant)


def load_diffusers_mmdit(folder: str | Path, device: str = "cpu", dtype: torch.dtype | None = None,
                         variant: str | None = None) -> nn.Module:
    """An MM-DiT from a diffusers SD3Transformer2DModel folder (or an SD3 pipeline folder)."""
    return MMDIT.load(folder, device, dtype, variant)
