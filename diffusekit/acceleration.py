"""Inference-time speed switches: the networks' precision, channels_last, prepacked convolutions, torch.compile.

The default pipeline computes in float32 and matches diffusers to float32 rounding; these switches trade that
exactness for speed. Only the denoiser network and the autoencoder change: the sampler state and its update math
stay float32 (samplers promote the state, the pipeline's encode / decode return float32), so bf16 rounds the
network's prediction and the autoencoder's images and nothing else.
"""

from __future__ import annotations

import ctypes
import platform
import statistics
from typing import Protocol

import torch
from torch import Tensor, nn

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}  # precision names (and "auto"); None: float32
# Median Conv2d width from which NHWC activations and prepacked weights pay on an AMX CPU: in bf16 SD-1.5's UNet
# (320-1280 channels) runs 1.2-1.3x faster with both and its VAE decoder 2.3x, in float32 1.05-1.16x; the bundled
# 40 / 80-channel MNIST UNet runs 1.3x slower in bf16 (BENCHMARKS.md).
BLOCKED_LAYOUT_WIDTH = 256


# glibc's mallopt parameters and the allocator the command line sets up: blocks below HEAP_BLOCK_BYTES come from
# the heap (glibc's default maps anything above 128 KiB - 32 MiB on its own, faulted in page by page every time an
# activation is allocated) and up to KEPT_FREE_BYTES of freed heap stays mapped for the next step's tensors; larger
# blocks (a 1024 px decode's activations) stay mmaps of their own, returned whole when freed, so they fragment
# nothing.
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, HEAP_BLOCK_BYTES, KEPT_FREE_BYTES = -1, -3, 64 << 20, 1 << 30


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


def keep_freed_memory() -> bool:
    """Make glibc's malloc serve blocks below HEAP_BLOCK_BYTES from its heap and keep freed memory for reuse, in
    this process.

    By default an SD-1.5 UNet forward takes 55,000-141,000 page faults (zero-filled pages of fresh mmaps and of a
    heap trimmed and regrown), none measured with this, and its bf16 forward runs 4-7% faster; blocks above the
    threshold stay mmaps, so a 1024 px bf16 decode peaks as with the default (taking every block from the heap
    instead fragmented it: +2.4 GB; BENCHMARKS.md). A process setting, so the command line calls it, not the library.
    False (nothing changed) where the C library is not glibc."""
    if platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(None)
    return bool(libc.mallopt(M_MMAP_THRESHOLD, HEAP_BLOCK_BYTES)) and bool(libc.mallopt(M_TRIM_THRESHOLD,
                                                                                        KEPT_FREE_BYTES))


def blocked_layout(net: nn.Module, device: torch.device | str) -> bool:
    """Whether channels_last and prepacked convolution weights are the faster choice for `net`: on a CPU with AMX
    tiles, in bf16 or float32, for a network whose convolutions are wide (median width >= BLOCKED_LAYOUT_WIDTH)."""
    if torch.device(device).type != "cpu" or not torch.cpu._is_amx_tile_supported():
        return False
    widths = [m.out_channels for m in net.modules() if isinstance(m, nn.Conv2d)]
    return (bool(widths) and next(net.parameters()).dtype in (torch.float32, torch.bfloat16)
            and statistics.median(widths) >= BLOCKED_LAYOUT_WIDTH)


def to_channels_last(net: nn.Module) -> nn.Module:
    """`net.to(memory_format=torch.channels_last)` in place: each 4-d parameter and buffer is reordered within its
    own storage (through a temporary the size of one tensor), so the conversion takes no second copy of the
    weights and no fresh pages (SD-1.5's UNet in bf16: 1.5 s and +0.42 GB peak with glibc keeping freed memory
    through `Module.to`; BENCHMARKS.md)."""
    for t in (*net.parameters(), *net.buffers()):
        if t.dim() != 4 or t.is_contiguous(memory_format=torch.channels_last):
            continue
        if not t.is_contiguous():  # a strided view: no storage of its own to reorder within
            t.data = t.detach().contiguous(memory_format=torch.channels_last)
            continue
        values = t.detach().clone()
        _, C, H, W = t.shape
        t.data = t.detach().as_strided(t.shape, (C * H * W, 1, W * C, C)).copy_(values)
    return net


class PackedConv2d(nn.Conv2d):
    """A Conv2d whose weight oneDNN reorders once into its blocked layout (an eager convolution reorders it on
    every call: 7x the time of a 1280-channel 8x8 convolution on AMX). The packed copy is rebuilt when the weight
    changes (a LoRA merged in place, a new dtype or memory format); autograd, non-CPU inputs, padding modes
    other than zeros and weights made under torch.inference_mode (which have no version counter to tell a change
    by) take nn.Conv2d's path. `prepack` turns a network's Conv2d layers into these."""

    def _conv_forward(self, input: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        if (input.device.type != "cpu" or self.padding_mode != "zeros" or isinstance(self.padding, str)
                or weight is not self.weight or (torch.is_grad_enabled() and weight.requires_grad)
                or weight.is_inference()):
            return super()._conv_forward(input, weight, bias)
        geometry = list(self.padding), list(self.stride), list(self.dilation), self.groups
        key = (weight._version, weight.data_ptr(), weight.dtype, weight.stride())
        if getattr(self, "_packed_key", None) != key:
            self._packed = torch.ops.mkldnn._reorder_convolution_weight(weight, *geometry, list(input.shape))
            self._packed_key = key
        return torch.ops.mkldnn._convolution_pointwise(input, self._packed, bias, *geometry, "none", [], "")

    def __getstate__(self) -> dict:
        """Without the packed copy (oneDNN's opaque tensors cannot be copied or pickled; it is rebuilt)."""
        state = dict(self.__dict__)
        state.pop("_packed", None), state.pop("_packed_key", None)
        return state


def prepack(net: nn.Module) -> nn.Module:
    """Turn every nn.Conv2d of `net` into a PackedConv2d in place (same parameters and state dict)."""
    for m in net.modules():
        if type(m) is nn.Conv2d:
            m.__class__ = PackedConv2d
    return net


def accelerate(pipe: HasNetwork, *, dtype: torch.dtype | None = None, channels_last: bool | None = None,
               packed: bool | None = None, compile: bool = False) -> HasNetwork:
    """Convert `pipe`'s network and its autoencoder (latent models) in place and return the pipeline.

    - dtype: compute dtype of both, e.g. torch.bfloat16 (about 2x on CPUs with AVX512-BF16 / AMX, where the
      float32 convolutions already run at the core's peak);
    - channels_last: NHWC activations and weights; packed: convolution weights prepacked for oneDNN
      (`PackedConv2d`). None (the default) chooses both for each by `blocked_layout`: on for wide networks on AMX
      CPUs, off elsewhere (on narrow networks and without AMX both were measured slower);
    - compile: torch.compile the network (inductor; on the CPU it needs a C++ compiler and the weights are
      frozen into prepacked oneDNN layouts, so compile once per shape and sample many times)."""
    for net in (pipe.net, getattr(pipe, "autoencoder", None)):
        if net is None:
            continue
        if dtype is not None:
            net.to(dtype)
        blocked = blocked_layout(net, pipe.device)
        if blocked if channels_last is None else channels_last:
            to_channels_last(net)
        if (blocked if packed is None else packed) and not (compile and net is pipe.net):
            prepack(net)
    if compile:
        pipe.net.compile(options={"freezing": True} if pipe.device.type == "cpu" else None)
    return pipe
