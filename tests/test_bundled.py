"""The shipped artifacts: the class-conditional MNIST model the README samples, and the classifier."""

import torch
from safetensors import safe_open

from diffusekit.cli import BUNDLED
from diffusekit.evaluation import class_accuracy, load_mnist_classifier
from diffusekit.pipelines.common import generate, load_pipeline


def test_bundled_mnist_model_draws_the_requested_digits():
    pipe = load_pipeline(BUNDLED["mnist"])
    assert pipe.resolution == (28, 28) and pipe.num_classes == 10 and pipe.autoencoder is None
    with safe_open(BUNDLED["mnist"] / "model.safetensors", "pt") as f:  # shipped in half precision
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}
    assert next(pipe.net.parameters()).dtype == torch.float32  # computed in float32
    labels = torch.arange(10).repeat(3)
    images = generate(pipe, len(labels), labels=labels, steps=20, cfg_scale=3.0, generator=torch.Generator().manual_seed(1))
    assert images.shape == (30, 1, 28, 28)
    assert class_accuracy(load_mnist_classifier(), images, labels) >= 0.9
