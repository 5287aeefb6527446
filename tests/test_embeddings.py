"""Textual-inversion embeddings: each file format read (A1111 .pt / .safetensors, diffusers learned_embeds, SDXL's
clip_l + clip_g) gives the prompt embeddings diffusers' load_textual_inversion gives on tiny CLIPs, one- and
multi-vector; prompts without the token and removal are bit-exact; A1111 weights and chunks apply to the vectors;
bad files are refused with the model unchanged; the CLI records and reruns them."""

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import save_file

from diffusekit.cli import main
from diffusekit.images import read_parameters
from diffusekit.interop.embeddings import EmbeddingError, read_embedding
from diffusekit.models.clip import CLIPTextConfig, CLIPTextTransformer
from diffusekit.pipelines.embeddings import Embeddings
from diffusekit.pipelines.foreign import load_diffusers_pipeline

from .test_autoencoder import max_diff
from .test_outputs import fails, pixels
from .test_interop import CTX, _one_thread, tiny_sd_folder  # noqa: F401  (the fixture runs these tests on one thread)
from .test_text_stacks import encode_prompt, stack  # noqa: F401  (SDXL's stack)

PROMPTS = ["a sks cat", "a dog, sks and a cat"]  # the token "sks": three BPE pieces of the tiny vocabulary


def vectors(n: int, width: int = CTX, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, width, generator=torch.Generator().manual_seed(seed))


def write(path, fmt: str, v: torch.Tensor):
    """One embedding in each format people download."""
    if fmt == "a1111_pt":
        torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": torch.nn.Parameter(v)}, "name": "other",
                    "step": 1000}, path)
    elif fmt == "a1111_safetensors":
        save_file({"emb_params": v}, path)
    else:  # diffusers' learned_embeds: the token is the key; one vector saved as [d]
        save_file({"sks": v[0] if len(v) == 1 else v}, path)
    return path


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    return tiny_sd_folder(tmp_path_factory.mktemp("sd"), tmp_path_factory.mktemp("vocab") / "files")[0]


@pytest.mark.parametrize("fmt, suffix", [("a1111_pt", ".pt"), ("a1111_safetensors", ".safetensors"),
                                         ("diffusers", ".safetensors")])
@pytest.mark.parametrize("n", [1, 3])
@torch.no_grad()
def test_embeddings_match_diffusers(sd, tmp_path, fmt, suffix, n):
    file = write(tmp_path / f"sks{suffix}", fmt, vectors(n))
    ref = StableDiffusionPipeline.from_pretrained(sd, safety_checker=None)
    ref.load_textual_inversion(str(file), token="sks")
    theirs = ref.encode_prompt(PROMPTS, "cpu", 1, False)[0]
    pipe = load_diffusers_pipeline(sd)
    plain = pipe.text_encoder(PROMPTS)[0]
    with Embeddings(pipe, [(file, None)]):  # the token: the file's (diffusers) or its name (A1111: not 'other')
        ours = pipe.text_encoder(PROMPTS)[0]
        assert torch.equal(pipe.text_encoder(["a dog", "a cat"])[0], load_diffusers_pipeline(sd).text_encoder(
            ["a dog", "a cat"])[0])  # prompts without the token: bit-exact
    assert max_diff(ours, theirs) < 1e-5 and max_diff(ours, plain) > 1e-2
    assert torch.equal(pipe.text_encoder(PROMPTS)[0], plain)  # removed: bit-exact
    assert read_embedding(file).vectors["text_encoder"].shape == (n, CTX)


@torch.no_grad()
def test_embeddings_under_a1111_syntax(sd, tmp_path):
    """Weights apply to the vectors; a multi-vector embedding at a chunk's end moves
    whole to the next chunk; the token in a negative prompt works through generate's null condition."""
    file = write(tmp_path / "sks.safetensors", "a1111_safetensors", vectors(3))
    pipe = load_diffusers_pipeline(sd)
    with Embeddings(pipe, [(file, None)]):
        te = pipe.text_encoder
        raw, _, w = te.encode_chunks(["a (sks:1.5) cat"])
        assert w[0, :6].tolist() == [1.0, 1.0, 1.5, 1.5, 1.5, 1.0]  # BOS, 'a', the 3 vectors, 'cat' (emphasize's)
        assert max_diff(raw, te(["a sks cat"])[0]) < 1e-6
        filler = " ".join(["a"] * 73)
        tokens, _, _ = te.encode_chunks([f"{filler} sks"])  # 73 + 3 > 75: the vectors start the second chunk
        ids = te.tokenizer.encode([f"{filler} sks"])[0]
        assert tokens.shape[1] == 2 * 77 and ids[-3:] == te.tokenizer.embeddings[next(iter(te.tokenizer.embeddings))]
        second, _, _ = te.encode_chunks(["sks"])
        assert max_diff(tokens[:, 77:], second) < 1e-5
        cond = pipe.conditioner(1, prompts=["a cat"], size=(32, 32))
        assert max_diff(pipe.conditioner.null(cond, ["sks"])["context"], te(["sks"], syntax="a1111")[0]) < 1e-6


@torch.no_grad()
def test_bad_embedding_files(sd, tmp_path):
    pipe = load_diffusers_pipeline(sd)
    plain = pipe.text_encoder(PROMPTS)[0]
    save_file({"a": torch.zeros(2), "b": torch.zeros(2)}, tmp_path / "two.safetensors")
    (tmp_path / "corrupt.pt").write_bytes(b"not a file")
    save_file({"emb_params": torch.zeros(2, CTX + 1)}, tmp_path / "wide.safetensors")
    save_file({"clip_l": torch.zeros(1, CTX), "clip_g": torch.zeros(1, 20)}, tmp_path / "xl.safetensors")
    save_file({"emb_params": torch.zeros(76, CTX)}, tmp_path / "long.safetensors")
    write(tmp_path / "sks.safetensors", "diffusers", vectors(1))
    for name, message in (("two", "not a textual-inversion embedding"), ("corrupt.pt", "not a readable embedding"),
                          ("wide", rf"vectors \(2, {CTX + 1}\).*\[n, {CTX}\]"), ("long", "1 <= n <= 75"),
                          ("xl", "text_encoder \\+ text_encoder_2, this model's CLIP text encoders are: text_encoder$")):
        file = tmp_path / (name if "." in name else f"{name}.safetensors")
        with pytest.raises(EmbeddingError, match=message):
            Embeddings(pipe, [(tmp_path / "sks.safetensors", None), (file, "other")])
    with pytest.raises(EmbeddingError, match="second embedding named 'sks'"):
        Embeddings(pipe, [(tmp_path / "sks.safetensors", None), (tmp_path / "wide.safetensors", "sks")])
    assert torch.equal(pipe.text_encoder(PROMPTS)[0], plain) and not pipe.text_encoder.embeddings  # unchanged


@pytest.mark.parametrize("stack", ["sdxl"], indirect=True)
@torch.no_grad()
def test_sdxl_embeddings_match_diffusers(stack, tmp_path):  # noqa: F811  (the fixture)
    """An SDXL file's clip_l and clip_g vectors go to their CLIPs (diffusers: load_textual_inversion per encoder);
    an SD 1.x file is refused on SDXL."""
    _, _, ref, pipe = stack
    state = {"clip_l": vectors(2, 12, 1), "clip_g": vectors(2, 20, 2)}
    save_file(state, tmp_path / "sks.safetensors")
    for key, te, tok in (("clip_l", ref.text_encoder, ref.tokenizer), ("clip_g", ref.text_encoder_2, ref.tokenizer_2)):
        ref.load_textual_inversion(state[key], token="sks", text_encoder=te, tokenizer=tok)
    try:
        tokens, _, pooled, _ = encode_prompt(ref, PROMPTS)
    finally:
        ref.unload_textual_inversion("sks", tokenizer=ref.tokenizer, text_encoder=ref.text_encoder)
        ref.unload_textual_inversion("sks", tokenizer=ref.tokenizer_2, text_encoder=ref.text_encoder_2)
    with Embeddings(pipe, [(tmp_path / "sks.safetensors", None)]):
        ours, ours_pooled = pipe.text_encoder(PROMPTS)
    assert max_diff(ours, tokens) < 1e-5 and max_diff(ours_pooled, pooled) < 1e-5
    save_file({"emb_params": vectors(1, 12)}, tmp_path / "sd1.safetensors")
    with pytest.raises(EmbeddingError, match="SD 1.x / 2.x embedding on SDXL"):
        Embeddings(pipe, [(tmp_path / "sd1.safetensors", None)])


def test_pooled_end_token_ignores_embedding_ids():
    """Old CLIP configs find the end token as the highest id: textual inversion's ids beyond the vocabulary are
    not it."""
    model = CLIPTextTransformer(CLIPTextConfig(vocab_size=10, hidden_size=8, intermediate_size=16, num_attention_heads=2,
                                               num_hidden_layers=1, max_position_embeddings=6, eos_token_id=2)).eval()
    model.embeddings.extra = vectors(2, 8)
    ids = torch.tensor([[0, 10, 11, 9, 3, 3]])  # BOS, the two vectors, EOS (id 9, the vocabulary's highest)
    h, pooled = model(ids)
    assert torch.equal(pooled, h[:, 3])


def test_embedding_from_the_command_line(sd, tmp_path, capsys):
    """--embedding FILE:TOKEN changes the images of a prompt with the token, the PNG records it, --from-png reruns
    it; a missing file is refused before loading anything."""
    file = write(tmp_path / "style.safetensors", "a1111_safetensors", 3 * vectors(2))
    base = ["sample", "--model", str(sd), "--prompt", "a sks cat", "--n", "1", "--steps", "2", "--dtype", "fp32"]

    def image(name: str, *extra: str):
        main([*base, *extra, "--out", str(tmp_path / f"{name}.png")])
        return pixels(tmp_path / name / "000.png")

    plain, other, named = image("plain"), image("other", "--embedding", str(file)), image(
        "named", "--embedding", f"{file}:sks")
    assert np.array_equal(plain, other)  # the token is the file's name, 'style', which the prompt lacks
    assert not np.array_equal(plain, named)
    assert read_parameters(tmp_path / "named" / "000.png")["embedding"] == [f"{file.resolve()}:sks"]
    main(["sample", "--from-png", str(tmp_path / "named" / "000.png"), "--out", str(tmp_path / "again.png")])
    assert np.array_equal(pixels(tmp_path / "again" / "000.png"), named)
    assert "no embedding file" in fails([*base, "--embedding", str(tmp_path / "missing.pt")], capsys)
