"""Textual-inversion embedding files: the vectors [n, d] a token reads as, per CLIP text encoder.

The formats people download: A1111's .pt (`string_to_param: {"*": [n, d]}`) and .safetensors (`emb_params`),
SDXL's (`clip_l` [n, 768] and `clip_g` [n, 1280]), and diffusers' learned_embeds (.safetensors / .bin: one key,
the token, holding [d] or [n, d]).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch import Tensor

from ..checkpoints import CheckpointError, read_state_dict

SDXL_KEYS = {"clip_l": "text_encoder", "clip_g": "text_encoder_2"}  # by the component names of pipe.clip_encoders


class EmbeddingError(CheckpointError):
    """A textual-inversion file that cannot be read or does not fit the model."""


@dataclass
class Embedding:
    token: str | None  # the token the file itself names (diffusers' key), None where it names none
    vectors: dict[str, Tensor]  # text-encoder component ("text_encoder", "text_encoder_2") -> [n, d]


def read_embedding(path: str | Path) -> Embedding:
    """The embedding in a textual-inversion file of any of the formats above; EmbeddingError otherwise."""
    path = Path(path)
    try:
        state = read_state_dict(path)
    except (CheckpointError, OSError) as e:
        raise EmbeddingError(f"{path}: not a readable embedding file ({e})") from e
    token = None
    if isinstance(state.get("string_to_param"), dict) and len(state["string_to_param"]) == 1:
        vectors = {"text_encoder": next(iter(state["string_to_param"].values()))}
    elif "emb_params" in state:
        vectors = {"text_encoder": state["emb_params"]}
    elif set(state) == set(SDXL_KEYS):
        vectors = {SDXL_KEYS[k]: v for k, v in state.items()}
    elif len(state) == 1:
        (token, v), = state.items()
        vectors = {"text_encoder": v}
    else:
        raise EmbeddingError(f"{path}: not a textual-inversion embedding (expected string_to_param, emb_params, "
                             f"clip_l + clip_g or one token's vectors); its keys: {', '.join(list(state)[:6])}")
    for component, v in vectors.items():
        if not isinstance(v, Tensor) or not v.is_floating_point() or v.ndim not in (1, 2):
            raise EmbeddingError(f"{path}: the {component}'s embedding is not a float tensor [n, d] "
                                 f"({getattr(v, 'shape', type(v).__name__)})")
    return Embedding(token, {c: v.detach().float().reshape(-1, v.shape[-1]) for c, v in vectors.items()})
