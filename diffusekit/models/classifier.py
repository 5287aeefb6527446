"""The MNIST classifier whose features and predictions score samples (see `diffusekit.evaluation`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn

from .layers import timestep_embedding


@dataclass
class MNISTClassifierConfig:
    width: int = 32
    feature_dim: int = 128


class MNISTClassifier(nn.Module):
    """A small CNN for 28x28 digits in [-1, 1] (other sizes are resized): features() gives the
    penultimate [B, feature_dim] activations, forward() the 10 logits."""

    model_type = "mnist_classifier"
    config_class = MNISTClassifierConfig

    def __init__(self, config: MNISTClassifierConfig):
        super().__init__()
        self.config = config
        w = config.width

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(),
                                 nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(), nn.MaxPool2d(2))

        self.body = nn.Sequential(block(1, w), block(w, 2 * w), block(2 * w, 4 * w))  # 28 -> 14 -> 7 -> 3
        self.proj = nn.Linear(4 * w * 9, config.feature_dim)
        self.head = nn.Linear(config.feature_dim, 10)

    def features(self, x: Tensor) -> Tensor:
        if x.shape[1] == 3:
            x = x.mean(1, keepdim=True)
        if x.shape[-2:] != (28, 28):
            x = F.interpolate(x.float(), size=(28, 28), mode="bilinear", antialias=True, align_corners=False)
        return F.relu(self.proj(self.body(x).flatten(1)))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


@dataclass
class NoisyClassifierConfig:
    width: int = 32
    num_classes: int = 10
    in_channels: int = 1
    emb_dim: int = 128


class NoisyClassifier(nn.Module):
    """A time-conditioned CNN for classifier guidance: logits [B, num_classes] of noisy states x_t [B, C, H, W] at
    schedule times t [B] (the schedule's own units), each block shifted and scaled by the time embedding."""

    model_type = "noisy_classifier"
    config_class = NoisyClassifierConfig

    def __init__(self, config: NoisyClassifierConfig):
        super().__init__()
        self.config = config
        w, e = config.width, config.emb_dim
        self.time = nn.Sequential(nn.Linear(e, e), nn.SiLU(), nn.Linear(e, e))
        chs = [config.in_channels, w, 2 * w, 4 * w]
        self.convs = nn.ModuleList(nn.Conv2d(a, b, 3, padding=1) for a, b in zip(chs[:-1], chs[1:]))
        self.norms = nn.ModuleList(nn.GroupNorm(8, b) for b in chs[1:])
        self.films = nn.ModuleList(nn.Linear(e, 2 * b) for b in chs[1:])
        self.head = nn.Linear(4 * w, config.num_classes)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        emb = self.time(timestep_embedding(t.to(x.device), self.config.emb_dim).to(x.dtype))
        h = x
        for conv, norm, film in zip(self.convs, self.norms, self.films):
            scale, shift = film(emb)[:, :, None, None].chunk(2, dim=1)
            h = F.max_pool2d(F.silu(norm(conv(h)) * (1 + scale) + shift), 2)
        return self.head(h.mean((-2, -1)))
