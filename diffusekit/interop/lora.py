"""LoRA files: kohya / A1111 (`lora_unet_<module>.lora_down.weight`, `.lora_up.weight`, `.alpha`; LyCORIS LoCon's
conv layers use the same keys) and diffusers / PEFT (`unet.<module>.lora_A.weight`, `.lora_B.weight`, alpha in
the file's metadata). A layer's update is dW = (alpha / r) up @ down; `resolve` finds the parameter of our model
it changes (and the rows of a fused q / k / v projection) through the same renaming rules as the checkpoints.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open
from torch import Tensor

from ..checkpoints import CheckpointError, read_state_dict
from .common import PART, rename_key

KOHYA = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder", "lora_te2_": "text_encoder_2"}
PEFT = {"unet.": "unet", "text_encoder.": "text_encoder", "text_encoder_2.": "text_encoder_2"}
KOHYA_PARTS = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}
PEFT_PARTS = {"lora_A.weight": "down", "lora_B.weight": "up", "alpha": "alpha"}
# names of the diffusers / transformers / LDM modules that hold an underscore, which kohya's names flatten
COMPOUNDS = sorted((tuple(w.split("_")) for w in (
    "down_blocks up_blocks mid_block middle_block input_blocks output_blocks transformer_blocks to_q to_k to_v "
    "to_out proj_in proj_out time_emb_proj conv_shortcut conv_in conv_out conv_norm_out time_embedding linear_1 "
    "linear_2 add_embedding text_model self_attn q_proj k_proj v_proj out_proj final_layer_norm layer_norm1 "
    "layer_norm2 in_layers out_layers emb_layers skip_connection time_embed label_emb").split()),
    key=len, reverse=True)


class LoRAError(CheckpointError):
    """A LoRA file that is unreadable, holds no LoRA layers, or does not fit the model it is applied to."""


@dataclass(frozen=True, eq=False)
class LoRALayer:
    """One adapted weight: the source's module name (dotted, in the naming of its format's model), the down
    [r, in(, kh, kw)] and up [out, r(, 1, 1)] factors and alpha (None: alpha = r)."""

    component: str  # unet, text_encoder or text_encoder_2
    module: str
    down: Tensor
    up: Tensor
    alpha: float | None = None

    @property
    def gain(self) -> float:
        """alpha / r (1 without an alpha)."""
        return self.alpha / self.down.shape[0] if self.alpha is not None else 1.0

    def add_to(self, w: Tensor, scale: float) -> None:
        """w += scale dW in place, dW = (alpha / r) up @ down, for w the adapted rows [out, in(, kh, kw)] of a weight
        of any dtype (accumulated in float32; one pass over fp32 weights)."""
        up, down, gain = self.up.flatten(1).float().to(w.device), self.down.flatten(1).float().to(w.device), self.gain
        if w.dtype == torch.float32:
            w.view(w.shape[0], -1).addmm_(up, down, alpha=scale * gain)
        else:
            w.copy_(w.float().reshape(w.shape[0], -1).addmm_(up, down, alpha=scale * gain).reshape(w.shape))


def kohya_module(name: str) -> str:
    """kohya's flattened module name back to dots: down_blocks_0_attentions_0_proj_in -> down_blocks.0.attentions.0
    .proj_in (the names that hold an underscore are known, COMPOUNDS)."""
    words, out, i = name.split("_"), [], 0
    while i < len(words):
        n = next((len(c) for c in COMPOUNDS if tuple(words[i:i + len(c)]) == c), 1)
        out.append("_".join(words[i:i + n]))
        i += n
    return ".".join(out)


def read_lora(path: str | Path) -> list[LoRALayer]:
    """The layers of a LoRA file (.safetensors, or a torch .pt / .bin / .ckpt); LoRAError if it has none or a
    layer lacks its down or up factor."""
    path = Path(path)
    try:
        state = read_state_dict(path)
    except (CheckpointError, OSError) as e:
        raise LoRAError(f"{path}: not a readable LoRA file ({e})") from e
    alpha = peft_alpha(path)
    groups: dict[tuple[str, str], dict[str, Tensor]] = {}
    for key, value in state.items():
        kohya = next((p for p in KOHYA if key.startswith(p)), None)
        module, _, part = key.partition(".") if kohya else (None, "", "")
        parts = KOHYA_PARTS if kohya else PEFT_PARTS
        if not kohya:
            part = next((p for p in parts if key.endswith("." + p)), "")
            module = key[: -len(part) - 1] if part else None
        if module is None or part not in parts:
            continue
        if kohya:
            component, module = KOHYA[kohya], kohya_module(module[len(kohya):])
        else:
            prefix = next((p for p in PEFT if module.startswith(p)), "")
            component, module = PEFT.get(prefix, "unet"), module[len(prefix):]
        groups.setdefault((component, module), {})[parts[part]] = value
    if not groups:
        raise LoRAError(f"{path}: no LoRA layers (kohya lora_down / lora_up or PEFT lora_A / lora_B keys); "
                        f"its keys start: {', '.join(list(state)[:4])}")
    layers = []
    for (component, module), g in groups.items():
        if "down" not in g or "up" not in g:
            raise LoRAError(f"{path}: {component} layer {module} lacks its {'up' if 'down' in g else 'down'} factor")
        a = float(g["alpha"]) if "alpha" in g else alpha.get(component)
        layers.append(LoRALayer(component, module, g["down"], g["up"], a))
    return layers


def peft_alpha(path: Path) -> dict[str, float]:
    """lora_alpha per component from a diffusers file's metadata (`lora_adapter_metadata`: the PEFT configs,
    keys prefixed by component), if any; alpha_pattern (per-module alphas) is not read."""
    if path.suffix != ".safetensors":
        return {}
    with safe_open(str(path), "pt") as f:
        meta = json.loads((f.metadata() or {}).get("lora_adapter_metadata", "{}"))
    return {c: float(meta[f"{c}.lora_alpha"]) for c in PEFT.values() if f"{c}.lora_alpha" in meta}


@dataclass(frozen=True)
class Target:
    """Where a layer's update goes: our parameter and the rows of it (all, or one part of a fused projection)."""

    name: str
    rows: slice


def resolve(layer: LoRALayer, params: dict[str, Tensor], rules: list[Callable[[str], str | None]]) -> Target:
    """The parameter of a model (`params`: its named parameters) that `layer` changes: the first of `rules`
    (renamings of the source's `<module>.weight`) naming one of them, with the update's shape checked; LoRAError
    otherwise."""
    for rule in rules:
        name = rule(f"{layer.module}.weight")
        base, _, part = (name or "").partition(PART)
        if base in params:
            w = params[base]
            order = base.split(".")[-2] if part else ""
            n = w.shape[0] // len(order) if part else w.shape[0]
            rows = slice(order.index(part) * n, (order.index(part) + 1) * n) if part else slice(None)
            shape = (layer.up.shape[0], *layer.down.shape[1:])  # dW's: [out, in(, kh, kw)]
            if layer.up.shape[1] != layer.down.shape[0] or math.prod(shape) != w[rows].numel() or \
                    shape[:2] != w[rows].shape[:2]:
                raise LoRAError(f"LoRA layer {layer.module} ({layer.component}) has shape {shape} (rank "
                                f"{layer.down.shape[0]}), the model's {base} {tuple(w[rows].shape)} (a LoRA made "
                                f"for another model?)")
            return Target(base, rows)
    raise LoRAError(f"LoRA layer {layer.module} ({layer.component}) names a module this model lacks (a LoRA made "
                    f"for another model, e.g. SDXL on SD 1.x?)")


def renamer(rules: list) -> Callable[[str], str | None]:
    return lambda key: rename_key(key, rules)


def text_rule(key: str) -> str:
    """transformers' CLIP names -> ours (the same below text_model.)."""
    return re.sub(r"^text_model\.", "", key)
