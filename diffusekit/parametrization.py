"""What a network predicts, and the one conversion to (eps_hat, x0_hat) (SPEC §1).

With x_t = a x_0 + b eps, a network may predict
  eps   the noise,
  x0    the clean sample,
  v     a eps - b x_0 (Salimans & Ho 2022),
  flow  the rectified-flow velocity eps - x_0.
Samplers and guidance only ever see a `Prediction`, so none of them special-cases a model.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

import torch
from torch import Tensor

class Prediction(NamedTuple):
    """A denoiser's output: predicted noise and predicted clean sample, consistent with x_t, and for
    learned-variance networks the interpolation v in [0, 1] of the log variance between beta-tilde and
    beta (Improved DDPM: log Sigma = v log beta + (1 - v) log beta-tilde)."""

    eps: Tensor
    x0: Tensor
    var_frac: Tensor | None = None

    def map(self, f: Callable[[Tensor], Tensor]) -> "Prediction":
        """f applied to every field that is present."""
        return Prediction(*(None if v is None else f(v) for v in self))

    def chunk(self, n: int) -> tuple["Prediction", ...]:
        """Split every field into n equal parts along the batch (CFG's [cond; uncond])."""
        parts = [[None] * n if v is None else v.chunk(n) for v in self]
        return tuple(Prediction(*fields) for fields in zip(*parts))

    @staticmethod
    def cat(predictions: Sequence["Prediction"]) -> "Prediction":
        """Concatenate predictions along the batch, field by field."""
        return Prediction(*(None if vs[0] is None else torch.cat(vs) for vs in zip(*predictions)))

    def combine(self, other: "Prediction", weight: float) -> "Prediction":
        """self + weight * (other - self) for eps and x0 (both affine in the model output); the variance
        is taken from `other` (the conditional branch of CFG, as DiT does)."""
        return Prediction(self.eps + weight * (other.eps - self.eps), self.x0 + weight * (other.x0 - self.x0),
                          other.var_frac)


class Parametrization:
    """What a network of one kind predicts, as three formulas side by side: its output -> (eps_hat, x0_hat),
    its training target for x_t = a x0 + b eps, and ||d target / d x0||^2 at fixed x_t, the weight its MSE puts
    on the x0 error (used by Min-SNR weighting)."""

    name: str

    def to_prediction(self, out: Tensor, x_t: Tensor, a: Tensor, b: Tensor) -> Prediction:
        raise NotImplementedError

    def target(self, x0: Tensor, eps: Tensor, a: Tensor, b: Tensor) -> Tensor:
        raise NotImplementedError

    def x0_weight(self, a: Tensor, b: Tensor) -> Tensor:
        raise NotImplementedError


class Eps(Parametrization):
    name = "eps"

    def to_prediction(self, out, x_t, a, b):
        return Prediction(out, (x_t - b * out) / a)

    def target(self, x0, eps, a, b):
        return eps

    def x0_weight(self, a, b):
        return (a / b) ** 2  # SNR


class X0(Parametrization):
    name = "x0"

    def to_prediction(self, out, x_t, a, b):
        return Prediction((x_t - a * out) / b, out)

    def target(self, x0, eps, a, b):
        return x0

    def x0_weight(self, a, b):
        return torch.ones_like(a)


class V(Parametrization):
    """[x_t; v] = [[a, b], [-b, a]] [x0; eps] (Salimans & Ho 2022)."""

    name = "v"

    def to_prediction(self, out, x_t, a, b):
        n = a * a + b * b
        return Prediction((b * x_t + a * out) / n, (a * x_t - b * out) / n)

    def target(self, x0, eps, a, b):
        return a * eps - b * x0

    def x0_weight(self, a, b):
        return (a * a + b * b) ** 2 / b**2  # SNR + 1 for VP


class Flow(Parametrization):
    """The rectified-flow velocity v = eps - x0, so x_t = a (eps - v) + b eps."""

    name = "flow"

    def to_prediction(self, out, x_t, a, b):
        n = a + b
        return Prediction((x_t + a * out) / n, (x_t - b * out) / n)

    def target(self, x0, eps, a, b):
        return eps - x0

    def x0_weight(self, a, b):
        return (a + b) ** 2 / b**2


PARAMETRIZATIONS: dict[str, Parametrization] = {p.name: p for p in (Eps(), X0(), V(), Flow())}
PREDICTION_TYPES = tuple(PARAMETRIZATIONS)


def parametrization(kind: str) -> Parametrization:
    """The parametrization of a prediction type (eps, x0, v, flow)."""
    if kind not in PARAMETRIZATIONS:
        raise ValueError(f"unknown prediction type {kind!r}; valid: {PREDICTION_TYPES}")
    return PARAMETRIZATIONS[kind]


def to_prediction(out: Tensor, x_t: Tensor, a: Tensor, b: Tensor, kind: str) -> Prediction:
    """Convert a network output of the given kind into (eps_hat, x0_hat); a, b broadcast against x_t."""
    return parametrization(kind).to_prediction(out.to(x_t.dtype), x_t, a, b)


def training_target(kind: str, x0: Tensor, eps: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """The regression target of a network of the given kind for x_t = a x0 + b eps."""
    return parametrization(kind).target(x0, eps, a, b)


def x0_weight(kind: str, a: Tensor, b: Tensor) -> Tensor:
    """The weight a kind's MSE puts on the x0 error (eps: SNR, x0: 1, v: (a^2 + b^2)^2 / b^2, flow: (a + b)^2 / b^2)."""
    return parametrization(kind).x0_weight(a, b)


def expand_like(c: Tensor, x: Tensor) -> Tensor:
    """Reshape a per-sample coefficient [B] (or scalar) to broadcast against x [B, ...], in x's dtype."""
    c = torch.as_tensor(c).to(device=x.device, dtype=x.dtype)
    return c.reshape(c.shape + (1,) * (x.ndim - c.ndim))
