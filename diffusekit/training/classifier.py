"""The noise-aware classifier of classifier guidance: trained on digits noised as a diffusion model's schedule
noises them, x_t = a_t x0 + b_t eps, at uniform times, with cross-entropy; saved with those diffusion settings."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..checkpoints import read_config, save_pretrained
from ..data import MNIST
from ..denoisers import DiffusionSettings
from ..models import build
from ..models.classifier import NoisyClassifier


def train_noisy_classifier(model_folder: str | Path, steps: int = 3000, batch: int = 128, holdout: int = 1000,
                           lr: float = 2e-3, seed: int = 0, progress: bool = True) -> tuple[NoisyClassifier, dict]:
    """Train on the first 9,000 bundled digits under the schedule of the model in `model_folder` (random shifts of
    up to 2 pixels); returns the model and its held-out accuracy on the last 1,000 at a few noise levels."""
    settings = DiffusionSettings(**read_config(model_folder)["diffusion"])
    schedule = settings.make_schedule()
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    train, test = MNIST(indices=slice(0, 10_000 - holdout)), MNIST(indices=slice(10_000 - holdout, None))
    model = build("noisy_classifier", {})
    opt = torch.optim.AdamW(model.parameters(), lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps)
    for _ in tqdm(range(steps), disable=not progress, desc="training the noisy classifier"):
        idx = torch.randint(0, len(train), (batch,), generator=g)
        x0 = F.pad(train.images[idx], (2, 2, 2, 2), value=-1)
        dx, dy = torch.randint(0, 5, (2,), generator=g).tolist()
        x0 = x0[..., dy:dy + 28, dx:dx + 28]
        t = schedule.sample_t(batch, g)
        a, b = (c.float()[:, None, None, None] for c in schedule.alpha_sigma(t))
        x_t = a * x0 + b * torch.randn(x0.shape, generator=g)
        loss = F.cross_entropy(model(x_t, t.float()), train.labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    return model, noisy_accuracy(model, schedule, test.images, test.labels, g)


@torch.no_grad()
def noisy_accuracy(model: NoisyClassifier, schedule, images, labels, g: torch.Generator) -> dict[str, float]:
    """Accuracy at t = 0, T/4, T/2, 3T/4 (schedule units) on noised images."""
    out = {}
    for frac in (0.0, 0.25, 0.5, 0.75):
        t = torch.full((len(images),), round(frac * schedule.t_max), dtype=torch.float64)
        a, b = (c.float()[:, None, None, None] for c in schedule.alpha_sigma(t))
        x_t = a * images + b * torch.randn(images.shape, generator=g)
        out[f"t={int(t[0])}"] = (model(x_t, t.float()).argmax(1) == labels).float().mean().item()
    return out


def save_noisy_classifier(model: NoisyClassifier, model_folder: str | Path, accuracy: dict, path: str | Path) -> Path:
    """The classifier folder, recording the diffusion settings its times refer to and its held-out accuracy."""
    settings = read_config(model_folder)["diffusion"]
    return save_pretrained(model, path, extra={"diffusion": settings, "heldout_accuracy": accuracy,
                                               "schedule_of": Path(model_folder).name})
