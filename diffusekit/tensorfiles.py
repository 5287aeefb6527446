"""Reading weights files: safetensors read in bounded pieces and cast as they are read, and the finiteness check
every load and save runs."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping

import torch
from safetensors import safe_open
from torch import Tensor

PIECE_BYTES = 2**28  # file bytes mapped at once: a cast load peaks at the cast weights + one piece
ITEM_BYTES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2}


def read_safetensors(path: str | Path, device: str = "cpu", dtype: torch.dtype | None = None) -> dict[str, Tensor]:
    """The tensors of a .safetensors file, floating ones cast to `dtype` (None: as stored). The file is mapped a
    piece of <= 256 MB at a time and each piece unmapped before the next, so the file's pages do not stay in the
    process's memory beside the cast copies (a bf16 load of SD-1.5's fp32 UNet: 2.0 GB peak, not 5.0)."""
    with safe_open(path, framework="pt", device=device) as f:
        keys = list(f.keys())
        slices = [f.get_slice(k) for k in keys]
        sizes = [math.prod(s.get_shape()) * ITEM_BYTES.get(s.get_dtype(), 1) for s in slices]
    pieces, start, total = [], 0, 0
    for i, size in enumerate(sizes):
        if i > start and total + size > PIECE_BYTES:
            pieces.append(keys[start:i])
            start, total = i, 0
        total += size
    pieces.append(keys[start:])
    state = {}
    for piece in pieces:
        with safe_open(path, framework="pt", device=device) as f:
            for k in piece:
                v = f.get_tensor(k)
                state[k] = v.to(dtype) if dtype is not None and v.is_floating_point() else v
    return state


def first_non_finite(tensors: Mapping[str, Tensor]) -> str | None:
    """The name of the first floating tensor holding NaN or inf, else None: a tensor is finite exactly when its
    minimum and maximum are (NaN propagates into both, +-inf is one of them), and one min/max pass allocates
    nothing the tensor's size (0.2 s instead of 7 s over SD-1.5's 3.4 GB UNet); one host read for all of them."""
    floats = [(k, v) for k, v in tensors.items() if v.is_floating_point() and not v.is_meta and v.numel()]
    if not floats:
        return None
    ends = torch.stack([torch.stack(torch.aminmax(v)).float() for _, v in floats])  # (N, 2)
    bad = (~ends.isfinite()).any(dim=1).nonzero()
    return floats[int(bad[0])][0] if len(bad) else None
