"""SDXL's and SD3's text-encoder stacks: tiny random diffusers pipelines, written by their own save_pretrained, load
with stacks whose (tokens, pooled), null conditions and whole generate runs equal diffusers' encode_prompt and
__call__; long prompts are truncated with a warning; the CLI samples a diffusers folder and takes single files."""

import string
import warnings

import pytest
import torch
from diffusers import (AutoencoderKL, EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline,
                       StableDiffusionXLPipeline)
from safetensors.torch import save_file
from transformers import (CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer, T5Config,
                          T5EncoderModel, T5Tokenizer)

from diffusekit.checkpoints import CheckpointError
from diffusekit.bundled import model_folder
from diffusekit.cli import main
from diffusekit.conditioning import SD3TextEncoder, SDXLTextEncoder, load_text_encoder
from diffusekit.pipelines.foreign import load_diffusers_pipeline
from diffusekit.pipelines import generate, load_pipeline, save_pipeline

from .conftest import gen
from .test_autoencoder import TINY as TINY_VAE
from .test_autoencoder import max_diff, randomize
from .test_interop import TOL, _one_thread, tiny_clip
from .test_mmdit import tiny_diffusers_sd3
from .test_unet import CASES, randomised

pytestmark = pytest.mark.usefixtures(_one_thread.__name__)
PROMPTS, NEGATIVE = ["a cat", "a dog and a cat"], ["dog", "a"]
SIZES = {"sdxl": (32, 48), "sd3": (16, 24), "sd3_no_t5": (16, 24)}  # non-square: time_ids are (h, w)


def clips(folder, *dims: tuple[type, int, int]) -> tuple[CLIPTokenizer, list]:
    """The hand-written CLIP tokenizer and tiny random CLIP text models of (class, hidden size, projection dim)."""
    tokenizer, base = tiny_clip(folder)
    models = []
    for i, (cls, hidden, projection) in enumerate(dims):
        torch.manual_seed(i + 1)
        config = CLIPTextConfig(**{**base.config.to_dict(), "hidden_size": hidden, "projection_dim": projection})
        models.append(randomize(cls(config)))
    return tokenizer, models


def tiny_t5() -> tuple[T5Tokenizer, T5EncoderModel]:
    """A unigram T5 tokenizer over letters and three words, and a tiny random T5 encoder (d_model 12)."""
    words = [("▁", -1.0), ("▁a", -0.5), ("▁cat", -0.5), ("▁dog", -0.5)]
    tokenizer = T5Tokenizer(vocab=[("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0),
                                   *((c, -1.0) for c in string.ascii_lowercase), *words], extra_ids=0)
    torch.manual_seed(3)
    config = T5Config(vocab_size=len(tokenizer), d_model=12, d_kv=4, d_ff=16, num_layers=2, num_heads=3,
                      relative_attention_num_buckets=8, relative_attention_max_distance=16, pad_token_id=0,
                      eos_token_id=1, decoder_start_token_id=0)
    return tokenizer, randomize(T5EncoderModel(config))


def tiny_sdxl(folder) -> StableDiffusionXLPipeline:
    """UNet with text_time embeddings (context 12 + 20 = 32, pooled 16), CLIP-L / CLIP-G (tokenizer_2 pads with
    another token, as SDXL's does), Euler with SDXL's leading spacing."""
    vocab = folder / "vocab"
    tokenizer, (clip_l, clip_g) = clips(vocab, (CLIPTextModel, 12, 12), (CLIPTextModelWithProjection, 20, 16))
    tokenizer_2 = CLIPTokenizer(str(vocab / "vocab.json"), str(vocab / "merges.txt"), model_max_length=77,
                                pad_token="z</w>")
    return StableDiffusionXLPipeline(
        vae=randomize(AutoencoderKL(**TINY_VAE, latent_channels=4)), text_encoder=clip_l, text_encoder_2=clip_g,
        tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=randomised(*CASES["sdxl"]), add_watermarker=False,
        scheduler=EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                         steps_offset=1, timestep_spacing="leading"))


def tiny_sd3(folder, t5: bool) -> StableDiffusion3Pipeline:
    """MM-DiT (context 12, pooled 4 + 6), CLIP-L / CLIP-G of width 4 each (padded to 12), T5 or none, a VAE
    with a latent shift, flow matching with shift 3."""
    tokenizer, (clip_l, clip_g) = clips(folder / "vocab", (CLIPTextModelWithProjection, 4, 4),
                                        (CLIPTextModelWithProjection, 4, 6))
    tokenizer_3, text_encoder_3 = tiny_t5() if t5 else (None, None)
    vae = AutoencoderKL(**TINY_VAE, latent_channels=4, shift_factor=0.1, scaling_factor=1.5)
    return StableDiffusion3Pipeline(
        transformer=tiny_diffusers_sd3(), scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=randomize(vae),
        text_encoder=clip_l, tokenizer=tokenizer, text_encoder_2=clip_g, tokenizer_2=tokenizer,
        text_encoder_3=text_encoder_3, tokenizer_3=tokenizer_3)


@pytest.fixture(scope="module", params=list(SIZES))
def stack(request, tmp_path_factory):
    """(kind, folder written by the diffusers pipeline's save_pretrained, that pipeline, our Pipeline from it)."""
    folder = tmp_path_factory.mktemp(request.param)
    ref = tiny_sdxl(folder) if request.param == "sdxl" else tiny_sd3(folder, t5=request.param == "sd3")
    ref.save_pretrained(folder / "pipe")
    ref.set_progress_bar_config(disable=True)
    return request.param, folder / "pipe", ref, load_diffusers_pipeline(folder / "pipe")


def encode_prompt(ref, prompts, negative=None):
    """diffusers' (tokens, negative tokens, pooled, negative pooled) for CFG."""
    extra = [None] if isinstance(ref, StableDiffusion3Pipeline) else []  # SD3 takes prompt_2 and prompt_3
    return ref.encode_prompt(prompts, None, *extra, do_classifier_free_guidance=True, negative_prompt=negative)


@torch.no_grad()
def test_stack_matches_encode_prompt(stack):
    kind, folder, ref, pipe = stack
    assert pipe.text_encoder_name == str(folder)
    assert isinstance(pipe.text_encoder, SDXLTextEncoder if kind == "sdxl" else SD3TextEncoder)
    tokens, neg_tokens, pooled, neg_pooled = encode_prompt(ref, PROMPTS)
    assert tokens.shape == ((2, 77, 32) if kind == "sdxl" else (2, 77 + 256, 12))
    cond = pipe.conditioner(2, prompts=PROMPTS, size=SIZES[kind])
    null = pipe.conditioner.null(cond)
    assert max_diff(cond["context"], tokens) < TOL and max_diff(cond["pooled"], pooled) < TOL
    assert max_diff(null["context"], neg_tokens) < TOL and max_diff(null["pooled"], neg_pooled) < TOL
    assert bool((null["context"] == 0).all()) == (kind == "sdxl")  # SDXL: force_zeros_for_empty_prompt
    _, neg_tokens, _, neg_pooled = encode_prompt(ref, PROMPTS, NEGATIVE)
    null = pipe.conditioner.null(cond, NEGATIVE)
    assert max_diff(null["context"], neg_tokens) < TOL and max_diff(null["pooled"], neg_pooled) < TOL
    if kind == "sd3_no_t5":
        assert not cond["context"][:, 77:].any()


@torch.no_grad()
def test_generate_matches_diffusers(stack):
    """Three Euler steps with CFG from the same initial latents (SDXL: empty negative -> zeros, its time_ids for
    a non-square size; SD3: negative prompts) equal the diffusers pipeline's images."""
    kind, _, ref, pipe = stack
    (h, w), n = SIZES[kind], len(PROMPTS)
    negative = None if kind == "sdxl" else NEGATIVE
    ours = generate(pipe, n, prompts=PROMPTS, negative=negative, height=h, width=w, sampler="euler", steps=3,
                    cfg=4.0, generator=gen(5))
    latents = torch.randn(n, 4, h // 2, w // 2, generator=gen(5))
    # our flow grid is shift(linspace(1, 0, steps + 1)): give diffusers its unshifted head
    grid = dict(sigmas=torch.linspace(1, 0, 4)[:-1].tolist()) if kind != "sdxl" else {}
    theirs = ref(PROMPTS, negative_prompt=negative, height=h, width=w, num_inference_steps=3, guidance_scale=4.0,
                 latents=latents, output_type="pt", **grid).images
    assert ours.shape == (n, 3, h, w) and (2 * theirs - 1).std() > 0.05
    assert max_diff(ours, 2 * theirs - 1) < TOL


@torch.no_grad()
def test_round_trip_through_our_folder(stack, tmp_path):
    """save_pipeline records the diffusers folder as the text encoder; load_pipeline rebuilds the stack, and loads
    the diffusers folder itself too."""
    kind, folder, _, pipe = stack
    for again in (load_pipeline(save_pipeline(pipe, tmp_path / "ours")), load_pipeline(folder)):
        assert again.text_encoder_name == str(folder)
        cond, expected = again.conditioner(1, prompts=["a cat"], size=SIZES[kind]), pipe.text_encoder(["a cat"])
        assert torch.equal(cond["context"], expected[0]) and torch.equal(cond["pooled"], expected[1])


@torch.no_grad()
def test_long_prompts_are_truncated_with_a_warning(stack):
    kind, folder, ref, pipe = stack
    long = "a " * 100  # BOS + 100 tokens + EOS: 25 past CLIP's 77
    with pytest.warns(UserWarning, match="77 tokens are truncated: prompt 1 loses 25 tokens"):
        tokens, pooled = pipe.text_encoder(["a cat", long])
    theirs, _, their_pooled, _ = encode_prompt(ref, ["a cat", long])
    assert max_diff(tokens, theirs) < TOL and max_diff(pooled, their_pooled) < TOL
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pipe.text_encoder(PROMPTS)
    if kind == "sd3":
        with pytest.warns(UserWarning) as record:
            pipe.text_encoder(["a " * 300])  # T5: 300 tokens + EOS
        losses = {str(w.message).split(": ")[1] for w in record}  # CLIP-L's and CLIP-G's, T5's
        assert losses == {"prompt 0 loses 225 tokens", "prompt 0 loses 45 tokens"}
    if kind == "sdxl":
        with pytest.warns(UserWarning, match="prompt 0 loses 25 tokens"):
            load_text_encoder(str(folder / "text_encoder"))([long])


@pytest.mark.parametrize("stack", ["sdxl"], indirect=True)
def test_cli_samples_a_diffusers_folder_and_takes_single_files(stack, tmp_path, capsys):
    folder = stack[1]
    out = tmp_path / "x.png"
    main(["sample", "--model", str(folder), "--prompt", "a", "--steps", "2", "--n", "1", "--height", "32", "--width",
          "32", "--out", str(out)])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "1 images of 32x32" in capsys.readouterr().out
    save_file({"model.diffusion_model.w": torch.zeros(1)}, tmp_path / "other.safetensors")
    assert model_folder(str(tmp_path / "other.safetensors")) == tmp_path / "other.safetensors"
    with pytest.raises(CheckpointError, match="input_blocks"):  # read as an SD single file
        load_pipeline(tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="neither a model folder"):
        model_folder(str(out))


def test_stacks_exist_for_sdxl_and_sd3_only(tmp_path):
    (tmp_path / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    with pytest.raises(ValueError, match="holds a StableDiffusionPipeline: text-encoder stacks exist for SDXL and SD3"):
        load_text_encoder(str(tmp_path))


@torch.no_grad()
def test_a1111_chunks_in_the_stacks(stack):
    """SDXL encodes a long prompt in 77-token chunks of both CLIPs (pooled: the first chunk's); SD3 keeps the CLIPs'
    first chunk and says so; unweighted short prompts encode as with the plain syntax."""
    kind, _, _, pipe = stack
    long, first = "a " * 100, "a " * 75
    assert all(torch.equal(a, b) for a, b in zip(pipe.text_encoder(PROMPTS, "a1111"), pipe.text_encoder(PROMPTS)))
    if kind == "sdxl":
        tokens, pooled = pipe.text_encoder([long], "a1111")
        head, head_pooled = pipe.text_encoder([first], "plain")
        assert tokens.shape == (1, 154, 32) and max_diff(tokens[:, :77], head) < TOL
        assert max_diff(pooled, head_pooled) < TOL
    else:
        with pytest.warns(UserWarning, match="SD3 takes one chunk"):
            tokens, _ = pipe.text_encoder([long], "a1111")
        assert tokens.shape == (1, 77 + 256, 12)
