"""The run loop every trainer shares (the diffusion trainer's and the autoencoder's).

`run` reads top to bottom: resume from the run folder -> per step: learning rate, the trainer's step,
logs -> preview grids, atomic checkpoints and the exported model -> loss plot. A `Trainer` is what
differs: its modules and optimizers, one optimizer step, a preview and an export.
"""

from __future__ import annotations

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
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..acceleration import native_dtype
from ..plots import line_png
from .batches import Batches
from .config import AutoencoderTrainConfig, TrainConfig, to_dict
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
            set_learning_rate(cfg, trainer, progress.step)
            window.append(trainer.step(data, progress.step))
            progress.step += 1
            bar.update(1)
            step = progress.step
            if step % T.log_every == 0 or step == T.steps:
                record = log_record(window, trainer, progress, time.perf_counter() - t_last, folder)
                bar.set_postfix(loss=f"{record['loss']:.4f}", img_s=f"{record['img_per_s']:.1f}")
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


def set_learning_rate(cfg: TrainConfig | AutoencoderTrainConfig, trainer: Trainer, step: int) -> None:
    """Every optimizer's rate at `step`: its base rate times `learning_rate`'s factor."""
    factor = learning_rate(cfg, step)
    for opt in trainer.optimizers.values():
        for group in opt.param_groups:
            group["lr"] = group["initial_lr"] * factor


def log_record(window: list[dict[str, Tensor]], trainer: Trainer, progress: Any, seconds: float,
               folder: RunFolder) -> dict[str, float]:
    """The log line of the steps in `window` (which took `seconds`): their means, the step, learning rate, images
    a second and epoch; FloatingPointError naming the step and the last good checkpoint if the loss is not finite."""
    record = window_means(window)
    if not math.isfinite(record["loss"]):
        raise FloatingPointError(f"loss is {record['loss']} at step {progress.step}; last good checkpoint: "
                                 f"{latest_checkpoint(folder.ckpt_dir)}")
    record.update(step=progress.step, lr=next(iter(trainer.optimizers.values())).param_groups[0]["lr"],
                  img_per_s=len(window) * trainer.images_per_step / seconds, epoch=progress.epoch)
    return record


def window_means(window: list[dict[str, Tensor]]) -> dict[str, float]:
    """Each logged value's mean over the steps since the last log line (one host sync)."""
    keys = list(window[-1])
    means = torch.stack([torch.stack([torch.as_tensor(w[k]).float() for w in window if k in w]).mean() for k in keys])
    return dict(zip(keys, means.tolist()))


def tensorboard_writer(out: Path):
    """A TensorBoard SummaryWriter under out/tensorboard, or None (with a warning) if tensorboard is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        warnings.warn("train.tensorboard is set but the tensorboard package is not installed; logging to log.jsonl only")
        return None
    return SummaryWriter(out / "tensorboard")


def plot_log(out: Path) -> None:
    """loss.png from log.jsonl."""
    log = out / "log.jsonl"
    if log.is_file():
        rows = [r for line in log.read_text().splitlines() if (r := read_record(line))]
        if len(rows) > 1:
            line_png(out / "loss.png", [r["step"] for r in rows], [("training loss", [r["loss"] for r in rows])],
                     title="loss vs step", log_y=True)
