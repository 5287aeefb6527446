"""CLIP's text transformer (Stable Diffusion's prompt encoder; SPEC §4): token + position embeddings, pre-norm
causal self-attention blocks with a quick-GELU (or GELU) MLP, a final LayerNorm; pooled = the final state at the
end-of-text token, optionally projected (SDXL's second encoder). Module names follow the CLIP checkpoints'
(`embeddings.token_embedding`, `encoder.layers.N.self_attn.q_proj`, ...), so their weights load by name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .layers import attention


@dataclass
class CLIPTextConfig:
    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"           # or "gelu" (OpenCLIP ViT-H / bigG)
    layer_norm_eps: float = 1e-5
    eos_token_id: int = 2                    # 2: old configs, where the end token is the highest id (argmax)
    projection_dim: int | None = None        # CLIPTextModelWithProjection: pooled -> text_projection (no bias)

    @classmethod
    def from_hf(cls, cfg: Mapping[str, Any]) -> "CLIPTextConfig":
        """From a transformers CLIPTextConfig's config.json (unknown keys ignored; projection only for the
        WithProjection architecture)."""
        if cfg.get("hidden_act", "quick_gelu") not in ACTIVATIONS:
            raise ValueError(f"CLIP text encoder with hidden_act {cfg['hidden_act']!r}; supported: {list(ACTIVATIONS)}")
        projected = "CLIPTextModelWithProjection" in (cfg.get("architectures") or ())
        keys = {k: cfg[k] for k in cls.__dataclass_fields__ if k in cfg and k != "projection_dim"}
        return cls(**keys, projection_dim=cfg.get("projection_dim", 768) if projected else None)


ACTIVATIONS = {"quick_gelu": lambda x: x * torch.sigmoid(1.702 * x), "gelu": F.gelu}


class Embeddings(nn.Module):
    """Token + position embeddings; ids from vocab_size on read the rows of `extra` (textual inversion's vectors
    [n, d], set by TextEncoder.set_embeddings; not part of the state dict)."""

    def __init__(self, c: CLIPTextConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(c.vocab_size, c.hidden_size)
        self.position_embedding = nn.Embedding(c.max_position_embeddings, c.hidden_size)
        self.extra: Tensor | None = None

    def forward(self, ids: Tensor) -> Tensor:
        if self.extra is None:
            x = self.token_embedding(ids)
        else:
            vocab = self.token_embedding.num_embeddings
            x = torch.where((ids >= vocab)[..., None], self.extra[(ids - vocab).clamp(min=0)],
                            self.token_embedding(ids.clamp(max=vocab - 1)))
        return x + self.position_embedding.weight[: ids.shape[1]]


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x: Tensor) -> Tensor:
        return self.out_proj(attention(self.q_proj(x), self.k_proj(x), self.v_proj(x), self.heads, causal=True))


class MLP(nn.Module):
    def __init__(self, c: CLIPTextConfig):
        super().__init__()
        self.act = ACTIVATIONS[c.hidden_act]
        self.fc1, self.fc2 = nn.Linear(c.hidden_size, c.intermediate_size), nn.Linear(c.intermediate_size, c.hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class EncoderLayer(nn.Module):
    def __init__(self, c: CLIPTextConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.self_attn = SelfAttention(c.hidden_size, c.num_attention_heads)
        self.layer_norm2 = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.mlp = MLP(c)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class Encoder(nn.Module):
    def __init__(self, c: CLIPTextConfig):
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(c) for _ in range(c.num_hidden_layers))


class CLIPTextTransformer(nn.Module):
    """forward(ids [B, L], layer=-1) -> (tokens [B, L, d], pooled [B, d or projection_dim]). tokens: the final
    LayerNorm's output for layer -1, else the hidden state after that many blocks counted as in transformers'
    hidden_states (-2: the penultimate block's output, SDXL's "clip skip"), without the final norm; pooled is
    always the final normed state at the end token."""

    model_type = "clip_text"
    config_class = CLIPTextConfig

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.config = c = config
        self.embeddings = Embeddings(c)
        self.encoder = Encoder(c)
        self.final_layer_norm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.text_projection = nn.Linear(c.hidden_size, c.projection_dim, bias=False) if c.projection_dim else None

    def forward(self, ids: Tensor, layer: int = -1) -> tuple[Tensor, Tensor]:
        n = len(self.encoder.layers)
        if not -n - 1 <= layer < 0:
            raise ValueError(f"layer must be in [-{n + 1}, -1] (hidden states of {n} blocks), got {layer}")
        h, tokens = self.embeddings(ids), None
        for i, block in enumerate(self.encoder.layers):
            if i == n + 1 + layer:
                tokens = h
            h = block(h)
        h = self.final_layer_norm(h)
        # old configs: the end token is the vocabulary's highest id (textual inversion's ids beyond it are not)
        end = (ids.masked_fill(ids >= self.config.vocab_size, -1).argmax(-1) if self.config.eos_token_id == 2
               else (ids == self.config.eos_token_id).int().argmax(-1))
        pooled = h[torch.arange(ids.shape[0], device=ids.device), end]
        if self.text_projection is not None:
            pooled = self.text_projection(pooled)
        return (h if tokens is None else tokens), pooled
