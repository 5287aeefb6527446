"""Samplers: small pure functions with one signature (SPEC §2; k-diffusion's sampling.py as model).

    sampler(denoiser, x, ts, schedule, cond=None, *, generator=None, callback=None, progress=False, ...)

`x` is the state at time ts[0] (pure noise for text-to-image, a noised image for img2img), `ts` a
decreasing grid ending at schedule.t_clean. Update math runs in float32 or better whatever the
network's precision; coefficients are computed in float64.
"""

from __future__ import annotations

import math
from typing import Callable, Iterator, NamedTuple

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .denoisers import Cond, Denoiser
from .parametrization import Prediction
from .schedules import Schedule, check_grid

Callback = Callable[[int, float, Tensor, Prediction], None]


class Step(NamedTuple):
    i: int
    t: float  # current time
    t_next: float
    a: float  # a_t, b_t, logSNR(t)
    b: float
    logsnr: float
    a_next: float
    b_next: float
    logsnr_next: float


def _steps(ts: Tensor, schedule: Schedule, progress: bool) -> Iterator[Step]:
    """The shared preamble: validate the grid, tabulate a, b, logSNR in float64, show progress."""
    ts = check_grid(schedule, ts)
    a, b = (c.tolist() for c in schedule.alpha_sigma(ts))
    l, t = schedule.logsnr(ts).tolist(), ts.tolist()
    for i in tqdm(range(len(t) - 1), disable=not progress, desc="sampling"):
        yield Step(i, t[i], t[i + 1], a[i], b[i], l[i], a[i + 1], b[i + 1], l[i + 1])


def _state(x: Tensor) -> Tensor:
    if x.ndim < 2:
        raise ValueError(f"x must be a batch [B, ...], got shape {tuple(x.shape)}")
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _denoise(denoiser: Denoiser, x: Tensor, t: float, cond: Cond | None) -> Prediction:
    p = denoiser(x, torch.full((len(x),), t, dtype=torch.float64), cond)  # times stay on the host (no syncs)
    if p.eps.shape != x.shape or p.x0.shape != x.shape:
        raise ValueError(f"denoiser returned shapes {tuple(p.eps.shape)}, {tuple(p.x0.shape)} for x {tuple(x.shape)}")
    return p._replace(eps=p.eps.to(x.dtype), x0=p.x0.to(x.dtype))


def _noise(x: Tensor, generator: torch.Generator | None) -> Tensor:
    device = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype).to(x.device)


def ddpm(denoiser: Denoiser, x: Tensor, ts: Tensor, schedule: Schedule, cond: Cond | None = None, *,
         variance: str = "small", generator: torch.Generator | None = None, callback: Callback | None = None,
         progress: bool = False) -> Tensor:
    """DDPM ancestral sampling (Ho et al. 2020) over any sub-grid: x_s ~ q(x_s | x_t, x0_hat).

    With r = a_t / a_s and beta = b_t^2 - r^2 b_s^2 (the per-step beta_t of SPEC §2 for VP tables), the
    posterior mean is (r b_s^2 x_t + a_s beta x0_hat) / b_t^2 -- SPEC's (x_t - beta / b_t eps_hat) / sqrt(alpha_t)
    written through x0_hat so that a_t = 0 is allowed -- and its variance beta-tilde = beta b_s^2 / b_t^2
    ('small'), beta ('large') or, for learned-variance networks, exp(v log beta + (1 - v) log beta-tilde)
    ('learned', Nichol & Dhariwal 2021)."""
    if variance not in ("small", "large", "learned"):
        raise ValueError(f"DDPM variance must be 'small', 'large' or 'learned', got {variance!r}")
    x = _state(x)
    for s in _steps(ts, schedule, progress):
        p = _denoise(denoiser, x, s.t, cond)
        r = s.a / s.a_next
        beta = s.b**2 - r**2 * s.b_next**2
        x = (r * s.b_next**2 * x + s.a_next * beta * p.x0) / s.b**2
        beta_tilde = beta * s.b_next**2 / s.b**2
        if s.b_next > 0:
            x = x + _ddpm_std(variance, beta, beta_tilde, p) * _noise(x, generator)
        if callback:
            callback(s.i, s.t, x, p)
    return x


def _ddpm_std(variance: str, beta: float, beta_tilde: float, p: Prediction) -> Tensor | float:
    if variance == "small":
        return math.sqrt(beta_tilde)
    if variance == "large":
        return math.sqrt(beta)
    if p.var_frac is None:
        raise ValueError("DDPM variance 'learned' needs a network with learned sigma")
    return torch.exp(0.5 * (p.var_frac * math.log(beta) + (1 - p.var_frac) * math.log(max(beta_tilde, 1e-20))))


def ddim(denoiser: Denoiser, x: Tensor, ts: Tensor, schedule: Schedule, cond: Cond | None = None, *,
         eta: float = 0.0, generator: torch.Generator | None = None, callback: Callback | None = None,
         progress: bool = False) -> Tensor:
    """DDIM (Song et al. 2021): x_s = a_s x0_hat + sqrt(b_s^2 - sigma^2) eps_hat + sigma z.

    sigma = eta b_s sqrt(1 - SNR(t) / SNR(s)), which for VP tables is SPEC's
    eta sqrt(b_s^2 / b_t^2 (1 - a_t^2 / a_s^2)); eta = 0 is deterministic, eta = 1 is DDPM."""
    x = _state(x)
    for s in _steps(ts, schedule, progress):
        p = _denoise(denoiser, x, s.t, cond)
        sigma = eta * s.b_next * math.sqrt(-math.expm1(s.logsnr - s.logsnr_next))
        x = s.a_next * p.x0 + math.sqrt(max(s.b_next**2 - sigma**2, 0.0)) * p.eps
        if sigma > 0:
            x = x + sigma * _noise(x, generator)
        if callback:
            callback(s.i, s.t, x, p)
    return x


def euler(denoiser: Denoiser, x: Tensor, ts: Tensor, schedule: Schedule, cond: Cond | None = None, *,
          generator: torch.Generator | None = None, callback: Callback | None = None,
          progress: bool = False) -> Tensor:
    """Euler on the probability-flow ODE (Karras et al. 2022, Alg. 1; for rectified flow x + (s - t) v).

    In sigma space (and in flow space) an Euler step lands exactly on a_s x0_hat + b_s eps_hat: DDIM, eta = 0."""
    return ddim(denoiser, x, ts, schedule, cond, eta=0.0, callback=callback, progress=progress)


def euler_ancestral(denoiser: Denoiser, x: Tensor, ts: Tensor, schedule: Schedule, cond: Cond | None = None, *,
                    generator: torch.Generator | None = None, callback: Callback | None = None,
                    progress: bool = False) -> Tensor:
    """Euler ancestral (k-diffusion): step down to sigma_down, add noise sigma_up; equal to DDIM with eta = 1."""
    return ddim(denoiser, x, ts, schedule, cond, eta=1.0, generator=generator, callback=callback, progress=progress)


def heun(denoiser: Denoiser, x: Tensor, ts: Tensor, schedule: Schedule, cond: Cond | None = None, *,
         generator: torch.Generator | None = None, callback: Callback | None = None,
         progress: bool = False) -> Tensor:
    """Heun's 2nd-order method (Karras et al. 2022, Alg. 1) in ODE coordinates y = x / c, s = b / c
    (sigma space for VP, flow space for rectified flow). Euler (x = a_s x0_hat + b_s eps_hat) on the last
    step to clean data and on a first step from pure noise (zero terminal SNR, where sigma is infinite)."""
    x = _state(x)
    c = schedule.ode_scale(check_grid(schedule, ts)).tolist()
    for s in _steps(ts, schedule, progress):
        p = _denoise(denoiser, x, s.t, cond)
        if s.b_next == 0 or c[s.i] == 0:
            x = s.a_next * p.x0 + s.b_next * p.eps
        else:
            c_t, c_s = c[s.i], c[s.i + 1]
            sig, sig_next = s.b / c_t, s.b_next / c_s
            y = x / c_t
            d = (y - p.x0) / sig  # dy/ds at (y, s)
            y_euler = y + (sig_next - sig) * d
            p2 = _denoise(denoiser, c_s * y_euler, s.t_next, cond)
            d2 = (y_euler - p2.x0) / sig_next
            x = c_s * (y + (sig_next - sig) * (d + d2) / 2)
        if callback:
            callback(s.i, s.t, x, p)
    return x


def dpmpp_2m(denoiser: Denoiser, x: Tensor, ts: Tensor, schedule: Schedule, cond: Cond | None = None, *,
             generator: torch.Generator | None = None, callback: Callback | None = None,
             progress: bool = False) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022), data prediction, lambda = logSNR / 2; first order on the
    first step and on the last step to clean data."""
    x = _state(x)
    x0_prev, h_prev = None, None
    for s in _steps(ts, schedule, progress):
        p = _denoise(denoiser, x, s.t, cond)
        h = (s.logsnr_next - s.logsnr) / 2
        D = p.x0
        if x0_prev is not None and s.b_next > 0:
            r = h_prev / h
            D = (1 + 1 / (2 * r)) * p.x0 - (1 / (2 * r)) * x0_prev
        x = (s.b_next / s.b) * x - s.a_next * math.expm1(-h) * D
        x0_prev, h_prev = p.x0, h
        if callback:
            callback(s.i, s.t, x, p)
    return x


SAMPLERS: dict[str, Callable[..., Tensor]] = {
    "ddpm": ddpm,
    "ddim": ddim,
    "euler": euler,
    "euler_ancestral": euler_ancestral,
    "heun": heun,
    "dpmpp_2m": dpmpp_2m,
}


def get_sampler(name: str) -> Callable[..., Tensor]:
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; valid: {sorted(SAMPLERS)}")
    return SAMPLERS[name]
