"""The diffusion trainer: `train(cfg)` reads top to bottom (SPEC §1, §4, §5, §6).

data -> (frozen autoencoder latents) -> conditions with CFG dropout -> t, eps -> denoiser.loss ->
AdamW (+ warm-up, clipping, accumulation) -> EMA -> logs, sample grids, atomic checkpoints.
All training randomness (t, noise, condition dropout, posterior samples, data order) comes from one
seeded generator over the *global* batch, so a resumed run, or the same run on K processes, computes
exactly what one uninterrupted process would.
"""

from __future__ import annotations

import copy
import math
import os
import signal
import threading
import time
import warnings
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..checkpoints import build, from_pretrained
from ..conditioning import load_text_encoder, micro_conditioning
from ..denoisers import NetworkDenoiser
from ..images import save_grid
from ..pipelines.common import DiffusionSettings, Pipeline, generate, save_pipeline
from ..plots import line_png
from .config import TrainConfig, to_dict
from .data import Batches, LatentCache, make_dataset
from .state import Progress, RunFolder, latest_checkpoint, read_record, save_checkpoint


# ----------------------------------------------------------------------------- processes

@dataclass
class Processes:
    """This process's place in a (torchrun) group: rank, world size, device."""

    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @classmethod
    def init(cls, device: str) -> "Processes":
        world = int(os.environ.get("WORLD_SIZE", 1))
        local = int(os.environ.get("LOCAL_RANK", 0))
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        dev = torch.device(f"cuda:{local}" if device == "cuda" else device)
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        if world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
        return cls(int(os.environ.get("RANK", 0)), world, dev)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def shard(self, x: Tensor) -> Tensor:
        """This process's slice of a global batch."""
        n = len(x) // self.world
        return x[self.rank * n:(self.rank + 1) * n]


# ----------------------------------------------------------------------------- conditions

class Conditioner:
    """A batch's conditions for the network, the null conditions, and CFG dropout."""

    def __init__(self, net: nn.Module, num_classes: int | None, text_encoder: Any, resolution: tuple[int, int]):
        self.keys = set(getattr(net, "cond_keys", ()))
        self.num_classes, self.text_encoder, self.resolution = num_classes, text_encoder, resolution
        self._empty = None

    def __call__(self, batch: dict[str, Any], device: torch.device) -> dict[str, Tensor]:
        cond: dict[str, Tensor] = {}
        if "class_labels" in self.keys:
            cond["class_labels"] = batch["label"].to(device)
        if "context" in self.keys:
            cond["context"], pooled = self.text_encoder(batch["caption"])
            if "pooled" in self.keys:
                cond["pooled"] = pooled
        if "time_ids" in self.keys:
            n = len(batch["image"])
            orig = batch.get("original_size", torch.tensor(self.resolution).expand(n, 2))
            crop = batch.get("crop_top_left", torch.zeros(n, 2))
            cond["time_ids"] = micro_conditioning(orig, crop, self.resolution).to(device)
        return cond

    def null(self, cond: dict[str, Tensor]) -> dict[str, Tensor]:
        """The null condition for each key (null class, empty prompt); micro-conditioning is kept."""
        null = dict(cond)
        if "class_labels" in cond:
            null["class_labels"] = torch.full_like(cond["class_labels"], self.num_classes)
        if "context" in cond:
            if self._empty is None:
                self._empty = self.text_encoder([""])
            tokens, pooled = self._empty
            null["context"] = tokens.expand_as(cond["context"])
            if "pooled" in cond:
                null["pooled"] = pooled.expand_as(cond["pooled"])
        return null

    def drop(self, cond: dict[str, Tensor], mask: Tensor) -> dict[str, Tensor]:
        """Replace the condition of samples where mask is True by the null condition (p_uncond)."""
        null = self.null(cond)
        return {k: torch.where(mask.reshape(-1, *[1] * (v.ndim - 1)).to(v.device), null[k], v) for k, v in cond.items()}


# ----------------------------------------------------------------------------- the loop

class StopRequest:
    """Turns the first SIGINT / SIGTERM into a request to stop at the next step boundary (so the
    checkpoint written then is consistent); a second signal interrupts at once."""

    def __init__(self, procs: Processes):
        self.procs, self.flag, self.saved = procs, False, {}

    def _handler(self, signum, frame) -> None:
        self.flag = True
        signal.signal(signum, self.saved[signum])

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            self.saved = {s: signal.signal(s, self._handler) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self.saved.items():
            signal.signal(s, h)

    def requested(self) -> bool:
        """Whether any process was asked to stop (all processes agree)."""
        if self.procs.world == 1:
            return self.flag
        flag = torch.tensor([float(self.flag)], device=self.procs.device)
        dist.all_reduce(flag)
        return bool(flag.item())


def step_boundary(cfg: TrainConfig, progress: Progress, procs: Processes, stop: StopRequest,
                  sample: Callable[[], Any], save: Callable[[], Any]) -> None:
    """After an optimizer step: the periodic sample grid and checkpoint, and a requested stop (after
    checkpointing, so that the run resumes exactly where it stopped)."""
    T, step = cfg.train, progress.step
    if procs.main and (step % T.sample_every == 0 or step == T.steps):
        sample()
    stopping = stop.requested()
    if procs.main and (step % T.ckpt_every == 0 or step == T.steps or stopping):
        save()
    if stopping:
        raise KeyboardInterrupt(f"stopped at step {step}; checkpoint saved, run again to resume")


def learning_rate(cfg: TrainConfig, step: int) -> float:
    """Linear warm-up, then constant or cosine decay to 0 at the last step."""
    t = cfg.train
    if step < t.warmup:
        return t.lr * (step + 1) / t.warmup
    if t.lr_schedule == "cosine":
        return t.lr * 0.5 * (1 + math.cos(math.pi * (step - t.warmup) / max(1, t.steps - t.warmup)))
    return t.lr


@torch.no_grad()
def update_ema(ema: nn.Module, net: nn.Module, decay: float) -> None:
    for e, p in zip(ema.parameters(), net.parameters()):
        e.lerp_(p.detach(), 1 - decay)


def train(cfg: TrainConfig, resume: bool = True, force: bool = False) -> Path:
    """Train a diffusion model as configured; returns the exported model folder (EMA weights). `resume`
    continues from the run folder's last checkpoint (`force`: even with settings that differ from it)."""
    procs = Processes.init(cfg.train.device)
    device, T = procs.device, cfg.train
    out = Path(T.out_dir)
    if T.batch_size % procs.world:
        raise ValueError(f"batch_size {T.batch_size} must be divisible by the {procs.world} processes")

    dataset = make_dataset(cfg.data, T.seed)
    resolution = (cfg.data.resolution, cfg.data.resolution)
    ae = None
    if cfg.latent.autoencoder:
        ae = from_pretrained(cfg.latent.autoencoder, device).eval().requires_grad_(False)
    text_encoder = load_text_encoder(cfg.text.encoder, cfg.text.max_length, device) if cfg.text.encoder else None

    torch.manual_seed(T.seed)  # initial weights (and dropout) draw from the global generator
    net = build(cfg.model.type, cfg.model.config, device=device)
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    num_classes = getattr(dataset, "num_classes", None) if "class_labels" in getattr(net, "cond_keys", ()) else None
    settings = DiffusionSettings(**{f.name: getattr(cfg.diffusion, f.name) for f in fields(DiffusionSettings)})
    pipe = Pipeline(ema, settings, resolution, cfg.data.channels, num_classes, ae, text_encoder, cfg.text.encoder)
    conditioner = Conditioner(net, num_classes, text_encoder, resolution)
    opt = torch.optim.AdamW(net.parameters(), lr=T.lr, betas=T.betas, weight_decay=T.weight_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=T.mixed_precision == "fp16")
    generator = torch.Generator().manual_seed(T.seed)
    with RunFolder(out, procs.main) as run:
        config_dict = to_dict(cfg)
        modules = {"model": net, "ema": ema}
        progress = run.resume(modules, {"opt": opt}, generator, config_dict, scaler, force) if resume else run.fresh()

        if ae is not None and cfg.latent.cache:
            dataset = LatentCache(dataset, ae, out / "latents.safetensors", device, procs.main)
        model = nn.parallel.DistributedDataParallel(net) if procs.world > 1 else net
        if T.compile:
            model = torch.compile(model)
        denoiser = NetworkDenoiser(model, pipe.schedule, settings.prediction, settings.timestep_scale)
        autocast = torch.autocast(device.type, dtype=torch.float16 if T.mixed_precision == "fp16" else torch.bfloat16,
                                  enabled=T.mixed_precision != "no")
        run.write_config(config_dict)

        def x0_of(batch: dict[str, Any]) -> Tensor:
            """The global batch's diffusion-space data x0 (latents for latent models)."""
            if "mean" in batch:  # cached posterior
                n = torch.randn(batch["mean"].shape, generator=generator) if cfg.latent.sample_posterior else 0
                return ae.scale((batch["mean"] + batch["std"] * n).to(device))
            x = batch["image"].to(device)
            if ae is None:
                return x
            with torch.no_grad():
                return ae.to_latent(x.to(next(ae.parameters()).dtype), generator if cfg.latent.sample_posterior else None).float()

        exported = None  # the step whose EMA weights model/ holds

        def checkpoint() -> None:
            nonlocal exported
            save_checkpoint(run.ckpt_dir, progress, modules, {"opt": opt}, generator, config_dict, scaler, T.keep_last)
            save_pipeline(pipe, out / "model")
            exported = progress.step

        data = iter(Batches(dataset, T.batch_size, T.seed, cfg.data.num_workers, progress))
        writer = tensorboard_writer(out) if T.tensorboard and procs.main else None
        window, t_last, seen = [], time.perf_counter(), 0
        with StopRequest(procs) as stop, tqdm(total=T.steps, initial=progress.step, disable=not procs.main,
                                              desc="training") as bar:
            while progress.step < T.steps:
                for group in opt.param_groups:
                    group["lr"] = learning_rate(cfg, progress.step)
                losses = []
                for micro in range(T.grad_accum):
                    batch = next(data)
                    x0 = x0_of(batch)
                    cond = conditioner(batch, device)
                    B = len(x0)
                    t = pipe.schedule.sample_t(B, generator, cfg.diffusion.t_sampling, cfg.diffusion.logit_mean,
                                               cfg.diffusion.logit_std)
                    eps = torch.randn(x0.shape, generator=generator)
                    if cfg.diffusion.offset_noise:
                        eps = eps + cfg.diffusion.offset_noise * torch.randn(*x0.shape[:2], 1, 1, generator=generator)
                    if cond and cfg.diffusion.p_uncond:
                        cond = conditioner.drop(cond, torch.rand(B, generator=generator) < cfg.diffusion.p_uncond)
                    x0, t, eps = procs.shard(x0), procs.shard(t).to(device), procs.shard(eps.to(device))
                    cond = {k: procs.shard(v) for k, v in cond.items()}
                    sync = micro == T.grad_accum - 1 or procs.world == 1
                    with (model.no_sync() if not sync else torch.enable_grad()), autocast:
                        loss = denoiser.loss(x0, t, eps, cond, cfg.diffusion.min_snr_gamma or None).mean()
                    scaler.scale(loss / T.grad_accum).backward()
                    losses.append(loss.detach())
                    seen += B
                scaler.unscale_(opt)
                grad_norm = nn.utils.clip_grad_norm_(net.parameters(), T.grad_clip if T.grad_clip > 0 else float("inf"))
                scaler.step(opt)
                scaler.update()
                opt.zero_grad(set_to_none=True)
                update_ema(ema, net, min(T.ema_decay, (1 + progress.step) / (10 + progress.step)))  # EMA warm-up
                progress.step += 1
                bar.update(1)
                window.append(torch.stack(losses).mean())

                if progress.step % T.log_every == 0 or progress.step == T.steps:
                    loss_value = torch.stack(window).mean().item()
                    if not math.isfinite(loss_value):
                        raise FloatingPointError(f"loss is {loss_value} at step {progress.step}; last good checkpoint: "
                                                 f"{latest_checkpoint(run.ckpt_dir)}")
                    rate = seen / (time.perf_counter() - t_last)
                    bar.set_postfix(loss=f"{loss_value:.4f}", img_s=f"{rate:.1f}")
                    if procs.main:
                        record = {"step": progress.step, "loss": loss_value, "lr": opt.param_groups[0]["lr"],
                                  "grad_norm": grad_norm.item(), "img_per_s": rate, "epoch": progress.epoch}
                        run.log(record)
                        for key in ("loss", "lr", "grad_norm", "img_per_s") if writer else ():
                            writer.add_scalar(f"train/{key}", record[key], progress.step)
                    window, t_last, seen = [], time.perf_counter(), 0
                step_boundary(cfg, progress, procs, stop, lambda: sample_grid(cfg, pipe, out / "samples" /
                                                                              f"step_{progress.step:07d}.png"), checkpoint)
        if procs.main:
            if exported != progress.step:  # a rerun of a finished run, or one killed before its export
                save_pipeline(pipe, out / "model")
            plot_log(out)
    if dist.is_initialized():
        dist.barrier()
    return out / "model"


def tensorboard_writer(out: Path):
    """A TensorBoard SummaryWriter under out/tensorboard, or None (with a warning) if tensorboard is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        warnings.warn("train.tensorboard is set but the tensorboard package is not installed; logging to log.jsonl only")
        return None
    return SummaryWriter(out / "tensorboard")


def sample_grid(cfg: TrainConfig, pipe: Pipeline, path: Path) -> Path:
    """A PNG grid from the EMA model: one row per class, or the configured prompts, or unconditional."""
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
    was_training = pipe.net.training
    images = generate(pipe, n, labels=labels, prompts=prompts, sampler=S.sampler, steps=S.steps,
                      cfg_scale=S.cfg_scale, generator=g)
    pipe.net.train(was_training)
    return save_grid(images, path, nrow=S.n, row_labels=rows, scale=2)


def plot_log(out: Path) -> None:
    """loss.png from log.jsonl."""
    log = out / "log.jsonl"
    if log.is_file():
        rows = [r for line in log.read_text().splitlines() if (r := read_record(line))]
        if len(rows) > 1:
            line_png(out / "loss.png", [r["step"] for r in rows], [("training loss", [r["loss"] for r in rows])],
                     title="loss vs step", log_y=True)
