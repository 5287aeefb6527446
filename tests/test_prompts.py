"""A1111 prompt syntax: the attention-weight parser (nested, escaped and malformed brackets), 75-token chunks with
A1111's comma backtracking, the weights and chunks on a tiny CLIP against transformers' CLIP encoding the same
tokens by A1111's documented rule, and negative prompts padded to the prompt's chunks through generate."""

import warnings

import pytest
import torch
from transformers import CLIPTokenizer as HFTokenizer

from diffusekit.conditioning import TextEncoder
from diffusekit.pipelines import generate
from diffusekit.pipelines.foreign import load_diffusers_pipeline
from diffusekit.prompts import BREAK, chunks, parse_attention

from .test_autoencoder import max_diff
from .test_interop import _one_thread, tiny_clip, tiny_sd_folder  # noqa: F401  (one thread)

W = 1.1


@pytest.mark.parametrize("prompt, segments", [
    ("a cat", [("a cat", 1.0)]),
    ("(cat)", [("cat", W)]),
    ("((cat))", [("cat", W * W)]),
    ("[cat]", [("cat", 1 / W)]),
    ("[[cat]]", [("cat", 1 / W / W)]),
    ("(cat:1.5) dog", [("cat", 1.5), (" dog", 1.0)]),
    ("(cat : 0.5 )", [("cat ", 0.5)]),
    ("(a (b:2) c)", [("a ", W), ("b", 2 * W), (" c", W)]),
    ("([cat])", [("cat", 1.0 * W / W)]),
    (r"\(literal\) \[too\]", [("(literal) [too]", 1.0)]),
    ("a\\b", [("a\\b", 1.0)]),
    ("(unclosed", [("(unclosed", 1.0)]),
    ("closed) too]", [("closed) too]", 1.0)]),
    ("((a)", [("(", 1.0), ("a", W)]),
    ("([crossed)]", [("(", 1.0), ("crossed)", 1 / W)]),
    ("(a:b)", [("a:b", W)]),
    ("(a:1.3", [("(a:1.3", 1.0)]),
    ("[a:1.3]", [("a:1.3", 1 / W)]),
    ("x BREAK y", [("x ", 1.0), (BREAK, -1.0), (" y", 1.0)]),
    ("BREAKFAST at Bob's", [("BREAKFAST at Bob's", 1.0)]),
    ("", [("", 1.0)]),
])
def test_parser(prompt, segments):
    got = parse_attention(prompt)
    assert [t for t, _ in got] == [t for t, _ in segments]
    assert [w for _, w in got] == pytest.approx([w for _, w in segments])


def test_chunks_and_comma_backtracking():
    comma = 9
    plain = [(1, 1.0)] * 160
    assert [len(c) for c in chunks(plain, comma)] == [75, 75, 10]
    assert [len(c) for c in chunks([(1, 1.0)] * 75, comma)] == [75]  # exactly full: no empty chunk after it
    # a comma 15 tokens before the end of a full chunk: the 14 tokens after it move to the next chunk
    tokens = [(1, 1.0)] * 60 + [(comma, 1.0)] + [(2, 1.0)] * 30
    out = chunks(tokens, comma)
    assert [len(c) for c in out] == [61, 30] and out[0][-1][0] == comma
    far = [(1, 1.0)] * 40 + [(comma, 1.0)] + [(2, 1.0)] * 50  # 34 back: more than 20, no backtracking
    assert [len(c) for c in chunks(far, comma)] == [75, 16]
    assert [len(c) for c in chunks([(1, 1.0), (-1, 1.0), (2, 1.0)], comma)] == [1, 1]  # BREAK
    assert [len(c) for c in chunks([(-1, 1.0), (2, 1.0), (-1, 1.0)], comma)] == [0, 1]


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clip") / "text_encoder"
    tokenizer, model = tiny_clip(folder)
    with torch.no_grad():  # a trained CLIP's final norm is not centred: its tokens' mean, A1111's scale, is not 0
        model.final_layer_norm.bias.add_(0.1 * torch.randn(model.config.hidden_size))
    model.save_pretrained(folder)
    return TextEncoder(folder, tokenizer=folder), HFTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt")), model


def a1111_reference(tokenizer, model, chunk_segments: list[list[tuple[str, float]]]) -> torch.Tensor:
    """A1111's documented rule by hand with transformers' CLIP: each chunk's segments tokenized alone, BOS + tokens
    + EOS + padding to 77, encoded; token embeddings times the weights; each chunk rescaled to its former mean."""
    out = []
    for segments in chunk_segments:
        ids, weights = [tokenizer.bos_token_id], [1.0]
        for text, w in segments:
            t = tokenizer(text, add_special_tokens=False).input_ids
            ids, weights = ids + t, weights + [w] * len(t)
        ids, weights = ids + [tokenizer.eos_token_id], weights + [1.0]
        ids, weights = ids + [tokenizer.pad_token_id] * (77 - len(ids)), weights + [1.0] * (77 - len(weights))
        with torch.no_grad():
            z = model(torch.tensor([ids])).last_hidden_state
        weighted = z * torch.tensor(weights)[None, :, None]
        out.append(weighted * (z.mean() / weighted.mean()))
    return torch.cat(out, dim=1)


def test_weights_match_a1111_rule(clip):
    encoder, tokenizer, model = clip
    tokens, _ = encoder(["a (cat:1.5) and [dog]"], "a1111")
    ref = a1111_reference(tokenizer, model, [[("a ", 1.0), ("cat", 1.5), (" and ", 1.0), ("dog", 1 / W)]])
    assert tokens.shape == (1, 77, model.config.hidden_size) and max_diff(tokens, ref) < 1e-5
    plain, _ = encoder(["a cat"], "plain")
    assert torch.equal(encoder(["a cat"], "a1111")[0], plain)  # no syntax used: the same encoding, bit-exactly
    literal, _ = encoder(["a (cat:1.5)"], "plain")  # plain: the brackets are text
    assert max_diff(literal, encoder(["a (cat:1.5)"], "a1111")[0]) > 1e-3


def test_long_prompts_are_chunked(clip):
    encoder, tokenizer, model = clip
    words = " ".join(["cat"] * 80 + ["dog"] * 10)  # 90 tokens: two chunks
    tokens, pooled = encoder([words, "a dog"], "a1111")
    assert tokens.shape == (2, 154, model.config.hidden_size)
    ref = a1111_reference(tokenizer, model, [[(" ".join(["cat"] * 75), 1.0)],
                                             [(" ".join(["cat"] * 5 + ["dog"] * 10), 1.0)]])
    assert max_diff(tokens[:1], ref) < 1e-5
    empty = a1111_reference(tokenizer, model, [[("", 1.0)]])  # the short prompt: padded with an empty chunk
    assert max_diff(tokens[1:, 77:], empty) < 1e-5
    assert max_diff(pooled[:1], encoder([" ".join(["cat"] * 75)], "a1111")[1]) < 1e-5  # the first chunk's
    breaks, _ = encoder(["a cat BREAK a dog"], "a1111")
    assert breaks.shape[1] == 154
    assert max_diff(breaks[:, 77:], a1111_reference(tokenizer, model, [[("a dog", 1.0)]])) < 1e-5
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cut, _ = encoder([words], "plain")
    assert cut.shape[1] == 77 and "truncated" in str(caught[0].message)


@pytest.mark.parametrize("prompt, negative", [("cat " * 100, "dog"), ("cat", "dog " * 100)])
@torch.no_grad()
def test_generate_pads_the_shorter_of_prompt_and_negative(tmp_path, prompt, negative):
    """Prompt and negative of different chunk counts run through CFG; the shorter is padded with the empty prompt's
    chunk, so a negative padded by hand gives the same image."""
    folder, _ = tiny_sd_folder(tmp_path / "sd", tmp_path / "vocab")
    pipe = load_diffusers_pipeline(folder)
    g = torch.Generator().manual_seed(0)
    image = generate(pipe, 1, prompts=[prompt], negative=[negative], steps=2, cfg=3.0, generator=g)
    assert image.shape == (1, 3, 32, 32) and torch.isfinite(image).all()
    cond = pipe.conditioner(1, prompts=[prompt], syntax="a1111")
    null = pipe.conditioner.null(cond, [negative], "a1111")
    cond, null = pipe.conditioner.match_lengths(cond, null)
    assert cond["context"].shape == null["context"].shape == (1, 154, cond["context"].shape[-1])
    short = cond if len(prompt) < len(negative) else null
    assert torch.equal(short["context"][:, 77:], pipe.conditioner.empty()[0])
