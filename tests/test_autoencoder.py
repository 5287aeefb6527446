"""Latent-diffusion autoencoders (SPEC §6): parity with diffusers' AutoencoderKL / VQModel and with original
single-file SD checkpoints, checkpoint round trips and errors, compile, posterior sampling, tiling."""

import importlib.util
import re

import pytest
import torch
import torch.nn.functional as F

from diffusekit import checkpoints, models
from diffusekit.checkpoints import CheckpointError
from diffusekit.interop.diffusers_vae import (load_diffusers_vae, load_diffusers_vq, vae_config_from_diffusers,
                                              vae_state_from_diffusers, vq_config_from_diffusers)
from diffusekit.interop.ldm_vae import vae_state_from_ldm
from diffusekit.models.autoencoder import (AutoencoderConfig, AutoencoderKL, DiagonalGaussian, VQAutoencoder,
                                           VQAutoencoderConfig, sd_vae_config, tiled)

from .conftest import gen

needs_diffusers = pytest.mark.skipif(importlib.util.find_spec("diffusers") is None, reason="diffusers not installed")
TOL = 1e-4
TINY = dict(block_out_channels=(16, 32), layers_per_block=2, norm_num_groups=8,
            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
OURS = dict(channels=16, channel_mult=(1, 2), num_res_blocks=2, groups=8)


def randomize(model: torch.nn.Module, scale: float = 0.05) -> torch.nn.Module:
    """Perturb every parameter (norm affines, biases, ...) so that parity is not trivially true."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen(p.numel())))
    return model.eval()


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return (a - b).abs().max().item()


def diffusers_kl(tmp_path, **kw):
    from diffusers import AutoencoderKL as DiffusersKL

    ref = randomize(DiffusersKL(**TINY, latent_channels=4, **kw))
    ref.save_pretrained(tmp_path / "vae")
    return ref, load_diffusers_vae(tmp_path / "vae").eval()


def tiny_kl(**kw) -> AutoencoderKL:
    return randomize(AutoencoderKL(AutoencoderConfig(**OURS, **kw)))


# --- parity with diffusers -------------------------------------------------------------------------------------

@needs_diffusers
@pytest.mark.parametrize("kw", [{}, dict(use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.1)])
def test_kl_matches_diffusers(tmp_path, kw):
    ref, ours = diffusers_kl(tmp_path, **kw)
    x, z = torch.randn(2, 3, 16, 16, generator=gen(1)), torch.randn(2, 4, 8, 8, generator=gen(2))
    with torch.no_grad():
        post, ref_post = ours.encode(x), ref.encode(x).latent_dist
        assert max_diff(post.mean, ref_post.mean) < TOL and max_diff(post.logvar, ref_post.logvar) < TOL
        assert max_diff(ours.decode(z), ref.decode(z).sample) < TOL
    assert ours.config.scaling_factor == ref.config.scaling_factor
    assert ours.config.shift_factor == (ref.config.shift_factor or 0.0)


@needs_diffusers
def test_vq_matches_diffusers(tmp_path):
    from diffusers import VQModel

    ref = randomize(VQModel(**TINY, latent_channels=3, vq_embed_dim=5, num_vq_embeddings=32))
    x = torch.randn(2, 3, 16, 16, generator=gen(1))
    with torch.no_grad():  # a codebook spread like the encodings, so that many codes are used
        h = ref.encode(x).latents
        ref.quantize.embedding.weight.copy_(h.mean((0, 2, 3)) + h.std((0, 2, 3)) * torch.randn(32, 5, generator=gen(3)))
    ref.save_pretrained(tmp_path / "vq")
    ours = load_diffusers_vq(tmp_path / "vq").eval()
    with torch.no_grad():
        h, ref_h = ours.encode(x), ref.encode(x).latents
        (z_q, loss, idx), (ref_zq, ref_loss, (_, _, ref_idx)) = ours.quantize(h), ref.quantize(ref_h)
        assert max_diff(h, ref_h) < TOL and max_diff(z_q, ref_zq) < TOL and abs(loss - ref_loss) < TOL
        assert torch.equal(idx.flatten(), ref_idx) and idx.unique().numel() >= 8
        assert max_diff(ours.decode(z_q), ref.decode(ref_h).sample) < TOL
        torch.testing.assert_close(ours.quantizer.lookup(idx), z_q)
        assert max_diff(ours(x)[0], ref(x).sample) < TOL


def diffusers_to_ldm(state: dict, levels: int) -> dict:
    """Test-local diffusers -> original SD key mapping (verified against diffusers' own converter below)."""
    up = lambda m: f"up.{levels - 1 - int(m[1])}"  # noqa: E731
    subs = [(r"conv_norm_out", "norm_out"), (r"conv_shortcut", "nin_shortcut"),
            (r"down_blocks\.(\d+)\.resnets\.", r"down.\1.block."),
            (r"down_blocks\.(\d+)\.downsamplers\.0\.", r"down.\1.downsample."),
            (r"up_blocks\.(\d+)\.resnets\.", lambda m: f"{up(m)}.block."),
            (r"up_blocks\.(\d+)\.upsamplers\.0\.", lambda m: f"{up(m)}.upsample."),
            (r"mid_block\.resnets\.(\d)", lambda m: f"mid.block_{int(m[1]) + 1}"),
            (r"mid_block\.attentions\.0\.", "mid.attn_1."), (r"attn_1\.group_norm", "attn_1.norm"),
            (r"attn_1\.to_(q|k|v)", r"attn_1.\1"), (r"attn_1\.to_out\.0", "attn_1.proj_out")]
    out = {}
    for key, value in state.items():
        for pattern, repl in subs:
            key = re.sub(pattern, repl, key)
        out["first_stage_model." + key] = value[:, :, None, None] if "attn_1" in key and value.ndim == 2 else value
    return out


@needs_diffusers
def test_ldm_single_file_matches_diffusers(tmp_path):
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    ref, _ = diffusers_kl(tmp_path)
    ref_state = ref.state_dict()
    others = {"model.diffusion_model.out.weight": torch.zeros(1), "cond_stage_model.w": torch.zeros(1)}  # not the VAE
    sd = {**diffusers_to_ldm(ref_state, 2), **others}
    assert any(v.ndim == 4 and "attn_1.q" in k for k, v in sd.items())  # 1x1 convs, as in the original files
    converted = convert_ldm_vae_checkpoint(sd, dict(ref.config))
    assert converted.keys() == ref_state.keys() and all(torch.equal(converted[k], v) for k, v in ref_state.items())

    config = vae_config_from_diffusers(dict(ref.config))
    ours = models.build("autoencoder_kl", config, device="meta")
    ours = checkpoints.load_weights(ours, vae_state_from_ldm(sd, config)).eval()
    x, z = torch.randn(2, 3, 16, 16, generator=gen(1)), torch.randn(2, 4, 8, 8, generator=gen(2))
    with torch.no_grad():
        assert max_diff(ours.encode(x).mean, ref.encode(x).latent_dist.mean) < TOL
        assert max_diff(ours.decode(z), ref.decode(z).sample) < TOL
    with pytest.raises(CheckpointError, match="first_stage_model"):
        vae_state_from_ldm({"model.diffusion_model.w": torch.zeros(1)}, config)
    with pytest.raises(CheckpointError, match="unknown keys"):
        vae_state_from_ldm({**sd, "first_stage_model.encoder.extra.weight": torch.zeros(1)}, config)


@needs_diffusers
def test_deprecated_attention_names_and_unknown_keys(tmp_path):
    ref, ours = diffusers_kl(tmp_path)
    old_names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    old = {}
    for key, value in ref.state_dict().items():
        for new, name in old_names.items():
            if f".attentions.0.{new}." in key:
                key, value = key.replace(new, name), value[:, :, None, None] if value.ndim == 2 else value
        old[key] = value
    state = vae_state_from_diffusers(old)
    assert state.keys() == ours.state_dict().keys()
    assert all(torch.equal(state[k], v) for k, v in ours.state_dict().items())
    with pytest.raises(CheckpointError, match="unknown keys.*encoder.mystery"):
        vae_state_from_diffusers({**ref.state_dict(), "encoder.mystery.weight": torch.zeros(1)})
    with pytest.raises(CheckpointError, match="lacks"):
        vae_state_from_diffusers({k: v for k, v in ref.state_dict().items() if "to_k" not in k})


def test_foreign_configs_rejected():
    with pytest.raises(CheckpointError, match="DownEncoderBlock2D"):
        vae_config_from_diffusers({**TINY, "down_block_types": ["DownEncoderBlock2D", "AttnDownEncoderBlock2D"]})
    with pytest.raises(CheckpointError, match="norm_type"):
        vq_config_from_diffusers({**TINY, "norm_type": "spatial"})
    assert vq_config_from_diffusers({**TINY, "latent_channels": 3}).embed_dim == 3


# --- checkpoints ---------------------------------------------------------------------------------------------

def test_save_load_round_trip(tmp_path):
    x = torch.randn(1, 3, 16, 16, generator=gen(1))
    vq = randomize(VQAutoencoder(VQAutoencoderConfig(**OURS, num_embeddings=16)))
    for model in [tiny_kl(scaling_factor=0.5), vq]:
        path = checkpoints.save_pretrained(model, tmp_path / model.model_type)
        loaded = checkpoints.from_pretrained(path).eval()
        assert type(loaded) is type(model) and loaded.config == model.config
        with torch.no_grad():
            assert torch.equal(loaded.to_latent(x), model.to_latent(x))
            assert torch.equal(loaded.from_latent(model.to_latent(x)), model.from_latent(model.to_latent(x)))


@needs_diffusers
def test_mismatched_checkpoint_raises(tmp_path):
    diffusers_kl(tmp_path)
    cfg = tmp_path / "vae" / "config.json"
    cfg.write_text(cfg.read_text().replace('"latent_channels": 4', '"latent_channels": 8'))
    with pytest.raises(CheckpointError, match="shape mismatches"):
        load_diffusers_vae(tmp_path / "vae")
    state = {k: v for k, v in tiny_kl().state_dict().items() if "mid.attn" not in k}
    with pytest.raises(CheckpointError, match="missing keys"):
        checkpoints.load_weights(AutoencoderKL(AutoencoderConfig(**OURS)), state)
    cfg.write_text(cfg.read_text().replace('"AutoencoderKL"', '"VQModel"'))
    with pytest.raises(CheckpointError, match="holds a VQModel"):
        load_diffusers_vae(tmp_path / "vae")


def test_sd_vae_parameter_count():
    model = models.build("autoencoder_kl", sd_vae_config(), device="meta")
    assert sum(p.numel() for p in model.parameters()) == 83_653_863
    assert model.downsample_factor == 8 and model.config.latent_channels == 4 and model.config.scaling_factor == 0.18215


def test_compile_fullgraph():
    model = tiny_kl()
    x, z = torch.randn(1, 3, 16, 16, generator=gen(1)), torch.randn(1, 4, 8, 8, generator=gen(2))
    encode = torch.compile(model.encode, fullgraph=True, backend="eager")
    decode = torch.compile(model.decode, fullgraph=True, backend="eager")
    with torch.no_grad():
        assert max_diff(encode(x).mean, model.encode(x).mean) < 1e-6
        assert max_diff(decode(z), model.decode(z)) < 1e-6


# --- posterior, latents, errors, tiling ----------------------------------------------------------------------

def test_posterior_sampling():
    mean = torch.randn(4, 4, 128, 128, generator=gen(1))  # 262k samples: the tolerances below are ~5 standard errors
    post = DiagonalGaussian(torch.cat([mean, torch.full_like(mean, 2 * torch.tensor(0.3).log())], dim=1))  # std 0.3
    a, b, c = post.sample(gen(5)), post.sample(gen(5)), post.sample(gen(6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    n = (a - mean) / 0.3
    assert abs(n.mean()) < 0.01 and abs(n.std() - 1) < 0.01
    assert torch.equal(post.mode(), mean)
    torch.testing.assert_close(post.kl(), 0.5 * (mean.square() + 0.09 - 1 - torch.tensor(0.09).log()).sum((1, 2, 3)))
    assert DiagonalGaussian(torch.full((1, 2, 1, 1), 100.0)).logvar.item() == 20.0  # clamped as in LDM


def test_latent_scaling_and_shift():
    model = tiny_kl(scaling_factor=0.5, shift_factor=0.2)
    x = torch.randn(2, 3, 16, 16, generator=gen(1))
    with torch.no_grad():
        post = model.encode(x)
        torch.testing.assert_close(model.to_latent(x), (post.mean - 0.2) * 0.5)
        torch.testing.assert_close(model.to_latent(x, gen(3)), (post.sample(gen(3)) - 0.2) * 0.5)
        torch.testing.assert_close(model.from_latent(model.to_latent(x)), model.decode(post.mean))
        recon, posterior = model(x, gen(4))
    assert recon.shape == x.shape and posterior.kl().shape == (2,)


def test_bad_inputs():
    model = tiny_kl()
    for bad in [torch.zeros(1, 4, 16, 16), torch.zeros(3, 16, 16), torch.zeros(1, 3, 15, 16)]:
        with pytest.raises(ValueError, match="image"):
            model.encode(bad)
    with pytest.raises(ValueError, match="latent"):
        model.decode(torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match="tile_size"):
        model.encode(torch.zeros(1, 3, 16, 16), tile_size=7)
    with pytest.raises(ValueError, match="codebook"):
        VQAutoencoder(VQAutoencoderConfig(**OURS, quant_conv=False, embed_dim=3))


def test_tiled_blending_is_exact_for_local_maps():
    x = torch.randn(2, 3, 32, 24, generator=gen(1))
    torch.testing.assert_close(tiled(lambda t: F.avg_pool2d(t, 2), x, 8, 2, 0.5), F.avg_pool2d(x, 2))
    up = lambda t: F.interpolate(t, scale_factor=2.0)  # noqa: E731
    torch.testing.assert_close(tiled(up, x, 6, 2, 2), up(x))


def test_tiled_encode_decode_close_to_untiled():
    """Tiles see their own GroupNorm statistics and attention, so a random tiny model agrees only roughly;
    a misplaced or mis-weighted tile would give a relative error near 1 or more."""
    model = tiny_kl()
    x = F.interpolate(torch.randn(1, 3, 8, 8, generator=gen(1)), size=(48, 48), mode="bilinear")  # smooth image
    with torch.no_grad():
        mean = model.encode(x).mean
        torch.testing.assert_close(model.encode(x, tile_size=48).mean, mean)  # one tile is the plain encoder
        pairs = [(mean, model.encode(x, tile_size=32).mean), (model.decode(mean), model.decode(mean, tile_size=16))]
        for full, tile in pairs:
            assert tile.shape == full.shape and (tile - full).norm() / full.norm() < 0.4
