"""The MNIST classifier whose features and predictions score samples (see `diffusekit.evaluation`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn


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
