"""MM-DiT: parity with diffusers' SD3Transformer2DModel (with and without QK RMSNorm, at several latent
sizes), position cropping, loading, published sizes, bad inputs."""

import pytest
import torch

from diffusekit import checkpoints, models
from diffusekit.checkpoints import CheckpointError
from diffusekit.interop.diffusers_transformers import (load_diffusers_mmdit, mmdit_config_from_diffusers,
                                                       mmdit_state_from_diffusers)
from diffusekit.models.mmdit import MMDIT_CONFIGS, MMDiT, MMDiTConfig

from .test_dit import randomize

diffusers = pytest.importorskip("diffusers")

TINY = dict(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
            num_attention_heads=2, joint_attention_dim=12, caption_projection_dim=16, pooled_projection_dim=10,
            pos_embed_max_size=12)


def tiny_diffusers_sd3(**kw):
    dm = randomize(diffusers.SD3Transformer2DModel(**{**TINY, **kw}))
    with torch.no_grad():
        dm.pos_embed.pos_embed.add_(0.1 * torch.randn_like(dm.pos_embed.pos_embed))  # a stored table: check its mapping
    return dm


def convert(dm) -> MMDiT:
    model = models.build("mmdit", mmdit_config_from_diffusers(dm.config), device="meta")
    return checkpoints.load_weights(model, mmdit_state_from_diffusers(dm.state_dict())).eval()


def inputs(h: int = 8, w: int = 8):
    """x, t = sigma * 1000 (fractional), context [B, L, 12], pooled [B, 10]."""
    return torch.randn(2, 4, h, w), torch.tensor([37.5, 812.25]), torch.randn(2, 5, 12), torch.randn(2, 10)


@pytest.mark.parametrize("qk_norm", [None, "rms_norm"])
@torch.no_grad()
def test_parity_with_diffusers(qk_norm):
    dm = tiny_diffusers_sd3(qk_norm=qk_norm)
    model = convert(dm)
    assert model.config.qk_norm == qk_norm and model.downsample_factor == 2
    assert model.joint_blocks[-1].context_block.pre_only and not model.joint_blocks[0].context_block.pre_only
    for h, w in [(8, 8), (6, 10), (24, 4)]:  # default size, smaller non-square, up to pos_embed_max_size
        x, t, context, pooled = inputs(h, w)
        ref = dm(x, context, pooled, t).sample
        out = model(x, t, context, pooled)
        assert out.shape == (2, 4, h, w)
        assert (out - ref).abs().max() < 1e-4


def test_position_crop():
    model = MMDiT(MMDiTConfig(sample_size=8, in_channels=4, hidden_size=16, depth=1, num_heads=2, context_dim=12,
                              pooled_dim=10, pos_embed_max_size=6))
    table = model.pos_embed.reshape(6, 6, 16)
    assert torch.equal(model.cropped_pos_embed(2, 4)[0], table[2:4, 1:5].reshape(8, 16))
    x, t, context, pooled = inputs(14, 8)
    with pytest.raises(ValueError, match="token grid 7x4 exceeds pos_embed_max_size 6"):
        model(x, t, context, pooled)


def test_load_diffusers_folder_and_round_trip(tmp_path):
    dm = tiny_diffusers_sd3(qk_norm="rms_norm")
    dm.save_pretrained(tmp_path / "sd3", max_shard_size="20KB")
    assert (tmp_path / "sd3" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    model = load_diffusers_mmdit(tmp_path / "sd3").eval()  # from shards
    x, t, context, pooled = inputs(6, 8)
    with torch.no_grad():
        assert (model(x, t, context, pooled) - dm(x, context, pooled, t).sample).abs().max() < 1e-4
        checkpoints.save_pretrained(model, tmp_path / "ours")
        again = checkpoints.from_pretrained(tmp_path / "ours").eval()
        assert torch.equal(again(x, t, context, pooled), model(x, t, context, pooled))


def test_mismatched_checkpoints():
    dm = tiny_diffusers_sd3()
    model = models.build("mmdit", mmdit_config_from_diffusers(dm.config), device="meta")
    state = dm.state_dict()
    del state["transformer_blocks.0.ff_context.net.2.weight"]
    state["transformer_blocks.0.attn.norm_added_q.weight"] = torch.ones(8)  # a qk-norm weight for a model without
    with pytest.raises(CheckpointError, match="missing keys.*joint_blocks.0.context_block.mlp.proj_out.weight.*"
                                              "unexpected keys.*joint_blocks.0.context_block.q_norm.weight"):
        checkpoints.load_weights(model, mmdit_state_from_diffusers(state))
    with pytest.raises(CheckpointError, match="dual_attention_layers"):
        mmdit_config_from_diffusers({**dm.config, "dual_attention_layers": [0, 1]})
    with pytest.raises(CheckpointError, match="caption_projection_dim 24 must equal the model width 16"):
        mmdit_config_from_diffusers({**dm.config, "caption_projection_dim": 24})
    with pytest.raises(CheckpointError, match="qk_norm='layer_norm'"):
        mmdit_config_from_diffusers({**dm.config, "qk_norm": "layer_norm"})


def test_compile_fullgraph():
    model = randomize(MMDiT(MMDiTConfig(sample_size=8, in_channels=4, hidden_size=16, depth=2, num_heads=2,
                                        context_dim=12, pooled_dim=10, pos_embed_max_size=12, qk_norm="rms_norm")))
    x, t, context, pooled = inputs(6, 8)
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    with torch.no_grad():
        assert torch.allclose(compiled(x, t, context, pooled), model(x, t, context, pooled), atol=1e-6)


@pytest.mark.parametrize("name", ["SD3-medium", "SD3.5-large"])
def test_published_sizes_match_diffusers(name):
    config = MMDIT_CONFIGS[name]()
    ours = models.build("mmdit", config, device="meta")
    with torch.device("meta"):
        ref = diffusers.SD3Transformer2DModel(
            sample_size=128, num_layers=config.depth, num_attention_heads=config.num_heads,
            caption_projection_dim=config.hidden_size, pos_embed_max_size=192, qk_norm=config.qk_norm)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters())
    assert ours.pos_embed.shape == ref.pos_embed.pos_embed.shape


def test_bad_inputs():
    model = MMDiT(MMDiTConfig(sample_size=8, in_channels=4, hidden_size=16, depth=1, num_heads=2, context_dim=12,
                              pooled_dim=10, pos_embed_max_size=12))
    x, t, context, pooled = inputs()
    with pytest.raises(ValueError, match="not divisible by the patch size 2"):
        model(torch.randn(2, 4, 8, 7), t, context, pooled)
    with pytest.raises(ValueError, match=r"needs context of shape \[2, L, 12\], got None"):
        model(x, t, pooled=pooled)
    with pytest.raises(ValueError, match=r"needs context of shape \[2, L, 12\], got \(2, 5, 7\)"):
        model(x, t, torch.randn(2, 5, 7), pooled)
    with pytest.raises(ValueError, match=r"needs pooled of shape \[2, 10\], got None"):
        model(x, t, context)
    with pytest.raises(ValueError, match="qk_norm must be one of"):
        MMDiTConfig(qk_norm="layer_norm")
    with pytest.raises(ValueError, match="hidden_size 30 must be divisible by num_heads"):
        MMDiTConfig(hidden_size=30, num_heads=3)
    assert torch.equal(model(x, t, context, pooled), torch.zeros_like(x))  # adaLN-Zero: a fresh model outputs 0
