"""Noise schedules: x_t = a_t x_0 + b_t eps (SPEC §1).

A schedule maps a (possibly fractional) time t to (a_t, b_t) and logSNR(t) = log(a_t^2 / b_t^2), and
inverts logSNR. VP schedules are tables over T discrete steps in the model's time units (t in
[0, T-1], fractional t by linear interpolation of logSNR); t = -1 stands for clean data (a = 1,
b = 0), the target of a sampler's last step. Rectified flow has a_t = 1 - t, b_t = t on [0, 1].
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from torch import Tensor


def _as_f64(t: Tensor | float | Sequence[float]) -> Tensor:
    return t.to(torch.float64) if isinstance(t, Tensor) else torch.as_tensor(t, dtype=torch.float64)


def _require(ok: Tensor, message: str) -> None:
    """ValueError(message) unless `ok` is all true; off the CPU an asynchronous device assert, so that
    checking never stalls an accelerator's queue (no host sync)."""
    if ok.device.type == "cpu":
        if not bool(ok.all()):
            raise ValueError(message)
    else:
        torch._assert_async(ok.all(), message)


class Schedule:
    """Base class: a_t, b_t, logSNR and its inverse."""

    t_clean: float  # time of clean data (a = 1, b = 0): the end of every sampling grid
    t_min: float  # range the network is trained on, [t_min, t_max]
    t_max: float

    def alpha_sigma(self, t: Tensor | float) -> tuple[Tensor, Tensor]:
        """(a_t, b_t) in float64."""
        raise NotImplementedError

    def logsnr(self, t: Tensor | float) -> Tensor:
        raise NotImplementedError

    def t_from_logsnr(self, logsnr: Tensor | float) -> Tensor:
        """Inverse of logsnr, clamped to [t_min, t_max]."""
        raise NotImplementedError

    def snr(self, t: Tensor | float) -> Tensor:
        return self.logsnr(t).exp()

    def ode_scale(self, t: Tensor | float) -> Tensor:
        """c_t such that the probability-flow ODE is integrated in y = x / c_t over s = b_t / c_t.

        VP: c = a (EDM's sigma space, where dy/ds = eps); rectified flow: c = 1 (dy/ds = v)."""
        raise NotImplementedError

    def timesteps(self, n: int, spacing: str = "trailing", offset: int = 0) -> Tensor:
        """A sampling grid of n model times, decreasing, followed by t_clean (length n + 1)."""
        raise NotImplementedError

    def sample_t(self, n: int, generator: torch.Generator | None = None, dist: str = "uniform",
                 loc: float = 0.0, scale: float = 1.0) -> Tensor:
        """Training times [n] (float64): 'uniform', or 'logit_normal' u = sigmoid(N(loc, scale^2)) (SD3)."""
        raise NotImplementedError

    def pooled_time(self, t: Tensor | float, s: int) -> tuple[Tensor, Tensor]:
        """(tau, rho) for s x s average pooling D (Upsample Guidance, SPEC §7): D[x_t] / rho is distributed
        like a low-resolution x_tau, where SNR(tau) = s^2 SNR(t) (tau clamped to the schedule's range)."""
        tau = self.t_from_logsnr(self.logsnr(t) + 2 * math.log(s))
        a, b = self.alpha_sigma(t)
        return tau, self._pooled_scale(a, b / s)

    def _pooled_scale(self, a: Tensor, b: Tensor) -> Tensor:
        """rho making (a / rho, b / rho) a point of the schedule."""
        raise NotImplementedError


# ----------------------------------------------------------------------------- VP tables

def linear_betas(T: int, start: float = 1e-4, end: float = 0.02) -> Tensor:
    """DDPM (Ho et al. 2020): beta linear from 1e-4 to 0.02."""
    return torch.linspace(start, end, T, dtype=torch.float64)


def scaled_linear_betas(T: int, start: float = 0.00085, end: float = 0.012) -> Tensor:
    """Stable Diffusion: betas = linspace(sqrt(0.00085), sqrt(0.012), T)^2."""
    return torch.linspace(start**0.5, end**0.5, T, dtype=torch.float64) ** 2


def cosine_betas(T: int, s: float = 0.008, max_beta: float = 0.999) -> Tensor:
    """Nichol & Dhariwal 2021: alpha_bar(u) = cos((u + s) / (1 + s) * pi / 2)^2, betas clipped at max_beta."""

    def alpha_bar(u: float) -> float:
        return math.cos((u + s) / (1 + s) * math.pi / 2) ** 2

    betas = [min(1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), max_beta) for i in range(T)]
    return torch.tensor(betas, dtype=torch.float64)


BETA_SCHEDULES: dict[str, Callable[..., Tensor]] = {
    "linear": linear_betas,
    "scaled_linear": scaled_linear_betas,
    "cosine": cosine_betas,
}


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> Tensor:
    """Karras et al. 2022 (eq. 5): n noise levels sigma = b / a from sigma_max to sigma_min, uniform in sigma^(1/rho)."""
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    return (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho


def exponential_sigmas(n: int, sigma_min: float, sigma_max: float) -> Tensor:
    """n noise levels from sigma_max to sigma_min, uniform in log sigma (that is, in logSNR)."""
    return torch.linspace(math.log(sigma_max), math.log(sigma_min), n, dtype=torch.float64).exp()


SIGMA_GRIDS: dict[str, Callable[[int, float, float], Tensor]] = {
    "karras": karras_sigmas,
    "exponential": exponential_sigmas,
}


def leading_steps(T: int, n: int, offset: int) -> Tensor:
    """diffusers' leading spacing (SD 1.x, with its steps offset): every T // n steps from 0, decreasing."""
    return torch.arange(n - 1, -1, -1, dtype=torch.float64) * (T // n) + offset


def trailing_steps(T: int, n: int, offset: int) -> Tensor:
    """diffusers' trailing spacing: from T - 1 down in steps of T / n, rounded (reaches the last step)."""
    return torch.arange(T, 0, -T / n, dtype=torch.float64).round() - 1


def linspace_steps(T: int, n: int, offset: int) -> Tensor:
    """diffusers' linspace spacing: n steps evenly from T - 1 to 0, rounded."""
    return torch.linspace(0, T - 1, n, dtype=torch.float64).round().flip(0)


STEP_SPACINGS: dict[str, Callable[[int, int, int], Tensor]] = {  # diffusers' timestep_spacing values
    "leading": leading_steps,
    "trailing": trailing_steps,
    "linspace": linspace_steps,
}
SPACINGS = (*STEP_SPACINGS, *SIGMA_GRIDS)  # every grid name VPSchedule.timesteps takes


def rescale_zero_terminal_snr(alphas_cumprod: Tensor) -> Tensor:
    """Lin et al. 2024 (Algorithm 1): shift and scale sqrt(alphas_cumprod) so that a_{T-1} = 0
    while a_0 keeps its value."""
    a = alphas_cumprod.sqrt()
    a0, aT = a[0].clone(), a[-1].clone()
    return ((a - aT) * (a0 / (a0 - aT))) ** 2


class VPSchedule(Schedule):
    """Variance-preserving schedule from a table alphas_cumprod[0..T-1] (a_t^2 + b_t^2 = 1)."""

    def __init__(self, alphas_cumprod: Tensor):
        ac = _as_f64(alphas_cumprod)
        if ac.ndim != 1 or len(ac) < 2:
            raise ValueError(f"alphas_cumprod must be a 1-D table of at least 2 entries, got shape {tuple(ac.shape)}")
        if not bool(((ac[1:] < ac[:-1]).all()) and ac[0] < 1 and ac[-1] >= 0):
            raise ValueError("alphas_cumprod must be strictly decreasing inside (0, 1) (the last entry may be 0)")
        self.alphas_cumprod = ac
        self.T = len(ac)
        self.t_clean, self.t_min, self.t_max = -1.0, 0.0, float(self.T - 1)
        # logSNR on the extended index t + 1 = 0..T: entry 0 is clean data (logSNR = +inf)
        self._logsnr = torch.cat([torch.tensor([math.inf], dtype=torch.float64), ac.log() - (-ac).log1p()])
        self._tables: dict[torch.device, Tensor] = {}

    def _table(self, device: torch.device) -> Tensor:
        """The extended logSNR table on `device`, copied there once."""
        if device not in self._tables:
            self._tables[device] = self._logsnr.to(device)
        return self._tables[device]

    @classmethod
    def named(cls, name: str, T: int = 1000, zero_terminal_snr: bool = False, beta_range: tuple[float, float] | None = None) -> "VPSchedule":
        """A schedule by name: linear, scaled_linear (optionally with another beta range) or cosine;
        optionally rescaled to zero terminal SNR."""
        if name not in BETA_SCHEDULES:
            raise ValueError(f"unknown schedule {name!r}; valid: {sorted(BETA_SCHEDULES)}")
        if beta_range is not None and name == "cosine":
            raise ValueError("the cosine schedule takes no beta range")
        ac = torch.cumprod(1 - BETA_SCHEDULES[name](T, *(beta_range or ())), 0)
        return cls(rescale_zero_terminal_snr(ac) if zero_terminal_snr else ac)

    @property
    def betas(self) -> Tensor:
        ac = self.alphas_cumprod
        return 1 - ac / torch.cat([ac.new_ones(1), ac[:-1]])

    def logsnr(self, t: Tensor | float) -> Tensor:
        """logSNR at t in {-1} U [0, T-1], linear between table entries."""
        pos = _as_f64(t) + 1
        _require((pos == 0) | ((pos >= 1) & (pos <= self.T)), f"t must be -1 (clean) or inside [0, {self.T - 1}], got {t}")
        lo = pos.floor().long()
        hi = (lo + 1).clamp(max=self.T)
        frac = pos - lo
        table = self._table(pos.device)
        l_lo, l_hi = table[lo], table[hi]
        return torch.where(frac == 0, l_lo, l_lo + frac * (l_hi - l_lo))

    def alpha_sigma(self, t: Tensor | float) -> tuple[Tensor, Tensor]:
        l = self.logsnr(t)
        return torch.sigmoid(l).sqrt(), torch.sigmoid(-l).sqrt()

    def t_from_logsnr(self, logsnr: Tensor | float) -> Tensor:
        l = _as_f64(logsnr)
        table = self._table(l.device)[1:]  # decreasing, t = 0..T-1
        l = l.clamp(min=table[-1], max=table[0])
        i = torch.searchsorted(-table, -l).clamp(1, self.T - 1)  # table[i-1] >= l >= table[i]
        l0, l1 = table[i - 1], table[i]
        frac = torch.where(l1 == -math.inf, (l == -math.inf).double(), (l0 - l) / (l0 - l1))
        return (i - 1) + frac

    def ode_scale(self, t: Tensor | float) -> Tensor:
        return self.alpha_sigma(t)[0]

    def _pooled_scale(self, a: Tensor, b: Tensor) -> Tensor:
        return (a * a + b * b).sqrt()  # rho_t = sqrt(a_t^2 + b_t^2 / s^2)

    def timesteps(self, n: int, spacing: str = "trailing", offset: int = 0) -> Tensor:
        """diffusers' spacings (STEP_SPACINGS: leading with its steps offset, trailing, linspace), or the noise
        levels of SIGMA_GRIDS (karras, exponential) between the table's ends, at their (fractional) times."""
        T = self.T
        if not 1 <= n <= T:
            raise ValueError(f"number of steps must be in [1, {T}], got {n}")
        if spacing in STEP_SPACINGS:
            ts = STEP_SPACINGS[spacing](T, n, offset)
        elif spacing in SIGMA_GRIDS:
            sigma_min, sigma_max = (math.exp(-self._logsnr[i].item() / 2) for i in (1, T))
            if math.isinf(sigma_max):
                raise ValueError(f"{spacing} grids need a finite sigma_max: no zero terminal SNR")
            ts = self.t_from_logsnr(-2 * SIGMA_GRIDS[spacing](n, sigma_min, sigma_max).log())
        else:
            raise ValueError(f"unknown timestep spacing {spacing!r}; valid: {', '.join(SPACINGS)}")
        return check_grid(self, torch.cat([ts, ts.new_tensor([self.t_clean])]))

    def sample_t(self, n: int, generator: torch.Generator | None = None, dist: str = "uniform",
                 loc: float = 0.0, scale: float = 1.0) -> Tensor:
        """Uniform over the T integer steps (DDPM), or logit-normal over the continuous range [0, T-1]."""
        if dist == "uniform":
            return torch.randint(0, self.T, (n,), generator=generator).double()
        return _unit_time(n, generator, dist, loc, scale) * (self.T - 1)


# ----------------------------------------------------------------------------- rectified flow

def flow_shift(t: Tensor | float, shift: float) -> Tensor:
    """SD3 resolution shift: t' = shift t / (1 + (shift - 1) t)."""
    t = _as_f64(t)
    return shift * t / (1 + (shift - 1) * t)


class FlowSchedule(Schedule):
    """Rectified flow: x_t = (1 - t) x_0 + t eps on t in [0, 1]; `shift` moves grids toward noise."""

    def __init__(self, shift: float = 1.0):
        if shift <= 0:
            raise ValueError(f"shift must be positive, got {shift}")
        self.shift = shift
        self.t_clean, self.t_min, self.t_max = 0.0, 0.0, 1.0

    def _checked(self, t: Tensor | float) -> Tensor:
        t = _as_f64(t)
        _require((t >= 0) & (t <= 1), f"rectified-flow time must be inside [0, 1], got {t}")
        return t

    def alpha_sigma(self, t: Tensor | float) -> tuple[Tensor, Tensor]:
        t = self._checked(t)
        return 1 - t, t

    def logsnr(self, t: Tensor | float) -> Tensor:
        t = self._checked(t)
        return 2 * ((1 - t).log() - t.log())

    def t_from_logsnr(self, logsnr: Tensor | float) -> Tensor:
        return torch.sigmoid(-_as_f64(logsnr) / 2)

    def ode_scale(self, t: Tensor | float) -> Tensor:
        return torch.ones_like(self._checked(t))

    def _pooled_scale(self, a: Tensor, b: Tensor) -> Tensor:
        return a + b  # rho = (1 - t) + t / s, and then tau = t / (rho s)

    def timesteps(self, n: int, spacing: str = "linspace", offset: int = 0) -> Tensor:
        """n + 1 times from 1 to 0, uniform before the shift."""
        if spacing != "linspace" or offset:
            raise ValueError("rectified flow supports only spacing='linspace' without offset")
        if n < 1:
            raise ValueError(f"number of steps must be >= 1, got {n}")
        return flow_shift(torch.linspace(1, 0, n + 1, dtype=torch.float64), self.shift)

    def sample_t(self, n: int, generator: torch.Generator | None = None, dist: str = "logit_normal",
                 loc: float = 0.0, scale: float = 1.0) -> Tensor:
        """u uniform or logit-normal on (0, 1), then the resolution shift."""
        return flow_shift(_unit_time(n, generator, dist, loc, scale), self.shift)


T_DISTRIBUTIONS = ("uniform", "logit_normal")  # training-time distributions of `sample_t`


def _unit_time(n: int, generator: torch.Generator | None, dist: str, loc: float, scale: float) -> Tensor:
    if dist == "uniform":
        return torch.rand(n, generator=generator, dtype=torch.float64)
    if dist == "logit_normal":
        return torch.sigmoid(loc + scale * torch.randn(n, generator=generator, dtype=torch.float64))
    raise ValueError(f"unknown timestep distribution {dist!r}; valid: {', '.join(T_DISTRIBUTIONS)}")


def check_grid(schedule: Schedule, ts: Tensor | Sequence[float]) -> Tensor:
    """Validate a sampling grid: 1-D, at least 2 times, strictly decreasing, inside the schedule's range."""
    ts = _as_f64(ts)
    if ts.ndim != 1 or len(ts) < 2:
        raise ValueError(f"a timestep grid is 1-D with at least 2 entries, got shape {tuple(ts.shape)}")
    if not bool(torch.isfinite(ts).all()):
        raise ValueError(f"timestep grid has non-finite entries: {ts.tolist()}")
    if not bool((ts[1:] < ts[:-1]).all()):
        raise ValueError(f"timestep grid must be strictly decreasing, got {ts.tolist()}")
    if ts[0] > schedule.t_max or ts[-1] < schedule.t_clean:
        raise ValueError(f"timestep grid must lie in [{schedule.t_clean}, {schedule.t_max}], got {ts.tolist()}")
    schedule.logsnr(ts)  # raises on times outside the schedule's domain
    return ts


def img2img_grid(ts: Tensor, strength: float) -> Tensor:
    """The tail of a grid that SDEdit runs: the last int(n * strength) steps, at least one (diffusers' convention)."""
    if not 0 < strength <= 1:
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    n = len(ts) - 1
    k = max(1, min(int(n * strength), n))
    return ts[n - k:]


SCHEDULES = (*BETA_SCHEDULES, "flow")  # the names make_schedule takes


def make_schedule(name: str, T: int = 1000, zero_terminal_snr: bool = False, shift: float = 1.0,
                  beta_range: tuple[float, float] | None = None) -> Schedule:
    """A VP table by name, or 'flow' for rectified flow."""
    if name == "flow":
        return FlowSchedule(shift)
    return VPSchedule.named(name, T, zero_terminal_snr, beta_range)
