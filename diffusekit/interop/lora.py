"""LoRA files: kohya / A1111 (`lora_unet_<module>.lora_down.weight`, `.lora_up.weight`, `.alpha`; LyCORIS LoCon's
conv layers use the same keys, LyCORIS LoHa and LoKr layers their `hada_` / `lokr_` factors) and diffusers / PEFT
(`unet.<module>.lora_A.weight`, `.lora_B.weight`, alpha in the file's metadata). A layer's update is dW =
(alpha / r) up @ down (LoHa, LoKr: `LoRALayer`); `resolve` finds the parameter of our model it changes (and the
rows of a fused q / k / v projection) through the same renaming rules as the checkpoints.
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
KOHYA_PARTS = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha",
               **{p: p for p in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "lokr_w1", "lokr_w1_a",
                                 "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")}}  # LoRA, LoHa, LoKr
FACTORS = {"lora": ({"down"}, {"up"}), "loha": ({"hada_w1_a"}, {"hada_w1_b"}, {"hada_w2_a"}, {"hada_w2_b"}),
           "lokr": ({"lokr_w1", "lokr_w1_a"}, {"lokr_w1", "lokr_w1_b"}, {"lokr_w2", "lokr_w2_a"},
                    {"lokr_w2", "lokr_w2_b"})}  # what each kind needs: one of each set
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
    """One adapted weight: the source's module name (dotted, in the naming of its format's model), its factors and
    alpha (None: a gain of 1). The factors are LoRA's `down` [r, in(, kh, kw)] and `up` [out, r(, 1, 1)]: dW = up @
    down; LyCORIS LoHa's hada_w1_a / _b, hada_w2_a / _b: dW = (w1_a @ w1_b) * (w2_a @ w2_b); or LyCORIS LoKr's
    lokr_w1 (or lokr_w1_a @ lokr_w1_b) and lokr_w2 (or lokr_w2_a @ lokr_w2_b): dW = w1 (x) w2 (Kronecker)."""

    component: str  # unet, text_encoder or text_encoder_2
    module: str
    factors: dict[str, Tensor]
    alpha: float | None = None

    @property
    def kind(self) -> str:
        """'lora', 'loha' or 'lokr'."""
        return "lora" if "down" in self.factors else "loha" if "hada_w1_a" in self.factors else "lokr"

    @property
    def rank(self) -> int | None:
        """r of alpha / r: LoRA's and LoHa's inner size, LoKr's decomposed factor's (None: LoKr of full factors)."""
        f = self.factors
        inner = {"lora": f.get("down"), "loha": f.get("hada_w1_b"), "lokr": f.get("lokr_w1_b", f.get("lokr_w2_b"))}
        inner = inner[self.kind]
        return None if inner is None else inner.shape[0]

    @property
    def gain(self) -> float:
        """alpha / r (1 without an alpha, or for a LoKr of full factors), as kohya and LyCORIS scale."""
        return self.alpha / self.rank if self.alpha is not None and self.rank else 1.0

    def shape(self) -> tuple[int, int]:
        """(out, the size of one output's weights) of dW; ValueError if the factors do not multiply."""
        f, kind = self.factors, self.kind
        pairs = {"lora": [("up", "down")], "loha": [("hada_w1_a", "hada_w1_b"), ("hada_w2_a", "hada_w2_b")],
                 "lokr": [(f"lokr_w{i}_a", f"lokr_w{i}_b") for i in "12" if f"lokr_w{i}_a" in f]}[kind]
        for a, b in pairs:
            if f[a].shape[1] != f[b].shape[0]:
                raise ValueError(f"its {a} {tuple(f[a].shape)} and {b} {tuple(f[b].shape)} do not multiply")
        if kind == "lora":
            return f["up"].shape[0], math.prod(f["down"].shape[1:])
        if kind == "loha":
            if (f["hada_w1_a"].shape[0], f["hada_w1_b"].shape[1]) != (f["hada_w2_a"].shape[0], f["hada_w2_b"].shape[1]):
                raise ValueError("its two Hadamard factors differ in shape")
            return f["hada_w1_a"].shape[0], f["hada_w1_b"].shape[1]
        (o1, i1), w2 = self._kron_factor(1).shape, self._kron_factor(2)
        return o1 * w2.shape[0], i1 * math.prod(w2.shape[1:])

    def _kron_factor(self, i: int) -> Tensor:
        f = self.factors
        return f[f"lokr_w{i}"] if f"lokr_w{i}" in f else f[f"lokr_w{i}_a"].float() @ f[f"lokr_w{i}_b"].float()

    def delta(self) -> Tensor:
        """dW in float32 (without the gain), [out, size] (`shape`) but for LoRA's conv factors [out, in, kh, kw]."""
        f = {k: v.float() for k, v in self.factors.items()}
        if self.kind == "lora":
            return (f["up"].flatten(1) @ f["down"].flatten(1)).reshape(f["up"].shape[0], *f["down"].shape[1:])
        if self.kind == "loha":
            return (f["hada_w1_a"] @ f["hada_w1_b"]) * (f["hada_w2_a"] @ f["hada_w2_b"])
        w1, w2 = self._kron_factor(1).float(), self._kron_factor(2).float()
        w1 = w1.reshape(*w1.shape, *[1] * (w2.ndim - 2))  # (a conv w2 [o2, i2, kh, kw]: w1 [o1, i1, 1, 1])
        return torch.kron(w1, w2).reshape(self.shape())

    def add_to(self, w: Tensor, scale: float) -> None:
        """w += scale (alpha / r) dW in place, for w the adapted rows [out, in(, kh, kw)] of a weight of any dtype
        (accumulated in float32; LoRA in one pass over fp32 weights)."""
        out, alpha = w.shape[0], scale * self.gain
        if self.kind == "lora" and w.dtype == torch.float32:
            up, down = self.factors["up"].flatten(1).float(), self.factors["down"].flatten(1).float()
            w.view(out, -1).addmm_(up.to(w.device), down.to(w.device), alpha=alpha)
        else:
            w.copy_((w.float().reshape(out, -1) + alpha * self.delta().to(w.device).reshape(out, -1)).reshape(w.shape))


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
        if kohya and part not in parts:
            raise LoRAError(f"{path}: {key}: {part!r} layers (LyCORIS Tucker / DoRA / full-weight kinds) are not "
                            f"read; LoRA, LoCon, LoHa and LoKr are")
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
        a = float(g.pop("alpha")) if "alpha" in g else alpha.get(component)
        layer = LoRALayer(component, module, g, a)
        missing = [" or ".join(sorted(need)) for need in FACTORS[layer.kind] if not need & set(g)]
        if missing:
            raise LoRAError(f"{path}: {component} layer {module} lacks its {missing[0]} factor")
        layers.append(layer)
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
            try:
                shape = layer.shape()  # dW's (out, in x kh x kw)
            except ValueError as e:
                raise LoRAError(f"LoRA layer {layer.module} ({layer.component}): {e}") from None
            lora_in = layer.factors["down"].shape[1] if layer.kind == "lora" else w.shape[1]  # (1x1 convs on linears)
            if shape != (w[rows].shape[0], w[rows][0].numel()) or lora_in != w.shape[1]:
                raise LoRAError(f"LoRA layer {layer.module} ({layer.component}) has shape {shape} ({layer.kind}, rank "
                                f"{layer.rank}), the model's {base} {tuple(w[rows].shape)} (a LoRA made for another "
                                f"model?)")
            return Target(base, rows)
    raise LoRAError(f"LoRA layer {layer.module} ({layer.component}) names a module this model lacks (a LoRA made "
                    f"for another model, e.g. SDXL on SD 1.x?)")


def renamer(rules: list) -> Callable[[str], str | None]:
    return lambda key: rename_key(key, rules)


def text_rule(key: str) -> str:
    """transformers' CLIP names -> ours (the same below text_model.)."""
    return re.sub(r"^text_model\.", "", key)
