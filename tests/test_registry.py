"""The model registry: every type name loads in a fresh process and round-trips through a model folder."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from diffusekit.checkpoints import from_pretrained, save_pretrained
from diffusekit.models import MODELS, build
from diffusekit.validation import ConfigError

ROOT = Path(__file__).resolve().parents[1]
TINY = {  # a few-parameter config per registered model type
    "unet": dict(in_channels=1, out_channels=1, channels=8, channel_mult=[1, 2], num_res_blocks=1,
                 attention_levels=[1], norm_groups=4, context_dim=None),
    "dit": dict(input_size=8, patch_size=2, in_channels=2, hidden_size=32, depth=1, num_heads=2, num_classes=3),
    "mmdit": dict(sample_size=8, patch_size=2, in_channels=2, hidden_size=32, depth=1, num_heads=2, context_dim=16,
                  pooled_dim=8, pos_embed_max_size=8),
    "autoencoder_kl": dict(in_channels=1, out_channels=1, channels=8, channel_mult=[1, 2], num_res_blocks=1,
                           latent_channels=2, groups=4),
    "autoencoder_vq": dict(in_channels=1, out_channels=1, channels=8, channel_mult=[1, 2], num_res_blocks=1,
                           latent_channels=2, groups=4, num_embeddings=16, embed_dim=2),
    "mnist_classifier": dict(width=4, feature_dim=8),
    "noisy_classifier": dict(width=8, num_classes=3, emb_dim=8),
    "clip_text": dict(vocab_size=50, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
                      max_position_embeddings=12, projection_dim=8),
}


def test_bundled_classifier_loads_in_a_fresh_process():
    """Loading by type name needs no import beyond diffusekit.checkpoints (no registration by side effect)."""
    code = ("import numpy as np, torch\n"
            "from diffusekit.checkpoints import from_pretrained\n"
            "model = from_pretrained('diffusekit/assets/mnist_classifier').eval()\n"
            "data = np.load('diffusekit/assets/mnist10k.npz')\n"
            "x = torch.from_numpy(data['images'][:200]).float().div(127.5).sub(1)[:, None]\n"
            "with torch.no_grad():\n"
            "    logits = model(x)\n"
            "accuracy = (logits.argmax(1).numpy() == data['labels'][:200]).mean()\n"
            "print(*logits.shape, accuracy)\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0, run.stderr
    n, classes, accuracy = run.stdout.split()
    assert (n, classes) == ("200", "10") and float(accuracy) > 0.95


def test_every_type_is_tested_and_named_by_its_class():
    assert set(TINY) == set(MODELS)
    assert all(cls.model_type == name for name, cls in MODELS.items())


@pytest.mark.parametrize("model_type", sorted(TINY))
def test_every_type_round_trips(model_type, tmp_path):
    model = build(model_type, TINY[model_type])
    loaded = from_pretrained(save_pretrained(model, tmp_path / model_type))
    assert type(loaded) is MODELS[model_type] and loaded.config == model.config
    state = model.state_dict()
    assert loaded.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in loaded.state_dict().items())


def test_unknown_type_suggests_a_name():
    with pytest.raises(ConfigError, match=r"unknown model type 'unte'.*did you mean 'unet'\?"):
        build("unte", {})


def test_from_pretrained_computes_half_precision_weights_in_float32_on_the_cpu():
    from diffusekit.bundled import ASSETS

    net = from_pretrained(ASSETS / "mnist_unet")  # stored in fp16
    assert {p.dtype for p in net.parameters()} == {torch.float32} and not net.training
    assert {p.dtype for p in from_pretrained(ASSETS / "mnist_unet", dtype=torch.float16).parameters()} == {torch.float16}


def test_loading_skips_initialisation_and_the_import_it_would_cost():
    """A model is built on the meta device with torch.nn.init skipped: initialising meta tensors would import
    torch._dynamo (over a second of every command's start-up) to fill values that the checkpoint replaces."""
    code = ("import sys; from diffusekit.bundled import MODELS; from diffusekit.pipelines import load_pipeline;"
            "pipe = load_pipeline(MODELS['mnist']); print('torch._dynamo' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "False\n"
    seeded = [torch.manual_seed(seed) and build("unet", TINY["unet"]).conv_in.weight for seed in (0, 0, 1)]
    assert torch.equal(seeded[0], seeded[1]) and not torch.equal(seeded[0], seeded[2])  # elsewhere it initialises
    assert 0.05 < seeded[0].std() < 1
