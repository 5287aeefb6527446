"""The run loop every trainer shares, and the diffusion trainer (SPEC §1, §4, §5, §6).

`run` reads top to bottom: resume from the run folder -> per step: learning rate, the trainer's step,
logs -> preview grids, atomic checkpoints and the exported model -> loss plot. A `Trainer` is what
differs: its modules and optimizers, one optimizer step, a preview and an export.

The diffusion step: data -> (frozen autoencoder latents) -> conditions with CFG dropout -> t, eps ->
denoiser.loss -> AdamW (+ accumulation, clipping) -> EMA. Each sample's randomness (t, noise, condition
dropout, posterior sample) comes from its own generator seeded by (seed, step, position in the global
batch), and each process encodes only its slice of the batch, so a resumed run, or the same run on K
processes, computes what one uninterrupted process would.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import signal
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..acceleration import native_dtype
from ..checkpoints import from_pretrained
from ..models import build
from ..conditioning import load_text_encoder
from ..images import save_grid
from ..pipelines.common import Pipeline, generate, low_res_condition, save_pipeline
from ..plots import line_png
from ..schedules import Schedule
from .config import AutoencoderTrainConfig, DiffusionSection, TrainConfig, to_dict
from .data import Batches, LatentCache, make_dataset
from .state import RunFolder, latest_checkpoint, read_record, save_checkpoint


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

    def positions(self, batch_size: int, offset: int = 0) -> range:
        """Positions of this process's samples in a global batch (plus `offset`)."""
        n = batch_size // self.world
        return range(offset + self.rank * n, offset + (self.rank + 1) * n)

    def shard(self, batch: dict[str, Any]) -> dict[str, Any]:
        """This process's slice of a global batch (tensors and lists alike)."""
        sl = self.positions(len(next(iter(batch.values()))))
        return {k: v[sl.start:sl.stop] for k, v in batch.items()}


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


# ----------------------------------------------------------------------------- the shared loop

@dataclass
class Trainer:
    """What differs between trainers; `run` does the rest."""

    modules: dict[str, nn.Module]  # checkpointed by name
    optimizers: dict[str, torch.optim.Optimizer]
    step: Callable[[Iterator[dict[str, Any]], int], dict[str, Tensor]]  # (data, step) -> logged values, "loss" first
    preview: Callable[[Path], Any]  # write a PNG of samples or reconstructions
    export: Callable[[Path], Path]  # write the model folder from the current weights
    images_per_step: int  # global images per optimizer step (for img/s)
    scaler: Any = None


def autocast_enabled(mixed_precision: str, device: torch.device) -> bool:
    """Whether the trainer autocasts: 'bf16' / 'fp16' always, 'auto' where `device` computes bf16 natively."""
    if mixed_precision == "auto":
        return native_dtype(device) == torch.bfloat16
    return mixed_precision != "no"


def learning_rate(cfg: TrainConfig | AutoencoderTrainConfig, step: int) -> float:
    """The factor on each optimizer's base rate: linear warm-up, then constant or cosine decay to 0."""
    t = cfg.train
    if step < t.warmup:
        return (step + 1) / t.warmup
    if t.lr_schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * (step - t.warmup) / max(1, t.steps - t.warmup)))
    return 1.0


def run(cfg: TrainConfig | AutoencoderTrainConfig, procs: Processes, folder: RunFolder, dataset: Any,
        trainer: Trainer, generator: torch.Generator, resume: bool = True, force: bool = False,
        desc: str = "training") -> Path:
    """Train to cfg.train.steps in the (locked) run folder; returns the exported model folder.

    `resume` continues from the folder's newest intact checkpoint (`force`: even with settings that
    differ from its own). Every checkpoint also exports the model, so model/ always holds the last
    checkpoint's weights; the first SIGINT / SIGTERM stops at the next step with a checkpoint."""
    T, out, config = cfg.train, folder.out, to_dict(cfg)
    for opt in trainer.optimizers.values():
        for group in opt.param_groups:
            group.setdefault("initial_lr", group["lr"])
    progress = (folder.resume(trainer.modules, trainer.optimizers, generator, config, trainer.scaler, force)
                if resume else folder.fresh())
    folder.write_config(config)
    data = iter(Batches(dataset, T.batch_size, T.seed, cfg.data.num_workers, progress))
    writer = tensorboard_writer(out) if T.tensorboard and procs.main else None
    exported, window, t_last = None, [], time.perf_counter()

    def checkpoint() -> None:
        nonlocal exported
        save_checkpoint(folder.ckpt_dir, progress, trainer.modules, trainer.optimizers, generator, config,
                        trainer.scaler, T.keep_last)
        trainer.export(out / "model")
        exported = progress.step

    with StopRequest(procs) as stop, tqdm(total=T.steps, initial=progress.step, disable=not procs.main,
                                          desc=desc) as bar:
        while progress.step < T.steps:
            factor = learning_rate(cfg, progress.step)
            for opt in trainer.optimizers.values():
                for group in opt.param_groups:
                    group["lr"] = group["initial_lr"] * factor
            window.append(trainer.step(data, progress.step))
            progress.step += 1
            bar.update(1)
            step = progress.step
            if step % T.log_every == 0 or step == T.steps:
                record = window_means(window)
                if not math.isfinite(record["loss"]):
                    raise FloatingPointError(f"loss is {record['loss']} at step {step}; last good checkpoint: "
                                             f"{latest_checkpoint(folder.ckpt_dir)}")
                rate = len(window) * trainer.images_per_step / (time.perf_counter() - t_last)
                record.update(step=step, lr=next(iter(trainer.optimizers.values())).param_groups[0]["lr"],
                              img_per_s=rate, epoch=progress.epoch)
                bar.set_postfix(loss=f"{record['loss']:.4f}", img_s=f"{rate:.1f}")
                if procs.main:
                    folder.log(record)
                    for key in record.keys() - {"step"} if writer else ():
                        writer.add_scalar(f"train/{key}", record[key], step)
                window, t_last = [], time.perf_counter()
            if procs.main and (step % T.sample_every == 0 or step == T.steps):
                bar.set_postfix_str(f"drawing samples/step_{step:07d}.png")  # (which can take a while)
                trainer.preview(out / "samples" / f"step_{step:07d}.png")
            stopping = stop.requested()
            if procs.main and (step % T.ckpt_every == 0 or step == T.steps or stopping):
                checkpoint()
            if stopping:
                raise KeyboardInterrupt(f"stopped at step {step}; checkpoint saved, run again to resume")
    if procs.main:
        if exported != progress.step:  # a rerun of a finished run, or one killed before its export
            trainer.export(out / "model")
        plot_log(out)
    if dist.is_initialized():
        dist.barrier()
    return out / "model"


def window_means(window: list[dict[str, Tensor]]) -> dict[str, float]:
    """Each logged value's mean over the steps since the last log line (one host sync)."""
    keys = list(window[-1])
    means = torch.stack([torch.stack([torch.as_tensor(w[k]).float() for w in window if k in w]).mean() for k in keys])
    return dict(zip(keys, means.tolist()))


# ----------------------------------------------------------------------------- the diffusion trainer

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


def train(cfg: TrainConfig, resume: bool = True, force: bool = False) -> Path:
    """Train a diffusion model as configured; returns the exported model folder (EMA weights). `resume`
    continues from the run folder's last checkpoint (`force`: even with settings that differ from it)."""
    procs = Processes.init(cfg.train.device)
    device, T, D = procs.device, cfg.train, cfg.diffusion
    if T.batch_size % procs.world:
        raise ValueError(f"batch_size {T.batch_size} must be divisible by the {procs.world} processes")
    dataset = make_dataset(cfg.data, T.seed)
    resolution = (cfg.data.resolution, cfg.data.resolution)
    ae = from_pretrained(cfg.latent.autoencoder, device).eval().requires_grad_(False) if cfg.latent.autoencoder else None
    text_encoder = load_text_encoder(cfg.text.encoder, cfg.text.max_length, device) if cfg.text.encoder else None

    torch.manual_seed(T.seed)  # initial weights (and dropout) draw from the global generator
    net = build(cfg.model.type, cfg.model.config, device=device)
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    num_classes = getattr(dataset, "num_classes", None) if "class_labels" in net.cond_keys else None
    L = cfg.low_res
    if L.factor and (ae is not None or cfg.data.resolution % L.factor):
        raise ValueError(f"super-resolution (low_res.factor {L.factor}) needs a pixel model whose resolution it divides")
    pipe = Pipeline(ema, D.settings(), resolution, cfg.data.channels, num_classes, ae, text_encoder, cfg.text.encoder,
                    L.factor, L.noise)
    opt = torch.optim.AdamW(net.parameters(), lr=T.lr, betas=T.betas, weight_decay=T.weight_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=T.mixed_precision == "fp16")
    model = nn.parallel.DistributedDataParallel(net) if procs.world > 1 else net
    if T.compile:
        model = torch.compile(model)
    denoiser = D.denoiser(model, pipe.schedule)
    autocast = torch.autocast(device.type, dtype=torch.float16 if T.mixed_precision == "fp16" else torch.bfloat16,
                              enabled=autocast_enabled(T.mixed_precision, device))
    keys = pipe.conditioner.keys

    def moments(batch: dict[str, Any]) -> tuple[Tensor, Tensor | None]:
        """Pixels x0 (std None), or the latent posterior's mean and std (autoencoder units)."""
        if "mean" in batch:  # cached posteriors
            return batch["mean"].to(device), batch["std"].to(device)
        x = batch["image"].to(device)
        if ae is None:
            return x, None
        with torch.no_grad():
            return tuple(v.float() for v in ae.latent_moments(x.to(next(ae.parameters()).dtype)))

    def step(data: Iterator[dict[str, Any]], index: int) -> dict[str, Tensor]:
        losses = []
        for micro in range(T.grad_accum):
            batch = procs.shard(next(data))
            mean, std = moments(batch)
            sample_posterior = std is not None and cfg.latent.sample_posterior
            low_shape = (cfg.data.channels, *(s // L.factor for s in resolution)) if L.factor else None
            r = draw(T.seed, index, procs.positions(T.batch_size, micro * T.batch_size), tuple(mean.shape[1:]),
                     pipe.schedule, D, sample_posterior, low_shape)
            x0 = mean if std is None else ae.scale(mean + std * r["posterior"].to(device) if sample_posterior else mean)
            cond = pipe.conditioner(len(x0), batch.get("label") if "class_labels" in keys else None,
                                    batch.get("caption") if "context" in keys else None, resolution,
                                    batch.get("original_size"), batch.get("crop_top_left"), device)
            if cond and D.p_uncond:
                cond = pipe.conditioner.drop(cond, r["u"] < D.p_uncond)
            if L.factor:
                cond["concat"] = low_res_condition(F.avg_pool2d(x0, L.factor), resolution, r["low_res"].to(device), L.noise)
            last = micro == T.grad_accum - 1 or procs.world == 1
            with (contextlib.nullcontext() if last else model.no_sync()), autocast:
                loss = denoiser.loss(x0, r["t"].to(device), r["eps"].to(device), cond, D.min_snr_gamma or None).mean()
            scaler.scale(loss / T.grad_accum).backward()
            losses.append(loss.detach())
        scaler.unscale_(opt)
        grad_norm = nn.utils.clip_grad_norm_(net.parameters(), T.grad_clip if T.grad_clip > 0 else float("inf"))
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        update_ema(ema, net, min(T.ema_decay, (1 + index) / (10 + index)))  # EMA warm-up
        return {"loss": torch.stack(losses).mean(), "grad_norm": grad_norm}

    low_res = F.avg_pool2d(torch.stack([dataset[i]["image"] for i in range(cfg.sample.n * 4)]), L.factor) if L.factor else None
    trainer = Trainer({"model": net, "ema": ema}, {"opt": opt}, step, lambda path: sample_grid(cfg, pipe, path, low_res),
                      lambda path: save_pipeline(pipe, path), T.batch_size * T.grad_accum, scaler)
    with RunFolder(T.out_dir, procs.main) as folder:
        if ae is not None and cfg.latent.cache:
            dataset = LatentCache(dataset, ae, folder.out / "latents.safetensors", device, procs.main)
        return run(cfg, procs, folder, dataset, trainer, torch.Generator().manual_seed(T.seed), resume, force)


def tensorboard_writer(out: Path):
    """A TensorBoard SummaryWriter under out/tensorboard, or None (with a warning) if tensorboard is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        warnings.warn("train.tensorboard is set but the tensorboard package is not installed; logging to log.jsonl only")
        return None
    return SummaryWriter(out / "tensorboard")


def sample_grid(cfg: TrainConfig, pipe: Pipeline, path: Path, low_res: Tensor | None = None) -> Path | None:
    """A PNG grid from the EMA model: one row per class, or the configured prompts, or unconditional (super-
    resolution models: of `low_res` images). A grid that comes out NaN is a warning (the loss, checked at every
    log line, decides whether to stop)."""
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
        images = generate(pipe, n, labels=labels, prompts=prompts, sampler=S.sampler, steps=S.steps,
                          cfg_scale=S.cfg_scale, low_res=low_res, generator=g)
    except FloatingPointError as e:
        warnings.warn(f"preview {path.name} skipped: {e}")
        return None
    return save_grid(images, path, nrow=S.n, row_labels=rows, scale=2)


def plot_log(out: Path) -> None:
    """loss.png from log.jsonl."""
    log = out / "log.jsonl"
    if log.is_file():
        rows = [r for line in log.read_text().splitlines() if (r := read_record(line))]
        if len(rows) > 1:
            line_png(out / "loss.png", [r["step"] for r in rows], [("training loss", [r["loss"] for r in rows])],
                     title="loss vs step", log_y=True)
