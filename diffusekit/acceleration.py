"""Inference-time speed switches: the network's precision, channels_last, torch.compile.

The default pipeline computes in float32 and matches diffusers to float32 rounding; these switches trade that
exactness for speed. Only the denoiser network changes: the sampler state and its update math stay float32
(samplers promote the state), so bf16 rounds the network's prediction and nothing else.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}  # precision names (and "auto"); None: float32


class HasNetwork(Protocol):
    net: nn.Module
    device: torch.device


def native_dtype(device: torch.device | str) -> torch.dtype | None:
    """The low precision `device` computes natively, where it is the faster choice: bfloat16 on CPUs with
    AVX512-BF16 or AMX (about 2x float32 there) and on CUDA GPUs that support it; None (float32) elsewhere,
    e.g. on CPUs whose oneDNN would only emulate bf16."""
    device = torch.device(device)
    if device.type == "cpu":
        native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    else:
        native = device.type == "cuda" and torch.cuda.is_bf16_supported()
    return torch.bfloat16 if native else None


def resolve_dtype(name: str, device: torch.device | str) -> str:
    """A precision name of DTYPES, with 'auto' resolved: bf16 where `device` computes it natively, else fp32."""
    if name == "auto":
        return "bf16" if native_dtype(device) == torch.bfloat16 else "fp32"
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; valid: auto, {', '.join(DTYPES)}")
    return name


def accelerate(pipe: HasNetwork, *, dtype: torch.dtype | None = None, channels_last: bool = False,
               compile: bool = False) -> HasNetwork:
    """Convert `pipe`'s network in place and return the pipeline.

    - dtype: compute dtype of the network, e.g. torch.bfloat16 (about 2x on CPUs with AVX512-BF16 / AMX,
      where the float32 convolutions already run at the core's peak);
    - channels_last: NHWC activations and weights (pays on GPUs with tensor cores, neutral on the CPU);
    - compile: torch.compile the network (inductor; on the CPU it needs a C++ compiler and the weights are
      frozen into prepacked oneDNN layouts, so compile once per shape and sample many times)."""
    net = pipe.net
    if dtype is not None:
        net.to(dtype)
    if channels_last:
        net.to(memory_format=torch.channels_last)
    if compile:
        net.compile(options={"freezing": True} if pipe.device.type == "cpu" else None)
    return pipe
