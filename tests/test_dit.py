"""DiT: parity with diffusers' DiTTransformer2DModel, positions at any grid, adaLN-Zero, loading, sizes."""

import dataclasses

import numpy as np
import pytest
import torch

from diffusekit import checkpoints, models
from diffusekit.checkpoints import CheckpointError
from diffusekit.interop.diffusers_transformers import (dit_config_from_diffusers, dit_state_from_diffusers,
                                                       load_diffusers_dit)
from diffusekit.models.dit import DIT_CONFIGS, DiT, DiTConfig, sincos_2d

diffusers = pytest.importorskip("diffusers")

TINY = dict(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2,
            sample_size=8, num_embeds_ada_norm=10)


@torch.no_grad()
def randomize(model: torch.nn.Module, std: float = 0.1) -> torch.nn.Module:
    """Add noise to every weight (also those initialised to zero or one) so that parity is not trivial."""
    for p in model.parameters():
        p.add_(torch.randn_like(p) * std)
    return model.eval()


def tiny_diffusers_dit(patch_size: int = 2, **kw):
    """A random DiTTransformer2DModel whose per-block embedders are copies of block 0's, as in real checkpoints."""
    dm = randomize(diffusers.DiTTransformer2DModel(**{**TINY, "patch_size": patch_size, **kw}))
    for block in dm.transformer_blocks[1:]:
        block.norm1.emb.load_state_dict(dm.transformer_blocks[0].norm1.emb.state_dict())
    return dm


def convert(dm) -> DiT:
    model = models.build("dit", dit_config_from_diffusers(dm.config), device="meta")
    return checkpoints.load_weights(model, dit_state_from_diffusers(dm.state_dict())).eval()


def inputs(h: int = 8, w: int = 8):
    return torch.randn(3, 4, h, w), torch.tensor([0.5, 321.7, 999.0]), torch.tensor([0, 7, 10])  # 10 = null class


def mae_sincos(dim: int, h: int, w: int) -> np.ndarray:
    """Independent reference: MAE's 2-D sin-cos table (numpy, w first) for an h x w grid."""
    def one(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    grid = np.stack(np.meshgrid(np.arange(w, dtype=np.float64), np.arange(h, dtype=np.float64)))  # (2, h, w)
    return np.concatenate([one(dim // 2, grid[0]), one(dim // 2, grid[1])], axis=1)


@pytest.mark.parametrize("patch_size", [2, 4])
@torch.no_grad()
def test_parity_with_diffusers(patch_size):
    dm = tiny_diffusers_dit(patch_size)
    model = convert(dm)
    assert model.config.learned_sigma and model.downsample_factor == patch_size
    x, t, y = inputs()
    ref = dm(x, t, y).sample
    out = model(x, t, y)
    assert out.shape == (3, 8, 8, 8)
    assert (out - ref).abs().max() < 1e-4


@torch.no_grad()
def test_positions_at_other_grids():
    dm = tiny_diffusers_dit()
    model = convert(dm)
    # at the training grid our positions are diffusers' table; elsewhere they are fresh sin-cos for the grid
    assert torch.allclose(sincos_2d(16, 4, 4).float(), dm.pos_embed.pos_embed[0], atol=1e-6)
    assert np.allclose(sincos_2d(16, 3, 5).numpy(), mae_sincos(16, 3, 5), atol=1e-12)
    dm.pos_embed.base_size = 6  # makes diffusers compute plain (uninterpolated) sin-cos for a 6 x 6 grid
    x, t, y = inputs(12, 12)
    assert (model(x, t, y) - dm(x, t, y).sample).abs().max() < 1e-4
    x, t, y = inputs(6, 10)  # non-square 3 x 5 tokens: block 0 sees patch tokens + the fresh table
    seen = {}
    model.blocks[0].register_forward_pre_hook(lambda m, args: seen.update(x=args[0]))
    assert model(x, t, y).shape == (3, 8, 6, 10)
    patches = model.x_embedder(x).flatten(2).transpose(1, 2)
    assert torch.allclose(seen["x"], patches + torch.from_numpy(mae_sincos(16, 3, 5)).float(), atol=1e-6)


@torch.no_grad()
def test_interpolated_positions():
    """Position interpolation: on a grid larger than the trained one the positions span the trained range, which
    is what diffusers' PatchEmbed does by default (base_size = the trained grid); the trained grid is unchanged."""
    dm = tiny_diffusers_dit()  # trained on 8 x 8 inputs: 4 x 4 tokens
    model = convert(dm)
    model.interpolate_positions = True
    x, t, y = inputs(16, 16)  # 8 x 8 tokens
    assert model.position_scale(8, 8) == (0.5, 0.5)
    assert (model(x, t, y) - dm(x, t, y).sample).abs().max() < 1e-4
    table = sincos_2d(16, 8, 8, model.position_scale(8, 8)).reshape(8, 8, 16)
    assert torch.equal(table[::2, ::2].reshape(16, 16), sincos_2d(16, 4, 4))  # every other token: a trained one
    plain = model(x, t, y)
    model.interpolate_positions = False
    assert (model(x, t, y) - plain).abs().max() > 1e-2  # extrapolated positions give another prediction
    x, t, y = inputs(8, 8)
    on = model(x, t, y)
    model.interpolate_positions = True
    assert torch.equal(model(x, t, y), on)  # the trained grid, and smaller ones, keep token indices
    assert model.position_scale(2, 4) == (1.0, 1.0) and model.position_scale(4, 12) == (1.0, 1 / 3)


def test_adaln_zero_init_is_identity():
    model = DiT(DiTConfig(input_size=8, hidden_size=32, depth=2, num_heads=2, num_classes=5))
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([10.0, 500.0])
    assert model.null_class == 5 and model.y_embedder.num_embeddings == 6
    assert torch.equal(model(x, t, torch.tensor([1, 5])), torch.zeros(2, 8, 8, 8))
    tokens, c = torch.randn(2, 16, 32), torch.randn(2, 32)
    assert torch.equal(model.blocks[0](tokens, c), tokens)
    assert model.blocks[0].qkv.weight.abs().sum() > 0  # only the modulations and the output start at zero


def test_load_diffusers_folder_and_round_trip(tmp_path):
    dm = tiny_diffusers_dit()
    dm.save_pretrained(tmp_path / "pipe" / "transformer")
    model = load_diffusers_dit(tmp_path / "pipe").eval()  # a pipeline folder: its transformer/ is used
    x, t, y = inputs()
    with torch.no_grad():
        assert (model(x, t, y) - dm(x, t, y).sample).abs().max() < 1e-4
        checkpoints.save_pretrained(model, tmp_path / "ours")
        again = checkpoints.from_pretrained(tmp_path / "ours").eval()
        assert torch.equal(again(x, t, y), model(x, t, y))


def test_mismatched_checkpoints(tmp_path):
    dm = tiny_diffusers_dit()
    state = dm.state_dict()
    model = models.build("dit", dit_config_from_diffusers(dm.config), device="meta")
    extra = {**state, "transformer_blocks.0.norm9.weight": torch.ones(2)}
    with pytest.raises(CheckpointError, match="unexpected keys.*transformer_blocks.0.norm9.weight"):
        checkpoints.load_weights(model, dit_state_from_diffusers(extra))
    del state["transformer_blocks.1.attn1.to_v.bias"]
    with pytest.raises(CheckpointError, match=r"blocks.1.qkv.bias.*\['k', 'q'\]"):
        dit_state_from_diffusers(state)
    state = dm.state_dict()
    key = "transformer_blocks.1.norm1.emb.timestep_embedder.linear_1.bias"
    state[key] = state[key] + 1
    with pytest.raises(CheckpointError, match="linear_1.bias differs from block 0"):
        dit_state_from_diffusers(state)
    dm.save_pretrained(tmp_path)
    config = (tmp_path / "config.json").read_text().replace('"num_layers": 2', '"num_layers": 3')
    (tmp_path / "config.json").write_text(config)
    with pytest.raises(CheckpointError, match="missing keys.*blocks.2.adaLN_modulation"):
        load_diffusers_dit(tmp_path)
    with pytest.raises(CheckpointError, match="norm_type='ada_norm'"):
        dit_config_from_diffusers({**dm.config, "norm_type": "ada_norm"})


def test_compile_fullgraph():
    model = DiT(DiTConfig(input_size=8, hidden_size=32, depth=2, num_heads=2, num_classes=5))
    randomize(model)
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([3.5, 700.0]), torch.tensor([0, 5])
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    with torch.no_grad():
        assert torch.allclose(compiled(x, t, y), model(x, t, y), atol=1e-6)


def test_published_sizes():
    model = models.build("dit", DIT_CONFIGS["DiT-XL/2"](input_size=32, in_channels=4), device="meta")
    assert model.config.num_classes == 1000 and model.config.learned_sigma and model.out_channels == 8
    count = sum(p.numel() for p in model.parameters())
    # DiT's published 675,129,632 also counts its frozen pos_embed table ((32/2)^2 x 1152); ours is computed in forward
    assert count + (32 // 2) ** 2 * 1152 == 675_129_632
    assert set(DIT_CONFIGS) >= {"DiT-XL/2", "DiT-XL/4", "DiT-XL/8", "DiT-L/2", "DiT-B/2", "DiT-S/2"}
    assert DIT_CONFIGS["DiT-B/4"]().patch_size == 4 and DIT_CONFIGS["DiT-S/8"]().hidden_size == 384


def test_bad_inputs():
    model = DiT(DiTConfig(input_size=8, patch_size=4, hidden_size=32, depth=1, num_heads=2, num_classes=5))
    t, y = torch.tensor([1.0, 2.0]), torch.tensor([1, 2])
    with pytest.raises(ValueError, match="not divisible by the patch size 4"):
        model(torch.randn(2, 4, 8, 6), t, y)
    with pytest.raises(ValueError, match="class-conditional"):
        model(torch.randn(2, 4, 8, 8), t)
    with pytest.raises(ValueError, match=r"shape \[B, 4, H, W\]"):
        model(torch.randn(2, 3, 8, 8), t, y)
    with pytest.raises(ValueError, match="class_labels must have shape"):
        model(torch.randn(2, 4, 8, 8), t, torch.tensor([1]))
    uncond = DiT(dataclasses.replace(model.config, num_classes=0))
    assert uncond.null_class is None and uncond(torch.randn(2, 4, 8, 8), t).shape == (2, 8, 8, 8)
    with pytest.raises(ValueError, match="unconditional"):
        uncond(torch.randn(2, 4, 8, 8), t, y)


@torch.no_grad()
def test_generate_interpolates_positions_on_request():
    """generate(interpolate_positions=True) samples a DiT above its size with interpolated positions (other
    samples than without), and leaves the model as it was; other networks refuse it."""
    from diffusekit.denoisers import DiffusionSettings
    from diffusekit.pipelines import Pipeline, generate, load_pipeline
    from diffusekit.bundled import ASSETS

    net = DiT(DiTConfig(input_size=8, in_channels=1, hidden_size=32, depth=1, num_heads=2, num_classes=3,
                        learned_sigma=False))
    randomize(net)
    pipe = Pipeline(net, DiffusionSettings(), (8, 8), 1, 3)
    kw = dict(labels=torch.tensor([1]), height=16, width=16, steps=2, cfg=2.0)
    plain = generate(pipe, 1, generator=torch.Generator().manual_seed(0), **kw)
    inter = generate(pipe, 1, interpolate_positions=True, generator=torch.Generator().manual_seed(0), **kw)
    assert not net.interpolate_positions and (plain - inter).abs().max() > 1e-3
    with pytest.raises(ValueError, match="option of DiT models"):
        generate(load_pipeline(ASSETS / "mnist_unet"), 1, labels=torch.tensor([1]), steps=1, interpolate_positions=True)
