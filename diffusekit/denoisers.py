"""The one interface between networks and everything else (STYLE §1).

A denoiser is any callable  D(x_t, t, cond) -> Prediction(eps_hat, x0_hat)  where x_t is a batch
[B, ...], t a float64 tensor [B] of schedule times and cond a dict of per-sample condition tensors
(class labels, text tokens, ...). Samplers and guidance wrappers see only this interface; integer
timesteps and prediction types live in `NetworkDenoiser`.
"""

from __future__ import annotations

from typing import Mapping, Protocol

from torch import Tensor, nn

from .parametrization import Prediction, check_prediction_type, expand_like, to_prediction
from .schedules import Schedule

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
        self.prediction = check_prediction_type(prediction)
        self.timestep_scale = timestep_scale
        self.learned_sigma = bool(getattr(getattr(net, "config", None), "learned_sigma", False))

    def __call__(self, x: Tensor, t: Tensor, cond: Cond | None = None) -> Prediction:
        a, b = (expand_like(c, x) for c in self.schedule.alpha_sigma(t))
        out = self.net(x, (t * self.timestep_scale).to(x.device, x.dtype), **(cond or {}))
        var_frac = None
        if self.learned_sigma:
            out, v = out.chunk(2, dim=1)
            var_frac = (v.to(x.dtype) + 1) / 2
        if out.shape != x.shape:
            raise ValueError(f"network output shape {tuple(out.shape)} differs from its input {tuple(x.shape)}")
        return to_prediction(out, x, a, b, self.prediction)._replace(var_frac=var_frac)
