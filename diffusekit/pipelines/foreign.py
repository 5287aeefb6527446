"""Whole pipelines from other people's files: a diffusers pipeline folder (model_index.json with unet/ or
transformer/, vae/, scheduler/, text_encoder/) or an original single-file Stable Diffusion 1.x checkpoint, each
part converted by `diffusekit.interop`."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from ..checkpoints import CheckpointError, read_state_dict
from ..conditioning import load_text_encoder
from ..denoisers import DiffusionSettings
from ..interop.common import DiffusersModel, assign, read_json
from ..interop.components import AUTOENCODERS, CLASS_CONDITIONAL, DENOISERS, SD1_SETTINGS, settings_from_scheduler
from ..interop.ldm_unet import unet_state_from_ldm
from ..interop.ldm_vae import vae_state_from_ldm
from ..models.autoencoder import AutoencoderConfig, sd_vae_config
from ..models.unet import UNetConfig, sd15_unet_config
from .pipeline import Pipeline


def text_encoders(name: str | Path, device: str, dtype: torch.dtype | None) -> nn.Module:
    """A Stable Diffusion 1.x / 2.x text encoder folder (tokenizer beside it: last hidden layer, 77 tokens), or a
    diffusers SDXL / SD3 pipeline folder (its stack of text encoders)."""
    return load_text_encoder(str(name), device=device, dtype=dtype)


def _component(folder: Path, name: str, class_name: str, table: Mapping[str, DiffusersModel], device: str,
               dtype: torch.dtype | None) -> nn.Module:
    if class_name not in table:
        raise CheckpointError(f"{folder / name} holds a {class_name}; supported there: {sorted(table)}")
    return table[class_name].load(folder / name, device, dtype).eval()


def load_diffusers_pipeline(folder: str | Path, device: str = "cpu", dtype: torch.dtype | None = None) -> Pipeline:
    """A diffusers pipeline folder as a Pipeline: the denoiser from unet/ (UNet2DConditionModel, UNet2DModel) or
    transformer/ (SD3Transformer2DModel, DiT), the autoencoder from vae/ or vqvae/ if there is one (pixel pipelines
    such as DDPMPipeline have none), the diffusion settings from scheduler/, the training resolution from the
    denoiser's sample_size times the autoencoder's factor.

    The text encoders are loaded when model_index.json lists each with its tokenizer: a single one (SD 1.x / 2.x,
    text_encoder_name = its folder), or SDXL's / SD3's stack (text_encoder_name = the pipeline folder; SD3's T5 may
    be left out, as diffusers allows); otherwise text_encoder is None."""
    folder = Path(folder)
    index = read_json(folder / "model_index.json", "diffusers pipeline folder")
    components = {k: v[1] for k, v in index.items() if not k.startswith("_") and isinstance(v, list) and v[-1]}
    net_name = next((n for n in ("unet", "transformer") if n in components), None)
    if net_name is None:
        raise CheckpointError(f"{folder}: model_index.json names no unet or transformer (it has {sorted(components)})")
    settings = settings_from_scheduler(read_json(folder / "scheduler" / "scheduler_config.json", "scheduler folder"))
    size = read_json(folder / net_name / "config.json", "diffusers model folder").get("sample_size")
    if size is None:
        raise CheckpointError(f"{folder / net_name}/config.json has no sample_size (the training resolution)")
    net = _component(folder, net_name, components[net_name], DENOISERS, device, dtype)
    ae_name = next((n for n in ("vae", "vqvae") if n in components), None)
    ae = _component(folder, ae_name, components[ae_name], AUTOENCODERS, device, dtype) if ae_name else None
    factor = ae.downsample_factor if ae is not None else 1
    h, w = (size, size) if isinstance(size, int) else size
    encoder, text_encoder_name = None, ""
    names = [n for n in components if n.startswith("text_encoder")]
    if names and all(n.replace("text_encoder", "tokenizer") in components for n in names):
        text_encoder_name = str(folder / "text_encoder" if names == ["text_encoder"] else folder)
        encoder = text_encoders(text_encoder_name, device, dtype)
    num_classes = net.config.num_classes if components[net_name] in CLASS_CONDITIONAL else None
    channels = (ae if ae is not None else net).config.in_channels
    return Pipeline(net, settings, (h * factor, w * factor), channels, num_classes=num_classes, autoencoder=ae,
                    text_encoder=encoder, text_encoder_name=text_encoder_name)


def load_sd_single_file(path: str | Path, device: str = "cpu", dtype: torch.dtype | None = None, *,
                        unet_config: UNetConfig | None = None, vae_config: AutoencoderConfig | None = None,
                        resolution: int = 512, text_encoder: str | Path | None = None) -> Pipeline:
    """An original single-file Stable Diffusion 1.x checkpoint (.safetensors; a .ckpt only when named explicitly,
    read weights-only) as a Pipeline: UNet and autoencoder converted (other configs, e.g. tiny test models, can be
    given), scaled_linear eps schedule with SD's leading spacing and steps offset 1.

    The file's CLIP text encoder (cond_stage_model.*) is not converted: pass `text_encoder`, a local transformers
    folder (e.g. an SD 1.x pipeline's text_encoder/ with tokenizer/ beside it), or supply `context` yourself."""
    unet_config, vae_config = unet_config or sd15_unet_config(), vae_config or sd_vae_config()
    sd = read_state_dict(path, device, dtype)
    net = assign("unet", unet_config, unet_state_from_ldm(sd, unet_config), str(path), dtype).eval()
    ae = assign("autoencoder_kl", vae_config, vae_state_from_ldm(sd, vae_config), str(path), dtype).eval()
    encoder = text_encoders(text_encoder, device, dtype) if text_encoder else None
    return Pipeline(net, DiffusionSettings(**SD1_SETTINGS), (resolution, resolution), vae_config.in_channels,
                    autoencoder=ae, text_encoder=encoder, text_encoder_name=str(text_encoder or ""))
