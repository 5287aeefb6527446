"""Samplers: small pure functions with one signature (SPEC §2; k-diffusion's sampling.py as model).

    sampler(denoiser, x, ts, schedule, cond=None, *, generator=None, noise=gaussian_noise, callback=None,
            progress=False, **options)

Each registers itself in SAMPLERS with the options it declares (`sampler("eta")`); `noise(x, generator)` draws
the N(0, I) noise of the stochastic ones (tests hand in their own to read a sampler's law off).

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
Noise = Callable[[Tensor, "torch.Generator | None"], Tensor]  # (state, generator) -> N(0, I) of its shape
SAMPLERS: dict[str, Callable[..., Tensor]] = {}  # name -> sampler, in the order they are defined below
DDPM_VARIANCES = ("small", "large", "learned")


def sampler(*options: str) -> Callable[[Callable[..., Tensor]], Callable[..., Tensor]]:
    """Register a sampler under its function's name, declaring the keyword `options` it takes beyond the
    shared signature (read by the front-ends to offer and check them)."""
    def register(f: Callable[..., Tensor]) -> Callable[..., Tensor]:
        f.options = options
        SAMPLERS[f.__name__] = f
        return f

    return register


def taking(option: str) -> list[str]:
    """The samplers that declare the keyword `option` (eta, variance, order)."""
    return [name for name, f in SAMPLERS.items() if option in f.options]


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


def gaussian_noise(x: Tensor, generator: torch.Generator | None) -> Tensor:
    """N(0, I) of x's shape and dtype, drawn on the generator's device (x's without one), then moved to x's."""
    device = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype).to(x.device)


def _dpmpp(x: Tensor, s: Step, D: Tensor) -> Tensor:
    """The DPM-Solver++ update (Lu et al. 2022) from s.t to s.t_next with data prediction D:
    x_s = (b_s / b_t) x_t - a_s (e^{-h} - 1) D, h = lambda_s - lambda_t, lambda = logSNR / 2."""
    return (s.b_next / s.b) * x - s.a_next * math.expm1((s.logsnr - s.logsnr_next) / 2) * D


def _ddim_step(s: Step, x0: Tensor, eps: Tensor, eta: float = 1.0) -> tuple[Tensor, float]:
    """The DDIM step from s.t to s.t_next without its noise, and that noise's std:
    (a_s x0 + sqrt(b_s^2 - sigma^2) eps, sigma) with sigma = eta b_s sqrt(1 - SNR(t) / SNR(s))."""
    sigma = eta * s.b_next * math.sqrt(-math.expm1(s.logsnr - s.logsnr_next))
    return s.a_next * x0 + math.sqrt(max(s.b_next**2 - sigma**2, 0.0)) * eps, sigma


def _ancestral(x: Tensor, x0: Tensor, s: Step) -> tuple[Tensor, float]:
    """The ancestral (eta = 1) step given x0_hat, with eps = (x - a_t x0) / b_t: k-diffusion's step to
    sigma_down plus sigma_up, written so that a_t = 0 (pure noise) is allowed."""
    return _ddim_step(s, x0, (x - s.a * x0) / s.b)


@sampler("variance")
def ddpm(denoiser: Denoiser, x: Tensor, ts: Tensor, schedule: Schedule, cond: Cond | None = None, *,
         variance: str = "small", generator: torch.Generator | None = None, noise: Noise = gaussian_noise,
         callback: Callback | None = None, progress: bool = False) -> Tensor:
    """DDPM ancestral sampling (Ho et al. 2020) over any sub-grid: x_s ~ q(x_s | x_t, x0_hat).

    With r = a_t / a_s and beta = b_t^2 - r^2 b_s^2 (the per-step beta_t of SPEC §2 for VP tables), the
    posterior mean is (r b_s^2 x_t + a_s beta x0_hat) / b_t^2 -- SPEC's (x_t - beta / b_t eps_hat) / sqrt(alpha_t)
    written through x0_hat so that a_t = 0 is allowed -- and its variance beta-tilde = beta b_s^2 / b_t^2
    ('small'), beta ('large') or, for learned-variance networks, exp(v log beta + (1 - v) log beta-tilde)
    ('learned', Nichol & Dhariwal 2021)."""
    if variance not in DDPM_VARIANCES:
        raise ValueError(f"DDPM variance must be one of {DDPM_VARIANCES}, got {variance!r}")
    x = _state(x)
    for s in _steps(ts, schedule, progress):
        p = _denoise(denoiser, x, s.t, cond)
        r = s.a / s.a_next
        beta = s.b**2 - r**2 * s.b_next**2
        x = (r * s.b_next**2 * x + s.a_next * beta * p.x0) / s.b**2
        beta_tilde = beta * s.b_next**2 / s.b**2
        if s.b_next > 0:
            x = x + _ddpm_std(variance, beta, beta_tilde, p) * noise(x, generator)
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


@sampler("eta")
def ddim(denoiser: Denoiser, x: Tensor, ts: Tensor, schedule: Schedule, cond: Cond | None = None, *,
         eta: float = 0.0, generator: torch.Generator | None = None, noise: Noise = gaussian_noise,
         callback: Callback | None = None, progress: bool = False) -> Tensor:
    """DDIM (Song et al. 2021): x_s = a_s x0_hat + sqrt(b_s^2 - sigma^2) eps_hat + sigma z.

    sigma = eta b_s sqrt(1 - SNR(t) / SNR(s)), which for VP tables is SPEC's
    eta sqrt(b_s^2 / b_t^2 (1 - a_t^2 / a_s^2)); eta = 0 is deterministic, eta = 1 is DDPM."""
    x = _state(x)
    for s in _steps(ts, schedule, progress):
        p = _denoise(denoiser, x, s.t, cond)
        x, sigma = _ddim_step(s, p.x0, p.eps, eta)
        if sigma > 0:
            x = x + sigma * noise(x, generator)
        if callback:
            callback(s.i, s.t, x, p)
    return x


@sampler()
def euler(denoiser: Denoiser, x: Tensor, ts: Tensor, schedule: Schedule, cond: Cond | None = None, *,
          generator: torch.Generator | None = None, noise: Noise = gaussian_noise,
          callback: Callback | None = None, progress: bool = False) -> Tensor:
    """Euler on the probability-flow ODE (Karras et al. 2022, Alg. 1; for rectified flow x + (s - t) v).

    In sigma space (and in flow space) an Euler step lands exactly on a_s x0_hat + b_s eps_hat: DDIM, eta = 0."""
    return ddim(denoiser, x, ts, schedule, cond, eta=0.0, callback=callback, progress=progress)


@sampler()
def euler_ancestral(denoiser: Denoiser, x: Tensor, ts: Tensor, schedule: Schedule, cond: Cond | None = None, *,
                    generator: torch.Generator | None = None, noise: Noise = gaussian_noise,
                    callback: Callback | None = None, progress: bool = False) -> Tensor:
    """Euler ancestral (k-diffusion): step down to sigma_down, add noise sigma_up; equal to DDIM with eta = 1."""
    return ddim(denoiser, x, ts, schedule, cond, eta=1.0, generator=generator, noise=noise, callback=callback,
                progress=progress)


@sampler()
def heun(denoiser: Denoiser, x: Tensor, ts: Tensor, schedule: Schedule, cond: Cond | None = None, *,
         generator: torch.Generator | None = None, noise: Noise = gaussian_noise,
         callback: Callback | None = None, progress: bool = False) -> Tensor:
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


@sampler()
def dpmpp_2m(denoiser: Denoiser, x: Tensor, ts: Tensor, schedule: Schedule, cond: Cond | None = None, *,
             generator: torch.Generator | None = None, noise: Noise = gaussian_noise,
             callback: Callback | None = None, progress: bool = False) -> Tensor:
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
        x = _dpmpp(x, s, D)
        x0_prev, h_prev = p.x0, h
        if callback:
            callback(s.i, s.t, x, p)
    return x


@sampler()
def dpmpp_2s_ancestral(denoiser: Denoiser, x: Tensor, ts: Tensor, schedule: Schedule, cond: Cond | None = None, *,
                       generator: torch.Generator | None = None, noise: Noise = gaussian_noise,
                       callback: Callback | None = None, progress: bool = False) -> Tensor:
    """DPM-Solver++(2S) ancestral (k-diffusion's sample_dpmpp_2s_ancestral, eta = 1): a second-order singlestep
    DPM-Solver++ step to sigma_down = sigma_s^2 / sigma_t, whose lambda-midpoint is s itself, then noise sigma_up.
    First order on a step from pure noise and on the last step to clean data (sigma_down = 0)."""
    x = _state(x)
    for s in _steps(ts, schedule, progress):
        p = _denoise(denoiser, x, s.t, cond)
        x0 = p.x0
        if s.a > 0 and s.b_next > 0:
            x0 = _denoise(denoiser, _dpmpp(x, s, p.x0), s.t_next, cond).x0
        x, sigma = _ancestral(x, x0, s)
        if sigma > 0:
            x = x + sigma * noise(x, generator)
        if callback:
            callback(s.i, s.t, x, p)
    return x


@sampler()
def dpmpp_sde(denoiser: Denoiser, x: Tensor, ts: Tensor, schedule: Schedule, cond: Cond | None = None, *,
              generator: torch.Generator | None = None, noise: Noise = gaussian_noise,
              callback: Callback | None = None, progress: bool = False) -> Tensor:
    """DPM-Solver++ SDE (k-diffusion's sample_dpmpp_sde, eta = 1, r = 1/2): an ancestral step to the lambda-midpoint
    m, the model there, then the ancestral step from t to s with x0_hat(m). Its two noises are increments of one
    Brownian motion W(sigma), sigma = b / a, over [sigma_t, sigma_m] and [sigma_t, sigma_s] (k-diffusion draws them
    from a Brownian tree, with the same law). First order on a step from pure noise and on the last step to clean data."""
    x = _state(x)
    for s in _steps(ts, schedule, progress):
        p = _denoise(denoiser, x, s.t, cond)
        x0, z = p.x0, None
        if s.a > 0 and s.b_next > 0:
            t_m = schedule.t_from_logsnr((s.logsnr + s.logsnr_next) / 2)
            a_m, b_m = (c.item() for c in schedule.alpha_sigma(t_m))
            m = s._replace(t_next=t_m.item(), a_next=a_m, b_next=b_m, logsnr_next=schedule.logsnr(t_m).item())
            n1, n2 = noise(x, generator), noise(x, generator)
            x_m, sigma_m = _ancestral(x, x0, m)
            x0 = _denoise(denoiser, x_m + sigma_m * n1, m.t_next, cond).x0
            w = math.sqrt((s.b / s.a - b_m / a_m) / (s.b / s.a - s.b_next / s.a_next))  # corr(W increments)
            z = w * n1 + math.sqrt(1 - w * w) * n2
        x, sigma = _ancestral(x, x0, s)
        if sigma > 0:
            x = x + sigma * (noise(x, generator) if z is None else z)
        if callback:
            callback(s.i, s.t, x, p)
    return x


@sampler("order")
def unipc(denoiser: Denoiser, x: Tensor, ts: Tensor, schedule: Schedule, cond: Cond | None = None, *,
          order: int = 2, generator: torch.Generator | None = None, noise: Noise = gaussian_noise,
          callback: Callback | None = None, progress: bool = False) -> Tensor:
    """UniPC (Zhao et al. 2023), data prediction, B(h) = e^{-h} - 1 ('bh2'): the order-p multistep predictor UniP,
    then the corrector UniC, which refines the new state with the model call made there (no extra call). Orders
    warm up from 1 and drop on the last steps (diffusers' lower_order_final); a first step from pure noise is a
    first-order step that the history leaves out (lambda = -inf)."""
    if order not in (1, 2, 3):
        raise ValueError(f"UniPC order must be 1, 2 or 3, got {order}")
    x = _state(x)
    n = len(ts) - 1
    hist: list[tuple[float, Tensor]] = []  # (lambda, x0_hat) at s.t and earlier, newest first
    last = None  # (x, step, order) of the predictor step that led to x, for UniC
    for s in _steps(ts, schedule, progress):
        p = _denoise(denoiser, x, s.t, cond)
        if last is not None:
            x = _unipc_step(*last, hist, p.x0)
        if s.a == 0:
            x, hist, last = _dpmpp(x, s, p.x0), [], None
        else:
            hist = [(s.logsnr / 2, p.x0)] + hist[:order - 1]
            last = (x, s, min(order, len(hist), n - s.i))
            x = _unipc_step(*last, hist)
        if callback:
            callback(s.i, s.t, x, p)
    return x


def _unipc_step(x: Tensor, s: Step, order: int, hist: list[tuple[float, Tensor]], x0_next: Tensor | None = None) -> Tensor:
    """UniP (x0_next None) or UniC (x0_next = x0_hat at s.t_next, the corrector) of the given order from s.t to
    s.t_next: DPM-Solver++ with D = m_0 + sum_k rho_k D1_k, D1_k = (m_k - m_0) / r_k, r_k = (lambda_k - lambda_0) / h."""
    lam, m0 = hist[0]
    h = (s.logsnr_next - s.logsnr) / 2
    rks = [(lam_k - lam) / h for lam_k, _ in hist[1:order]]
    D1s = [(m_k - m0) / r for r, (_, m_k) in zip(rks, hist[1:order])]
    if x0_next is not None:
        rks, D1s = rks + [1.0], D1s + [x0_next - m0]
    return _dpmpp(x, s, m0 + sum(rho * d for rho, d in zip(_unipc_rhos(rks, h), D1s)))


def _unipc_rhos(rks: list[float], h: float) -> list[float]:
    """UniPC's weights (bh2): solve sum_k rho_k r_k^(i-1) = i! h phi_{i+1}(-h) / B(h) for i = 1..K, where
    h phi_{i+1} follows phi_1 = (e^{-h} - 1) / -h - 1, phi_{i+1} = phi_i / -h - 1 / (i+1)!; a lone weight is 1/2
    (the reference implementation's order-2 predictor and order-1 corrector)."""
    if len(rks) <= 1:
        return [0.5] * len(rks)
    hh, g = -h, []
    phi, fact = math.expm1(hh) / hh - 1, 1
    for i in range(1, len(rks) + 1):
        g.append(phi * fact / math.expm1(hh))
        fact *= i + 1
        phi = phi / hh - 1 / fact
    R = torch.tensor([[r**k for r in rks] for k in range(len(rks))], dtype=torch.float64)
    return torch.linalg.solve(R, torch.tensor(g, dtype=torch.float64)).tolist()


@sampler("order")
def lms(denoiser: Denoiser, x: Tensor, ts: Tensor, schedule: Schedule, cond: Cond | None = None, *,
        order: int = 4, generator: torch.Generator | None = None, noise: Noise = gaussian_noise,
        callback: Callback | None = None, progress: bool = False) -> Tensor:
    """Linear multistep (k-diffusion's sample_lms): Adams-Bashforth of the given order over the non-uniform grid on
    dy/ds = (y - x0_hat) / s in ODE coordinates y = x / c, s = b / c (as heun); the order warms up from 1. A first
    step from pure noise (s infinite) is a first-order step that the history leaves out."""
    if not 1 <= order <= 4:
        raise ValueError(f"LMS order must be in [1, 4], got {order}")
    x = _state(x)
    c = schedule.ode_scale(check_grid(schedule, ts)).tolist()
    sig: list[float] = []  # ODE times s at s.t and earlier, newest first
    ds: list[Tensor] = []  # slopes dy/ds there
    for s in _steps(ts, schedule, progress):
        p = _denoise(denoiser, x, s.t, cond)
        if c[s.i] == 0:
            x = _dpmpp(x, s, p.x0)
        else:
            y = x / c[s.i]
            sig = [s.b / c[s.i]] + sig[:order - 1]
            ds = [(y - p.x0) / sig[0]] + ds[:order - 1]
            coeffs = _lms_coefficients(sig, s.b_next / c[s.i + 1])
            x = c[s.i + 1] * (y + sum(k * d for k, d in zip(coeffs, ds)))
        if callback:
            callback(s.i, s.t, x, p)
    return x


def _lms_coefficients(sig: list[float], sig_next: float) -> list[float]:
    """Adams-Bashforth weights: the integrals from sig[0] to sig_next of the Lagrange basis polynomials on the nodes
    sig, by 2-point Gauss-Legendre quadrature (exact up to degree 3, order 4)."""
    mid, half = (sig[0] + sig_next) / 2, (sig_next - sig[0]) / 2
    taus = (mid - half / math.sqrt(3), mid + half / math.sqrt(3))
    return [half * sum(math.prod((tau - sig[m]) / (sig[j] - sig[m]) for m in range(len(sig)) if m != j) for tau in taus)
            for j in range(len(sig))]


def get_sampler(name: str) -> Callable[..., Tensor]:
    """The sampler registered under `name`."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; valid: {sorted(SAMPLERS)}")
    return SAMPLERS[name]
