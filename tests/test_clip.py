"""Our CLIP text transformer and tokenizer (the Stable Diffusion prompt path, no transformers import) against
transformers' CLIPTextModel / CLIPTextModelWithProjection and CLIPTokenizer on tiny random models."""

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import CLIPTextModelWithProjection, CLIPTokenizer as HFTokenizer

from diffusekit.conditioning import CLIPTokenizer, TextEncoder

from .test_interop import tiny_clip

PROMPTS = ["a cat", "A  DOG,\tand a cat!!", "", "cat " * 90, "dog's (cat:1.2) [dog] 42 \u00e9"]


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    root = tmp_path_factory.mktemp("clip")
    tokenizer, model = tiny_clip(root / "tokenizer")
    tokenizer.save_pretrained(root / "tokenizer")
    model.save_pretrained(root / "text_encoder")
    return root, model


def test_tokenizer_matches_transformers(clip):
    root, _ = clip
    ours, theirs = CLIPTokenizer(root / "tokenizer"), HFTokenizer.from_pretrained(root / "tokenizer")
    for kw in ({}, dict(padding="max_length", max_length=77, truncation=True)):
        a, b = ours(PROMPTS, **kw), theirs(PROMPTS, **kw)
        assert a["input_ids"] == b["input_ids"] and a["attention_mask"] == b["attention_mask"]
    assert len(ours(PROMPTS)["input_ids"][3]) == 92  # untruncated: 90 words + BOS + EOS


@torch.no_grad()
@pytest.mark.parametrize("layer", [-1, -2, -3])
def test_text_encoder_matches_transformers(clip, layer):
    root, model = clip
    enc = TextEncoder(root / "text_encoder", layer=layer)
    with pytest.warns(UserWarning, match="prompt 3 loses 15 tokens"):
        tokens, pooled = enc(PROMPTS)
    ids = HFTokenizer.from_pretrained(root / "tokenizer")(PROMPTS, padding="max_length", max_length=77,
                                                            truncation=True, return_tensors="pt").input_ids
    out = model(ids, output_hidden_states=True)
    expected = out.last_hidden_state if layer == -1 else out.hidden_states[layer]
    assert (tokens - expected).abs().max() < 1e-5
    assert (pooled - out.pooler_output).abs().max() < 1e-5


@torch.no_grad()
def test_projected_and_prefixed_weights(clip, tmp_path):
    """SDXL's second encoder (WithProjection: pooled is text_embeds) from a file whose keys carry the
    'text_model.' prefix, as older transformers wrote them."""
    root, model = clip
    torch.manual_seed(1)
    projected = CLIPTextModelWithProjection(model.config).eval()
    projected.save_pretrained(tmp_path / "enc")
    state = load_file(tmp_path / "enc" / "model.safetensors")
    save_file({(k if k.startswith("text_projection") else "text_model." + k.removeprefix("text_model.")): v
               for k, v in state.items()}, tmp_path / "enc" / "model.safetensors")
    enc = TextEncoder(tmp_path / "enc", tokenizer=root / "tokenizer")
    tokens, pooled = enc(["a cat", "a dog"])
    ids = HFTokenizer.from_pretrained(root / "tokenizer")(["a cat", "a dog"], padding="max_length", max_length=77,
                                                            return_tensors="pt").input_ids
    out = projected(ids)
    assert (pooled - out.text_embeds).abs().max() < 1e-5 and (tokens - out.last_hidden_state).abs().max() < 1e-5


def test_mismatched_or_corrupt_weights_are_named(clip, tmp_path):
    root, model = clip
    model.save_pretrained(tmp_path / "enc")
    state = load_file(tmp_path / "enc" / "model.safetensors")
    bad = dict(state, **{"final_layer_norm.weight": torch.full_like(state["final_layer_norm.weight"], float("nan"))})
    save_file(bad, tmp_path / "enc" / "model.safetensors")
    with pytest.raises(ValueError, match="corrupt: tensor 'final_layer_norm.weight'"):
        TextEncoder(tmp_path / "enc", tokenizer=root / "tokenizer")
    del state["final_layer_norm.bias"]
    save_file(state, tmp_path / "enc" / "model.safetensors")
    with pytest.raises(ValueError, match="does not fit CLIPTextTransformer: missing keys \\(1\\): final_layer_norm.bias"):
        TextEncoder(tmp_path / "enc", tokenizer=root / "tokenizer")
