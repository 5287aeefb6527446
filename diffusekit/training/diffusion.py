"""The diffusion trainer (SPEC §1, §4, §5, §6): one step is

    data -> (frozen autoencoder latents) -> conditions with CFG dropout -> t, eps -> denoiser.loss
    -> AdamW (+ accumulation, clipping) -> EMA,

run by the shared loop (`loop.run`). Each sample's randomness (t, noise, condition dropout, posterior sample)
comes from its own generator seeded by (seed, step, position in the global batch), and each process encodes
only its slice of the batch, so a resumed run, or the same run on K processes, computes what one uninterrupted
process would.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checkpoints import from_pretrained
from ..conditioning import load_text_encoder
from ..data import open_dataset
from ..denoisers import NetworkDenoiser
from ..images import save_grid
from ..models import build
from ..pipelines import Pipeline, generate, save_pipeline
from ..pipelines.inputs import low_res_condition, map_condition
from ..schedules import Schedule
from .batches import LatentCache
from .config import DiffusionSection, TrainConfig
from .loop import Processes, Trainer, autocast_enabled, run
from .state import RunFolder


@dataclass
class Diffusion:
    """What a diffusion training step works on: the trained network as run (DDP, compiled) and its weights, the
    EMA copy and its pipeline (schedule, conditioner, autoencoder), the optimizer and precision."""

    cfg: TrainConfig
    procs: Processes
    net: nn.Module  # the trained weights
    model: nn.Module  # net as run: DistributedDataParallel over several processes, torch.compiled if configured
    ema: nn.Module
    pipe: Pipeline  # of the EMA network
    denoiser: NetworkDenoiser  # of `model`
    opt: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    autocast: torch.autocast


def train(cfg: TrainConfig, resume: bool = True, force: bool = False) -> Path:
    """Train a diffusion model as configured; returns the exported model folder (EMA weights). `resume`
    continues from the run folder's last checkpoint (`force`: even with settings that differ from it)."""
    procs = Processes.init(cfg.train.device)
    device, T, D, L = procs.device, cfg.train, cfg.diffusion, cfg.low_res
    if T.batch_size % procs.world:
        raise ValueError(f"batch_size {T.batch_size} must be divisible by the {procs.world} processes")
    dataset = open_dataset(cfg.data, T.seed)
    resolution = (cfg.data.resolution, cfg.data.resolution)
    ae = from_pretrained(cfg.latent.autoencoder, device).eval().requires_grad_(False) if cfg.latent.autoencoder else None
    text_encoder = load_text_encoder(cfg.text.encoder, cfg.text.max_length, device) if cfg.text.encoder else None
    if L.factor and (ae is not None or cfg.data.resolution % L.factor):
        raise ValueError(f"super-resolution (low_res.factor {L.factor}) needs a pixel model whose resolution it divides")

    torch.manual_seed(T.seed)  # initial weights (and dropout) draw from the global generator
    net = build(cfg.model.type, cfg.model.config, device=device)
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    num_classes = getattr(dataset, "num_classes", None) if "class_labels" in net.cond_keys else None
    map_classes = tuple(getattr(dataset, "map_classes", ()))
    layout_classes = tuple(getattr(dataset, "layout_classes", ())) if "layout" in net.cond_keys else ()
    if "layout" in net.cond_keys and net.config.layout_classes != len(layout_classes):
        raise ValueError(f"a layout model on {cfg.data.dataset} needs layout_classes = {len(layout_classes)}, got "
                         f"{net.config.layout_classes}")
    pipe = Pipeline(ema, D.settings(), resolution, cfg.data.channels, num_classes, ae, text_encoder, cfg.text.encoder,
                    L.factor, L.noise, map_classes, layout_classes)
    if map_classes and net.config.in_channels != pipe.latent_channels + len(map_classes):
        raise ValueError(f"a map model on {cfg.data.dataset} takes {pipe.latent_channels} + {len(map_classes)} "
                         f"(one-hot map) input channels; the model's in_channels is {net.config.in_channels}")
    model = nn.parallel.DistributedDataParallel(net) if procs.world > 1 else net
    if T.compile:
        model = torch.compile(model)
    autocast = torch.autocast(device.type, dtype=torch.float16 if T.mixed_precision == "fp16" else torch.bfloat16,
                              enabled=autocast_enabled(T.mixed_precision, device))
    d = Diffusion(cfg, procs, net, model, ema, pipe, D.denoiser(model, pipe.schedule),
                  torch.optim.AdamW(net.parameters(), lr=T.lr, betas=T.betas, weight_decay=T.weight_decay),
                  torch.amp.GradScaler(device.type, enabled=T.mixed_precision == "fp16"), autocast)

    previews = range(cfg.sample.n * 4)  # the low-resolution images / maps of the preview grids
    low_res = F.avg_pool2d(torch.stack([dataset[i]["image"] for i in previews]), L.factor) if L.factor else None
    maps = torch.stack([dataset[i]["map"] for i in previews]) if map_classes else None
    layouts = torch.stack([dataset[i]["layout"] for i in previews]) if layout_classes else None
    trainer = Trainer({"model": net, "ema": ema}, {"opt": d.opt}, lambda data, index: step_diffusion(d, data, index),
                      lambda path: sample_grid(cfg, pipe, path, low_res, maps, layouts),
                      lambda path: save_pipeline(pipe, path),
                      T.batch_size * T.grad_accum, d.scaler)
    with RunFolder(T.out_dir, procs.main) as folder:
        if ae is not None and cfg.latent.cache:
            dataset = LatentCache(dataset, ae, folder.out / "latents.safetensors", device, procs.main)
        return run(cfg, procs, folder, dataset, trainer, torch.Generator().manual_seed(T.seed), resume, force)


def step_diffusion(d: Diffusion, data: Iterator[dict[str, Any]], index: int) -> dict[str, Tensor]:
    """One optimizer step of `train`: grad_accum micro-batches of loss, clipping, AdamW, EMA; the logged values."""
    T = d.cfg.train
    losses = []
    for micro in range(T.grad_accum):
        batch = d.procs.shard(next(data))
        x0, r = noised_inputs(d, batch, index, micro)
        with d.autocast:  # a frozen text encoder runs in the autocast dtype too (4x faster in bf16 on the CPU)
            cond = training_conditions(d, batch, x0, r)
        last = micro == T.grad_accum - 1 or d.procs.world == 1
        with (contextlib.nullcontext() if last else d.model.no_sync()), d.autocast:
            loss = d.denoiser.loss(x0, r["t"].to(x0.device), r["eps"].to(x0.device), cond,
                                   d.cfg.diffusion.min_snr_gamma or None).mean()
        d.scaler.scale(loss / T.grad_accum).backward()
        losses.append(loss.detach())
    d.scaler.unscale_(d.opt)
    grad_norm = nn.utils.clip_grad_norm_(d.net.parameters(), T.grad_clip if T.grad_clip > 0 else float("inf"))
    d.scaler.step(d.opt)
    d.scaler.update()
    d.opt.zero_grad(set_to_none=True)
    update_ema(d.ema, d.net, min(T.ema_decay, (1 + index) / (10 + index)))  # EMA warm-up
    return {"loss": torch.stack(losses).mean(), "grad_norm": grad_norm}


def noised_inputs(d: Diffusion, batch: dict[str, Any], index: int, micro: int) -> tuple[Tensor, dict[str, Tensor]]:
    """A micro-batch's clean diffusion states x0 (pixels, or latents: the posterior sampled or its mean, scaled)
    and its randomness (`draw`)."""
    cfg, device, ae = d.cfg, d.procs.device, d.pipe.autoencoder
    mean, std = latent_moments(batch, ae, device)
    posterior = std is not None and cfg.latent.sample_posterior
    L, channels = cfg.low_res, cfg.data.channels
    low_shape = (channels, *(s // L.factor for s in d.pipe.resolution)) if L.factor else None
    r = draw(cfg.train.seed, index, d.procs.positions(cfg.train.batch_size, micro * cfg.train.batch_size),
             tuple(mean.shape[1:]), d.pipe.schedule, cfg.diffusion, posterior, low_shape)
    x0 = mean if std is None else ae.scale(mean + std * r["posterior"].to(device) if posterior else mean)
    return x0, r


def latent_moments(batch: dict[str, Any], ae: nn.Module | None, device: torch.device) -> tuple[Tensor, Tensor | None]:
    """Pixels x0 (std None), or the latent posterior's mean and std (autoencoder units)."""
    if "mean" in batch:  # cached posteriors
        return batch["mean"].to(device), batch["std"].to(device)
    x = batch["image"].to(device)
    if ae is None:
        return x, None
    with torch.no_grad():
        return tuple(v.float() for v in ae.latent_moments(x.to(next(ae.parameters()).dtype)))


def training_conditions(d: Diffusion, batch: dict[str, Any], x0: Tensor, r: dict[str, Tensor]) -> dict[str, Tensor]:
    """The micro-batch's conditions, dropped to the null condition where u < p_uncond (CFG dropout), and for
    super-resolution the noise-augmented low-resolution input, for map models the one-hot map."""
    keys, device, D, L = d.pipe.conditioner.keys, d.procs.device, d.cfg.diffusion, d.cfg.low_res
    cond = d.pipe.conditioner(len(x0), batch.get("label") if "class_labels" in keys else None,
                              batch.get("caption") if "context" in keys else None, d.pipe.resolution,
                              batch.get("original_size"), batch.get("crop_top_left"), device,
                              batch.get("layout") if "layout" in keys else None)
    if cond and D.p_uncond:
        cond = d.pipe.conditioner.drop(cond, r["u"] < D.p_uncond)
    if L.factor:
        cond["concat"] = low_res_condition(F.avg_pool2d(x0, L.factor), d.pipe.resolution, r["low_res"].to(device),
                                           L.noise)
    if d.pipe.map_classes:
        cond["concat"] = map_condition(batch["map"].to(device), len(d.pipe.map_classes), x0.shape[-2:])
    return cond


@torch.no_grad()
def update_ema(ema: nn.Module, net: nn.Module, decay: float) -> None:
    for e, p in zip(ema.parameters(), net.parameters()):
        e.lerp_(p.detach(), 1 - decay)


def draw(seed: int, step: int, positions: range, shape: tuple[int, ...], schedule: Schedule, d: DiffusionSection,
         posterior: bool, low_res: tuple[int, ...] | None = None) -> dict[str, Tensor]:
    """The randomness of the samples at `positions` of a step's global batch, each from its own generator
    seeded by (seed, step, position): time t, noise eps (+ offset noise), the condition-dropout draw u,
    if `posterior` the latent posterior's noise, and the low-resolution input's noise augmentation (of
    shape `low_res`). Independent of how the batch is split."""
    out: dict[str, list[Tensor]] = {"t": [], "eps": [], "u": [], "posterior": [], "low_res": []}
    for i in positions:
        g = torch.Generator().manual_seed(((seed * 1_000_003 + step) * 1_000_003 + i) % 2**63)
        out["t"].append(schedule.sample_t(1, g, d.t_sampling, d.logit_mean, d.logit_std))
        eps = torch.randn(shape, generator=g)
        if d.offset_noise:
            eps = eps + d.offset_noise * torch.randn(shape[0], 1, 1, generator=g)
        out["eps"].append(eps)
        out["u"].append(torch.rand(1, generator=g))
        if posterior:
            out["posterior"].append(torch.randn(shape, generator=g))
        if low_res:
            out["low_res"].append(torch.randn(low_res, generator=g))
    return {k: torch.cat(v) if k in ("t", "u") else torch.stack(v) for k, v in out.items() if v}


def sample_grid(cfg: TrainConfig, pipe: Pipeline, path: Path, low_res: Tensor | None = None,
                maps: Tensor | None = None, layouts: Tensor | None = None) -> Path | None:
    """A PNG grid from the EMA model: one row per class, or the configured prompts, or unconditional (super-
    resolution models: of `low_res` images; map models: of `maps`; layout models: of `layouts`). A grid that
    comes out NaN is a warning (the loss, checked at every log line, decides whether to stop)."""
    S = cfg.sample
    g = torch.Generator().manual_seed(cfg.train.seed)
    labels, prompts, rows = None, None, None
    if pipe.num_classes:
        labels = torch.arange(pipe.num_classes).repeat_interleave(S.n)
        rows = [str(c) for c in range(pipe.num_classes)]
    elif pipe.text_encoder is not None:
        base = S.prompts or ["a large red circle", "a small blue square above a green triangle"]
        prompts = [p for p in base for _ in range(S.n)]
        rows = base
    n = len(labels) if labels is not None else len(prompts) if prompts else S.n * 4
    try:
        images = generate(pipe, n, labels=labels, prompts=prompts, sampler=S.sampler, steps=S.steps, cfg=S.cfg,
                          low_res=low_res, semantic_map=maps, layout=layouts, generator=g)
    except FloatingPointError as e:
        warnings.warn(f"preview {path.name} skipped: {e}")
        return None
    return save_grid(images, path, nrow=S.n, row_labels=rows, scale=2)


