"""Guidance as denoiser -> denoiser wrappers (SPEC §5, §7); they compose with each other and with
every sampler."""

from __future__ import annotations

import torch
from torch import Tensor

from .denoisers import Cond, Denoiser
from .parametrization import Prediction


def concat_cond(cond: Cond, uncond: Cond, batch: int) -> dict[str, Tensor]:
    """Stack two condition dicts along the batch: [cond; uncond]. A batch-1 uncond is broadcast."""
    if set(cond) != set(uncond):
        raise ValueError(f"cond and uncond must have the same keys, got {sorted(cond)} and {sorted(uncond)}")
    out = {}
    for k, c in cond.items():
        u = uncond[k]
        if u.shape[0] == 1 and c.shape[0] == batch:
            u = u.expand(batch, *u.shape[1:])
        if c.shape != u.shape or c.shape[0] != batch:
            raise ValueError(
                f"condition {k!r}: cond has shape {tuple(c.shape)}, uncond {tuple(u.shape)}; "
                f"both need batch {batch} and the same shape"
            )
        out[k] = torch.cat([c, u])
    return out


class CFG:
    """Classifier-free guidance (Ho & Salimans 2022): D = D_u + s (D_c - D_u).

    `uncond` is the null condition (empty prompt, null class) or a negative prompt's. Cond and uncond
    run as one batch of 2B; s = 1 is exactly the conditional denoiser, s = 0 the unconditional one."""

    def __init__(self, denoiser: Denoiser, scale: float, uncond: Cond):
        self.denoiser, self.scale, self.uncond = denoiser, scale, uncond

    def __call__(self, x: Tensor, t: Tensor, cond: Cond | None = None) -> Prediction:
        cond = cond or {}
        if self.scale == 1:
            return self.denoiser(x, t, cond)
        both = concat_cond(cond, self.uncond, len(x))
        if self.scale == 0:
            return self.denoiser(x, t, {k: v[len(x):] for k, v in both.items()})
        p = self.denoiser(torch.cat([x, x]), torch.cat([t, t]), both)
        (eps_c, eps_u), (x0_c, x0_u) = p.eps.chunk(2), p.x0.chunk(2)
        return Prediction(eps_u, x0_u).combine(Prediction(eps_c, x0_c), self.scale)
