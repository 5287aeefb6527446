"""diffusekit model folders: the network (config.json + model.safetensors, its config.json also recording the
diffusion settings, the training image size and the conditioning) and for latent models the autoencoder in
autoencoder/; `load_pipeline` also opens diffusers pipeline folders and SD single files (`foreign`)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from ..checkpoints import from_pretrained, read_config, staging_dir, write_model
from ..conditioning import load_text_encoder
from ..denoisers import DiffusionSettings
from ..guidance import NoisyClassifier, classifier_log_prob
from .foreign import load_diffusers_pipeline, load_sd_single_file
from .pipeline import Pipeline


def save_pipeline(pipe: Pipeline, path: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Write the model folder: network + settings, and the autoencoder in autoencoder/."""
    path = Path(path)
    extra = {"diffusion": dataclasses.asdict(pipe.settings), "image": {"resolution": list(pipe.resolution),
             "channels": pipe.channels}, "conditioning": {"num_classes": pipe.num_classes,
                                                          "text_encoder": pipe.text_encoder_name,
                                                          "low_res_factor": pipe.low_res_factor,
                                                          "low_res_noise": pipe.low_res_noise,
                                                          "map_classes": list(pipe.map_classes),
                                                          "layout_classes": list(pipe.layout_classes)}}
    with staging_dir(path) as tmp:  # one atomic replace, so a network never goes without its autoencoder
        write_model(pipe.net, tmp, dtype, extra)
        if pipe.autoencoder is not None:
            write_model(pipe.autoencoder, tmp / "autoencoder", dtype)
    return path


def load_classifier(path: str | Path, pipe: Pipeline) -> NoisyClassifier:
    """A noise-aware classifier folder (`training.classifier`) as classifier guidance's log p(y | x_t) for `pipe`,
    refused unless its times are those of pipe's diffusion settings."""
    meta = read_config(path)
    if "diffusion" not in meta or DiffusionSettings(**meta["diffusion"]) != pipe.settings:
        raise ValueError(f"classifier {path} was trained on another schedule than the model's "
                         f"({meta.get('diffusion')} vs {dataclasses.asdict(pipe.settings)})")
    return classifier_log_prob(from_pretrained(path, pipe.device).eval().requires_grad_(False))


def load_pipeline(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = torch.float32,
                  text_encoder: str | Path | None = None) -> Pipeline:
    """Load a model folder written by `save_pipeline` (or by the trainer), computing in `dtype` whatever
    precision the weights are stored in (None keeps the stored one); a diffusers pipeline folder
    (model_index.json) or an original Stable Diffusion single file (with the `text_encoder` folder for its
    prompts) loads through `diffusekit.interop`."""
    path = Path(path)
    if path.is_file():
        return load_sd_single_file(path, str(device), dtype, text_encoder=text_encoder)
    if text_encoder is not None:
        raise ValueError("a text encoder is given only with a Stable Diffusion single file (the folders name theirs)")
    if (path / "model_index.json").is_file():
        return load_diffusers_pipeline(path, str(device), dtype)
    meta = read_config(path)
    for key in ("diffusion", "image"):
        if key not in meta:
            raise ValueError(f"{path} holds a bare network, not a diffusion model (no {key!r} in config.json)")
    net = from_pretrained(path, device, dtype).eval()
    ae = from_pretrained(path / "autoencoder", device, dtype).eval() if (path / "autoencoder").is_dir() else None
    cond = meta.get("conditioning", {})
    text_encoder = load_text_encoder(cond["text_encoder"], device=device) if cond.get("text_encoder") else None
    return Pipeline(net, DiffusionSettings(**meta["diffusion"]), tuple(meta["image"]["resolution"]),
                    meta["image"]["channels"], cond.get("num_classes"), ae, text_encoder, cond.get("text_encoder", ""),
                    cond.get("low_res_factor", 0), cond.get("low_res_noise", 0.0), tuple(cond.get("map_classes", ())),
                    tuple(cond.get("layout_classes", ())))
