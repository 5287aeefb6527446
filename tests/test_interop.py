"""Whole pipelines from other people's files: tiny diffusers pipeline folders (latent text-to-image, pixel DDPM,
rectified flow) and an original-layout single-file SD 1.x checkpoint load as diffusekit Pipelines whose networks,
schedules, text encoder and samples reproduce diffusers'."""

import json
import string

import pytest
import torch
from diffusers import (AutoencoderKL, DDIMScheduler, DDPMScheduler, EulerDiscreteScheduler,
                       FlowMatchEulerDiscreteScheduler, StableDiffusionPipeline)
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from diffusekit.checkpoints import CheckpointError
from diffusekit.interop.diffusers_unet import load_diffusers_unet, unet_config_from_diffusers
from diffusekit.interop.diffusers_vae import vae_config_from_diffusers
from diffusekit.interop.components import settings_from_scheduler
from diffusekit.pipelines.foreign import load_diffusers_pipeline, load_sd_single_file
from diffusekit.pipelines import generate

from .conftest import gen
from .test_autoencoder import TINY as TINY_VAE
from .test_autoencoder import diffusers_to_ldm, max_diff, randomize
from .test_mmdit import inputs as sd3_inputs
from .test_mmdit import tiny_diffusers_sd3
from .test_unet import CASES, CTX, randomised, reference, to_ldm
from .test_unet import inputs as unet_inputs

TOL = 1e-4
SD_SCHEDULER = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1,
                    clip_sample=False, set_alpha_to_one=True)  # our DDIM's last step goes to t = -1 (a = 1) too


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models run fastest on one thread, and then do not fight other processes for the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def write_pipeline(folder, class_name: str, listed: dict | None = None, **components) -> None:
    """A diffusers pipeline folder: each component's save_pretrained and model_index.json ([library, class];
    `listed` adds entries without folders)."""
    index = {"_class_name": class_name, "_diffusers_version": "0.42.1", **(listed or {})}
    for name, obj in components.items():
        obj.save_pretrained(folder / name)
        index[name] = [type(obj).__module__.split(".")[0], type(obj).__name__]
    (folder / "model_index.json").write_text(json.dumps(index))


def tiny_clip(folder):
    """A tiny random CLIPTextModel and a CLIPTokenizer over a hand-written vocabulary (letters and two words)."""
    vocab = ["<|startoftext|>", "<|endoftext|>", *string.ascii_lowercase, *(c + "</w>" for c in string.ascii_lowercase),
             "ca", "cat</w>", "do", "dog</w>"]
    folder.mkdir(parents=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\nc a\nca t</w>\nd o\ndo g</w>\n")
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)
    torch.manual_seed(0)
    config = CLIPTextConfig(vocab_size=len(vocab), hidden_size=CTX, intermediate_size=37, num_attention_heads=4,
                            num_hidden_layers=2, max_position_embeddings=77, projection_dim=CTX, bos_token_id=0,
                            eos_token_id=1, pad_token_id=1)
    return tokenizer, CLIPTextModel(config).eval()


def tiny_sd_folder(folder, vocab):
    """A tiny SD 1.x-style pipeline folder (UNet2DConditionModel, AutoencoderKL, DDIM, CLIP) and its parts."""
    tokenizer, text_encoder = tiny_clip(vocab)
    parts = dict(unet=randomised(*CASES["sd1"]), vae=randomize(AutoencoderKL(**TINY_VAE, latent_channels=4)),
                 scheduler=DDIMScheduler(**SD_SCHEDULER), text_encoder=text_encoder, tokenizer=tokenizer)
    write_pipeline(folder, "StableDiffusionPipeline", {"safety_checker": [None, None]}, **parts)
    return folder, parts


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    return tiny_sd_folder(tmp_path_factory.mktemp("sd"), tmp_path_factory.mktemp("vocab") / "files")


@torch.no_grad()
def test_sd_folder_matches_diffusers(sd):
    folder, parts = sd
    pipe = load_diffusers_pipeline(folder)
    assert pipe.resolution == (32, 32) and pipe.channels == 3 and pipe.factor == 2 and pipe.num_classes is None
    assert pipe.text_encoder_name == str(folder / "text_encoder")
    x, t, theirs, kw = unet_inputs(parts["unet"])
    assert max_diff(pipe.net(x, t, **kw), reference(parts["unet"], x, t, theirs, kw)) < TOL
    image, z = torch.randn(2, 3, 16, 16, generator=gen(1)), torch.randn(2, 4, 8, 8, generator=gen(2))
    assert max_diff(pipe.autoencoder.encode(image).mean, parts["vae"].encode(image).latent_dist.mean) < TOL
    assert max_diff(pipe.autoencoder.decode(z), parts["vae"].decode(z).sample) < TOL
    ac = parts["scheduler"].alphas_cumprod.double()
    assert max_diff(pipe.schedule.alphas_cumprod, ac) < 1e-6
    prompts = ["a cat", "a dog and a cat"]
    ids = parts["tokenizer"](prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    tokens, _ = pipe.text_encoder(prompts)
    assert tokens.shape == (2, 77, CTX)
    assert max_diff(tokens, parts["text_encoder"](ids.input_ids).last_hidden_state) < 1e-5


@torch.no_grad()
def test_sd_folder_generates_like_diffusers(sd):
    """Two DDIM steps with CFG from the same initial latents: our generate equals StableDiffusionPipeline."""
    folder, parts = sd
    pipe = load_diffusers_pipeline(folder)
    ours = generate(pipe, 1, prompts=["a cat"], steps=2, cfg=3.0, generator=gen(5))
    assert ours.shape == (1, 3, 32, 32) and pipe.settings.grid(pipe.schedule, 2).tolist() == [501, 1, -1]
    ref = StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    latents = torch.randn(1, 4, 16, 16, generator=gen(5))
    theirs = ref("a cat", num_inference_steps=2, guidance_scale=3.0, latents=latents, output_type="pt").images
    assert max_diff(ours, 2 * theirs - 1) < TOL


@pytest.mark.parametrize("scheduler, expected", [
    (DDPMScheduler(beta_schedule="squaredcos_cap_v2"), dict(schedule="cosine", beta_range=None, spacing="leading")),
    (DDIMScheduler(rescale_betas_zero_snr=True, prediction_type="v_prediction", timestep_spacing="trailing"),
     dict(schedule="linear", zero_terminal_snr=True, prediction="v", spacing="trailing")),
    (EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.001, beta_end=0.012, prediction_type="sample"),
     dict(schedule="scaled_linear", beta_range=(0.001, 0.012), prediction="x0", spacing="linspace")),
])
def test_scheduler_settings(scheduler, expected):
    settings = settings_from_scheduler({**scheduler.config, "_class_name": type(scheduler).__name__})  # as saved
    assert {k: getattr(settings, k) for k in expected} == expected
    assert max_diff(settings.make_schedule().alphas_cumprod, scheduler.alphas_cumprod.double()) < 1e-6


@torch.no_grad()
def test_pixel_ddpm_folder(tmp_path):
    unet = randomised(*CASES["pixel_class_scale_shift"])
    write_pipeline(tmp_path, "DDPMPipeline", unet=unet, scheduler=DDPMScheduler())
    pipe = load_diffusers_pipeline(tmp_path)
    assert pipe.autoencoder is None and pipe.text_encoder is None and pipe.factor == 1
    assert pipe.resolution == (16, 16) and pipe.channels == 3 and pipe.num_classes == 5
    assert (pipe.settings.schedule, pipe.settings.prediction, pipe.settings.spacing) == ("linear", "eps", "leading")
    x, t, theirs, kw = unet_inputs(unet)
    assert max_diff(pipe.net(x, t, **kw), reference(unet, x, t, theirs, kw)) < TOL
    images = generate(pipe, 2, labels=torch.tensor([1, 4]), sampler="ddpm", steps=2, cfg=1.0, generator=gen(3))
    assert images.shape == (2, 3, 16, 16) and bool(images.isfinite().all())
    unet.save_pretrained(tmp_path / "variant", variant="fp16")  # diffusion_pytorch_model.fp16.safetensors
    again = load_diffusers_unet(tmp_path / "variant", dtype=torch.float64, variant="fp16")
    assert all(v.dtype == torch.float64 and torch.equal(v.float(), pipe.net.state_dict()[k])
               for k, v in again.state_dict().items())


@torch.no_grad()
def test_flow_matching_folder(tmp_path):
    transformer = tiny_diffusers_sd3()
    several = {name: ["transformers", "CLIPTextModelWithProjection"] for name in ("text_encoder", "text_encoder_2")}
    write_pipeline(tmp_path, "StableDiffusion3Pipeline", several, transformer=transformer,
                   vae=randomize(AutoencoderKL(**TINY_VAE, latent_channels=4)),
                   scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))
    pipe = load_diffusers_pipeline(tmp_path)
    s = pipe.settings
    assert (s.schedule, s.prediction, s.timestep_scale, s.shift) == ("flow", "flow", 1000, 3.0)
    assert pipe.text_encoder is None and pipe.resolution == (16, 16) and pipe.factor == 2
    x, t, context, pooled = sd3_inputs()
    assert max_diff(pipe.net(x, t, context, pooled), transformer(x, context, pooled, t).sample) < TOL


@torch.no_grad()
def test_sd_single_file(tmp_path):
    unet, vae = randomised(*CASES["sd1"]), randomize(AutoencoderKL(**TINY_VAE, latent_channels=4))
    unet_config, vae_config = unet_config_from_diffusers(dict(unet.config)), vae_config_from_diffusers(dict(vae.config))
    sd = {**to_ldm(unet.state_dict(), unet_config), **diffusers_to_ldm(vae.state_dict(), 2),
          "cond_stage_model.transformer.w": torch.zeros(2)}
    save_file({k: v.contiguous() for k, v in sd.items()}, tmp_path / "sd.safetensors")
    torch.save({"state_dict": sd}, tmp_path / "sd.ckpt")
    x, t, theirs, kw = unet_inputs(unet)
    z = torch.randn(2, 4, 8, 8, generator=gen(2))
    for name in ("sd.safetensors", "sd.ckpt"):
        pipe = load_sd_single_file(tmp_path / name, unet_config=unet_config, vae_config=vae_config, resolution=32)
        assert max_diff(pipe.net(x, t, **kw), reference(unet, x, t, theirs, kw)) < TOL
        assert max_diff(pipe.autoencoder.decode(z), vae.decode(z).sample) < TOL
    s = pipe.settings
    assert (s.schedule, s.prediction, s.spacing, s.steps_offset) == ("scaled_linear", "eps", "leading", 1)
    assert pipe.resolution == (32, 32) and pipe.text_encoder is None


@pytest.mark.parametrize("config, message", [
    (dict(_class_name="DDIMScheduler", trained_betas=[0.1, 0.2]), "trained_betas"),
    (dict(_class_name="DDIMScheduler", beta_schedule="sigmoid"), "beta_schedule='sigmoid'"),
    (dict(_class_name="DPMSolverMultistepScheduler", prediction_type="flow_prediction"), "prediction_type"),
    (dict(_class_name="EulerDiscreteScheduler", timestep_type="continuous"), "timestep_type"),
    (dict(_class_name="FlowMatchEulerDiscreteScheduler", use_dynamic_shifting=True), "use_dynamic_shifting"),
    (dict(_class_name="EDMEulerScheduler"), "EDMEulerScheduler is not supported"),
])
def test_unknown_scheduler_options_raise(config, message):
    with pytest.raises(CheckpointError, match=message):
        settings_from_scheduler(config)


def test_broken_folders_and_files(tmp_path):
    with pytest.raises(CheckpointError, match="not a diffusers pipeline folder.*model_index.json"):
        load_diffusers_pipeline(tmp_path)
    write_pipeline(tmp_path, "DDPMPipeline", unet=randomised(*CASES["pixel_attention"]),
                   scheduler=DDPMScheduler(beta_schedule="sigmoid"))
    with pytest.raises(CheckpointError, match="beta_schedule='sigmoid'"):
        load_diffusers_pipeline(tmp_path)
    DDPMScheduler().save_pretrained(tmp_path / "scheduler")
    (tmp_path / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_diffusers_pipeline(tmp_path)
    (tmp_path / "model_index.json").write_text(json.dumps({"scheduler": ["diffusers", "DDPMScheduler"]}))
    with pytest.raises(CheckpointError, match="names no unet or transformer"):
        load_diffusers_pipeline(tmp_path)
    (tmp_path / "sd.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_sd_single_file(tmp_path / "sd.safetensors")
    save_file({"model.diffusion_model.w": torch.zeros(1)}, tmp_path / "other.safetensors")
    with pytest.raises(CheckpointError, match="input_blocks"):
        load_sd_single_file(tmp_path / "other.safetensors")
