"""What the trainers draw from a dataset: resumable global batches, cached autoencoder latents."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from ..data import collate
from .state import Progress


class Batches:
    """Global batches in a seeded per-epoch permutation, resumable from (epoch, batch)."""

    def __init__(self, dataset, batch_size: int, seed: int, num_workers: int, progress: Progress):
        if len(dataset) < batch_size:
            raise ValueError(f"the dataset has {len(dataset)} samples, fewer than one batch of {batch_size}")
        self.dataset, self.batch_size, self.seed, self.workers = dataset, batch_size, seed, num_workers
        self.progress = progress

    def _order(self, epoch: int) -> list[list[int]]:
        perm = torch.randperm(len(self.dataset), generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch))
        n = len(perm) // self.batch_size
        return perm[:n * self.batch_size].reshape(n, self.batch_size).tolist()

    def __iter__(self) -> Iterator[dict[str, Any]]:
        while True:
            p = self.progress
            order = self._order(p.epoch)[p.batch:]
            if hasattr(self.dataset, "epoch"):
                self.dataset.epoch = p.epoch
            if hasattr(self.dataset, "get_batch"):
                batches = (self.dataset.get_batch(b) for b in order)
            else:
                batches = iter(torch.utils.data.DataLoader(self.dataset, batch_sampler=order, collate_fn=collate,
                                                           num_workers=self.workers))
            for batch in batches:
                p.batch += 1
                yield batch
            p.epoch, p.batch = p.epoch + 1, 0


class LatentCache:
    """A dataset encoded once by a frozen autoencoder: posterior means and stds (a VQ encoding with std
    0) in memory and on disk, with the labels or captions of the images."""

    def __init__(self, dataset, ae: nn.Module, path: Path, device: torch.device, main: bool):
        if getattr(dataset, "crop", None) is not None and (dataset.crop.random_crop or dataset.crop.random_flip):
            raise ValueError("latent caching needs deterministic images: turn off random_crop / random_flip or latent.cache")
        if main and not path.is_file():
            self._encode(dataset, ae, path, device)
        if dist.is_initialized():
            dist.barrier()
        data = load_file(path)
        self.mean, self.std = data["mean"], data["std"]
        self.labels = data.get("label")
        self.captions = json.loads((path.with_suffix(".json")).read_text()) if path.with_suffix(".json").is_file() else None

    @staticmethod
    @torch.no_grad()
    def _encode(dataset, ae: nn.Module, path: Path, device: torch.device) -> None:
        means, stds, labels, captions = [], [], [], []
        for i in tqdm(range(0, len(dataset), 64), desc="encoding latents"):
            batch = collate([dataset[j] for j in range(i, min(i + 64, len(dataset)))])
            mean, std = ae.latent_moments(batch["image"].to(device, next(ae.parameters()).dtype))
            means.append(mean.float().cpu())
            stds.append(std.float().cpu())
            labels += batch.get("label", torch.empty(0)).tolist()
            captions += batch.get("caption", [])
        tensors = {"mean": torch.cat(means), "std": torch.cat(stds)}
        path.parent.mkdir(parents=True, exist_ok=True)
        if labels:
            tensors["label"] = torch.tensor(labels)
        tmp = path.with_name(path.name + ".tmp")
        save_file(tensors, tmp)
        if captions:
            path.with_suffix(".json").write_text(json.dumps(captions))
        os.replace(tmp, path)

    def __len__(self) -> int:
        return len(self.mean)

    def get_batch(self, indices: list[int]) -> dict[str, Any]:
        idx = torch.as_tensor(indices)
        batch: dict[str, Any] = {"mean": self.mean[idx], "std": self.std[idx]}
        if self.labels is not None:
            batch["label"] = self.labels[idx]
        if self.captions is not None:
            batch["caption"] = [self.captions[i] for i in indices]
        return batch
