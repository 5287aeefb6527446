"""LoRAs on a pipeline's UNet and CLIP text encoders (SPEC's denoiser and text encoder, W + s dW per file).

Merged (the default), the updates are added to the weights once, so sampling costs what it costs without them;
the original values of the changed parameters are kept, and `remove` puts them back bit-exactly. Unmerged, each
adapted layer gets a forward hook adding s (alpha / r) up(down(x)) to its output: a cost per step, but the
scales can change between generations (`set_scales`) without touching the weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..interop.diffusers_unet import unet_rules
from ..interop.ldm_unet import LDM_UNET
from ..interop.lora import LoRAError, LoRALayer, Target, read_lora, renamer, resolve, text_rule
from ..models.unet import UNet
from .pipeline import Pipeline


def components(pipe: Pipeline) -> dict[str, tuple[nn.Module, list]]:
    """The pipeline's networks a LoRA can adapt, by the component names of LoRA files, with the renamings from
    the files' module names to ours (UNet: diffusers' names, then LDM's as in SDXL kohya files)."""
    out: dict[str, tuple[nn.Module, list]] = {}
    if isinstance(pipe.net, UNet):
        out["unet"] = (pipe.net, [renamer(unet_rules(pipe.net.config)), renamer(LDM_UNET)])
    out.update({name: (enc.model, [text_rule]) for name, enc in pipe.clip_encoders.items()})
    return out


class LoRAs:
    """LoRA files with their scales, applied to `pipe` (merged, or by hooks with merge=False) until `remove` (or
    the end of a with block). Every layer of every file is resolved and checked first: a LoRAError naming the
    first layer that does not fit leaves the pipeline unchanged. With restore=False (a process that ends after
    its run, as the command line does) merged LoRAs keep no originals, saving their memory, and stay in the
    model: `remove` then has nothing to put back."""

    def __init__(self, pipe: Pipeline, files: Sequence[tuple[str | Path, float]], merge: bool = True,
                 restore: bool = True):
        nets = components(pipe)
        params = {name: dict(net.named_parameters()) for name, (net, _) in nets.items()}
        self.pipe, self.merge, self.restore, self.scales = pipe, merge, restore, [float(s) for _, s in files]
        self.layers: list[tuple[int, LoRALayer, nn.Module, Target]] = []
        for i, (path, _) in enumerate(files):
            for layer in read_lora(path):
                if layer.component not in nets:
                    raise LoRAError(f"{path}: adapts the {layer.component}, which this model lacks (it has: "
                                    f"{', '.join(nets) or 'no UNet or CLIP text encoder'})")
                net, rules = nets[layer.component]
                self.layers.append((i, layer, net, resolve(layer, params[layer.component], rules)))
        self.saved: dict[tuple[int, str], Tensor] = {}
        self.hooks = []
        self._apply()

    def _apply(self) -> None:
        if not self.merge:
            self.hooks = [net.get_submodule(t.name.rpartition(".")[0]).register_forward_hook(
                self._hook(i, layer, t, net.get_parameter(t.name))) for i, layer, net, t in self.layers]
        else:
            with torch.no_grad():
                for i, layer, net, t in self.layers:
                    w = net.get_parameter(t.name)
                    if self.restore and (id(net), t.name) not in self.saved:
                        self.saved[id(net), t.name] = w.detach().clone()
                    layer.add_to(w[t.rows], self.scales[i])
        if self.layers:
            self.pipe.conditioner.forget_encodings()

    def _hook(self, i: int, layer: LoRALayer, t: Target, weight: Tensor):
        """The forward hook adding s (alpha / r) dW x to the rows `t.rows` of a layer's output: LoRA by its two
        factors, LoHa and LoKr by their dW, made once (the shape of the layer's `weight` rows)."""
        delta = None if layer.kind == "lora" else layer.delta().reshape(weight[t.rows].shape)

        def hook(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> Tensor:
            x, s = inputs[0], self.scales[i] * layer.gain
            if s == 0:
                return output
            if isinstance(module, nn.Conv2d):
                conv = dict(stride=module.stride, padding=module.padding, dilation=module.dilation)
                y = F.conv2d(x, delta.to(x), **conv) if delta is not None else F.conv2d(
                    F.conv2d(x, layer.factors["down"].to(x), **conv), layer.factors["up"].to(x))
                output[:, t.rows] += s * y
            else:
                y = F.linear(x, delta.to(x)) if delta is not None else F.linear(
                    F.linear(x, layer.factors["down"].to(x).flatten(1)), layer.factors["up"].to(x).flatten(1))
                output[..., t.rows] += s * y
            return output
        return hook

    def set_scales(self, scales: Sequence[float]) -> None:
        """New scales, one per file (unmerged only: merged weights would have to be redone)."""
        if self.merge:
            raise ValueError("the scales of merged LoRAs are fixed; apply them with merge=False to change them")
        if len(scales) != len(self.scales):
            raise ValueError(f"expected {len(self.scales)} scales, got {len(scales)}")
        self.scales[:] = map(float, scales)
        self.pipe.conditioner.forget_encodings()

    def remove(self) -> None:
        """Take the LoRAs off: the saved original values back (bit-exact), or the hooks removed (merged with
        restore=False: nothing to do, the model keeps them)."""
        for h in self.hooks:
            h.remove()
        with torch.no_grad():
            for _, _, net, t in self.layers:
                if (key := (id(net), t.name)) in self.saved:
                    net.get_parameter(t.name).copy_(self.saved.pop(key))
        self.hooks = []
        if self.layers:
            self.pipe.conditioner.forget_encodings()

    def __enter__(self) -> LoRAs:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()
