"""The one interface between networks and everything else (STYLE §1).

A denoiser is any callable  D(x_t, t, cond) -> Prediction(eps_hat, x0_hat)  where x_t is a batch
[B, ...], t a float64 tensor [B] of schedule times (samplers keep it on the CPU, where the schedule's
float64 math is free; a denoiser moves what it needs to x's device, so a sampling step never waits on
the device) and cond a dict of per-sample condition tensors (class labels, text tokens, ...). Samplers and guidance wrappers see only this interface; integer
timesteps and prediction types live in `NetworkDenoiser`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Protocol

import torch
from torch import Tensor, nn

from .parametrization import Prediction, expand_like, parametrization
from .schedules import Schedule, make_schedule

Cond = Mapping[str, Tensor]


class Denoiser(Protocol):
    def __call__(self, x: Tensor, t: Tensor, cond: Cond | None = None) -> Prediction: ...


class NetworkDenoiser:
    """Wraps a network  net(x, timestep, **cond) -> output  into a denoiser.

    `prediction` names what the network outputs (eps, x0, v, flow); `timestep_scale` maps schedule time
    to the network's timestep (1 for VP tables in steps, 1000 for SD3-style rectified flow). A network
    whose config sets `learned_sigma` outputs twice the channels: the prediction, then v in [-1, 1]."""

    def __init__(self, net: nn.Module, schedule: Schedule, prediction: str = "eps", timestep_scale: float = 1.0):
        self.net, self.schedule = net, schedule
        self.prediction, self.parametrization = prediction, parametrization(prediction)
        self.timestep_scale = timestep_scale
        self.learned_sigma = bool(getattr(getattr(net, "config", None), "learned_sigma", False))

    def _net(self, x: Tensor, t: Tensor, cond: Cond | None) -> Tensor:
        """The network on x in its own dtype (floating conditions cast alike), timesteps scaled."""
        param = next(self.net.parameters(), None) if isinstance(self.net, nn.Module) else None
        dtype = param.dtype if param is not None else x.dtype
        cond = {k: v.to(dtype) if v.is_floating_point() else v for k, v in (cond or {}).items()}
        return self.net(x.to(dtype), (t * self.timestep_scale).to(x.device, torch.float32), **cond)

    def __call__(self, x: Tensor, t: Tensor, cond: Cond | None = None) -> Prediction:
        a, b = (expand_like(c, x) for c in self.schedule.alpha_sigma(t))
        out = self._net(x, t, cond)
        var_frac = None
        if self.learned_sigma:
            out, v = out.chunk(2, dim=1)
            var_frac = (v.to(x.dtype) + 1) / 2
        if out.shape != x.shape:
            raise ValueError(f"network output shape {tuple(out.shape)} differs from its input {tuple(x.shape)}")
        return self.parametrization.to_prediction(out.to(x.dtype), x, a, b)._replace(var_frac=var_frac)

    def loss(self, x0: Tensor, t: Tensor, eps: Tensor, cond: Cond | None = None,
             min_snr_gamma: float | None = None) -> Tensor:
        """Per-sample training loss [B]: MSE between the network output at x_t = a x0 + b eps and its target.

        With min_snr_gamma, weighted so that the effective weight on the x0 error is min(SNR, gamma)
        (Min-SNR, Hang et al. 2023) whatever the prediction type."""
        if self.learned_sigma:
            raise ValueError("training learned-sigma networks (hybrid VLB loss) is not supported; set learned_sigma = false")
        a, b = (expand_like(c, x0) for c in self.schedule.alpha_sigma(t))
        x_t = a * x0 + b * eps
        out = self._net(x_t, t, cond)
        target = self.parametrization.target(x0, eps, a, b)
        mse = (out.float() - target.float()).square().flatten(1).mean(1)
        if not min_snr_gamma:
            return mse
        snr = self.schedule.snr(t).to(x0.device, torch.float32)
        w0 = self.parametrization.x0_weight(a, b).flatten().float()
        return mse * torch.where(w0 > 0, snr.clamp(max=min_snr_gamma) / w0, torch.ones_like(w0))


@dataclass
class DiffusionSettings:
    """How a network's outputs and times are read (stored in the model folder's config.json)."""

    schedule: str = "linear"
    timesteps: int = 1000
    zero_terminal_snr: bool = False
    shift: float = 1.0
    prediction: str = "eps"
    timestep_scale: float = 1.0
    beta_range: tuple[float, float] | None = None  # None: the named schedule's own
    spacing: str = ""  # default sampling grid: leading, trailing, linspace, karras, exponential ("": the schedule's)
    steps_offset: int = 0

    def __post_init__(self):
        if self.beta_range is not None:
            self.beta_range = tuple(self.beta_range)

    def make_schedule(self) -> Schedule:
        return make_schedule(self.schedule, self.timesteps, self.zero_terminal_snr, self.shift, self.beta_range)

    def denoiser(self, net: nn.Module, schedule: Schedule | None = None) -> "NetworkDenoiser":
        """`net` read as these settings say (on `schedule`, default: a new one from the settings)."""
        return NetworkDenoiser(net, schedule or self.make_schedule(), self.prediction, self.timestep_scale)

    def grid(self, schedule: Schedule, steps: int, spacing: str | None = None) -> Tensor:
        """The sampling grid: `spacing` if given, else this model's default."""
        spacing = spacing or self.spacing
        if not spacing:
            return schedule.timesteps(steps)
        return schedule.timesteps(steps, spacing, self.steps_offset if spacing == "leading" else 0)
