"""Samplers against the exact denoiser of Gaussian data (SPEC §8)."""

import pytest
import torch

from diffusekit import samplers
from diffusekit.parametrization import Prediction
from diffusekit.samplers import SAMPLERS, get_sampler
from diffusekit.schedules import FlowSchedule, VPSchedule, img2img_grid
from diffusekit.toy import GaussianMixture

from .conftest import gen

D = 4
_Q = torch.linalg.qr(torch.randn(D, D, generator=gen(0), dtype=torch.float64))[0]
COV = _Q @ torch.diag(torch.tensor([0.2, 0.5, 1.0, 2.0], dtype=torch.float64)) @ _Q.T
MU = torch.tensor([1.0, -0.5, 0.3, 2.0], dtype=torch.float64)
DATA = GaussianMixture.gaussian(MU, COV, shape=(1, 2, 2))  # samples look like 1-channel 2x2 images

SCHEDULES = {
    "scaled_linear": (VPSchedule.named("scaled_linear"), "leading"),
    "cosine": (VPSchedule.named("cosine"), "trailing"),
    "zero_snr": (VPSchedule.named("scaled_linear", zero_terminal_snr=True), "trailing"),
    "flow": (FlowSchedule(shift=3.0), "linspace"),
}
STEPS = {"ddpm": 1000, "euler_ancestral": 1000, "ddim": 500, "euler": 500, "heun": 60, "dpmpp_2m": 100,
         "dpmpp_2s_ancestral": 200, "dpmpp_sde": 200, "unipc": 100, "lms": 100}


def output_moments(sampler, schedule, ts, **kw):
    """Exact mean and covariance of a sampler's output for x_T drawn from the exact marginal at ts[0].

    With the Gaussian's (affine) optimal denoiser every sampler is an affine map of x_T and of the noise
    it draws, y = c + A x_T + sum_k B_k z_k. We read c, A and every B_k off one batched run: row 0 has
    x_T = 0 and no noise, rows 1..D probe A, and the other rows each put a unit noise in one coordinate
    of one draw (up to two draws a step, as DPM++ SDE makes)."""
    n_draws = 2 * (len(ts) - 1)
    B = 1 + D + n_draws * D
    x = torch.zeros(B, D, dtype=torch.float64)
    x[1:1 + D] = torch.eye(D, dtype=torch.float64)
    draws = iter(range(n_draws))

    def probe_noise(x_, generator):
        z = torch.zeros(B, D, dtype=torch.float64)
        k = next(draws)
        z[1 + D + k * D: 1 + D + (k + 1) * D] = torch.eye(D, dtype=torch.float64)
        return z.reshape(x_.shape)

    y = sampler(DATA.denoiser(schedule), x.reshape(B, *DATA.shape), ts, schedule, noise=probe_noise, **kw).reshape(B, D)
    c, A, Bk = y[0], (y[1:1 + D] - y[0]).T, y[1 + D:] - y[0]
    a, b = (v.item() for v in schedule.alpha_sigma(ts[0]))
    mean_T, cov_T = a * MU, a**2 * COV + b**2 * torch.eye(D, dtype=torch.float64)
    return c + A @ mean_T, A @ cov_T @ A.T + Bk.T @ Bk


def assert_moments(mean, cov, tol):
    err_mean = ((mean - MU).norm() / COV.trace().sqrt()).item()
    err_cov = ((cov - COV).norm() / COV.norm()).item()
    assert err_mean < tol and err_cov < tol, f"mean error {err_mean:.4f}, covariance error {err_cov:.4f}"


@pytest.mark.parametrize("schedule_name", list(SCHEDULES))
@pytest.mark.parametrize("name", list(SAMPLERS))
def test_gaussian_oracle(name, schedule_name):
    schedule, spacing = SCHEDULES[schedule_name]
    if name == "heun" and schedule_name == "cosine":
        pytest.skip("Heun's trapezoid over cosine's first step (sigma 2e4 -> 60) is too coarse; EDM caps sigma at 80")
    ts = schedule.timesteps(STEPS[name], spacing)
    assert_moments(*output_moments(SAMPLERS[name], schedule, ts), tol=0.02)


@pytest.mark.parametrize("variance", ["small", "large"])
def test_ddpm_variances(variance):
    schedule = VPSchedule.named("linear")
    ts = schedule.timesteps(1000)
    assert_moments(*output_moments(samplers.ddpm, schedule, ts, variance=variance), tol=0.02)


@pytest.mark.parametrize("eta", [0.3, 1.0])
def test_ddim_eta(eta):
    schedule = VPSchedule.named("scaled_linear")
    ts = schedule.timesteps(500)
    assert_moments(*output_moments(samplers.ddim, schedule, ts, eta=eta), tol=0.02)


def test_oracle_fails_for_a_wrong_sampler():
    """Negative control: a DDIM that forgets the noise term misses the covariance by far more than 2%."""

    def no_noise_ddim(den, x, ts, schedule, **kw):
        return samplers.ddim(lambda x_, t, c: Prediction(0 * x_, den(x_, t, c).x0), x, ts, schedule)

    schedule = VPSchedule.named("scaled_linear")
    with pytest.raises(AssertionError, match="covariance error"):
        assert_moments(*output_moments(no_noise_ddim, schedule, schedule.timesteps(100)), tol=0.02)


@pytest.mark.parametrize("schedule_name", ["scaled_linear", "flow"])
@pytest.mark.parametrize("name", ["ddim", "dpmpp_2m", "ddpm"])
def test_img2img_start_from_intermediate_time(name, schedule_name):
    schedule, spacing = SCHEDULES[schedule_name]
    ts = img2img_grid(schedule.timesteps(STEPS[name], spacing), 0.4)
    assert ts[0] < schedule.t_max and len(ts) - 1 == int(0.4 * STEPS[name])
    assert_moments(*output_moments(SAMPLERS[name], schedule, ts), tol=0.02)


def test_ddpm_samples_end_to_end():
    """Without probes: real random draws from the DDPM chain match the data statistically."""
    schedule = VPSchedule.named("scaled_linear")
    ts = schedule.timesteps(250)
    x = torch.randn(20_000, *DATA.shape, generator=gen(1))
    y = samplers.ddpm(DATA.denoiser(schedule), x, ts, schedule, generator=gen(2)).double().reshape(-1, D)
    assert_moments(y.mean(0), torch.cov(y.T), tol=0.05)


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_seeded_determinism_and_any_shape(name):
    schedule = VPSchedule.named("scaled_linear")
    ts = schedule.timesteps(8)
    den = GaussianMixture.gaussian(torch.zeros(3 * 5 * 7), torch.eye(3 * 5 * 7) * 0.5, shape=(3, 5, 7)).denoiser(schedule)
    x = torch.randn(2, 3, 5, 7, generator=gen(0))
    y1 = SAMPLERS[name](den, x, ts, schedule, generator=gen(7))
    y2 = SAMPLERS[name](den, x, ts, schedule, generator=gen(7))
    y3 = SAMPLERS[name](den, x, ts, schedule, generator=gen(8))
    assert y1.shape == x.shape and y1.dtype == torch.float32
    assert torch.equal(y1, y2)
    assert torch.equal(y1, y3) == (name in ("euler", "heun", "dpmpp_2m", "ddim", "unipc", "lms"))


def test_callback_and_progress():
    schedule = VPSchedule.named("linear")
    seen = []
    samplers.dpmpp_2m(DATA.denoiser(schedule), torch.randn(3, 1, 2, 2), schedule.timesteps(5), schedule,
                      callback=lambda i, t, x, p: seen.append((i, t, x.shape, p.x0.shape)), progress=True)
    assert [s[0] for s in seen] == list(range(5)) and seen[0][1] == 999.0


def test_bad_inputs():
    schedule = VPSchedule.named("linear")
    den = DATA.denoiser(schedule)
    with pytest.raises(ValueError, match="unknown sampler 'plms'"):
        get_sampler("plms")
    with pytest.raises(ValueError, match="strictly decreasing"):
        samplers.ddim(den, torch.randn(2, 1, 2, 2), torch.tensor([10.0, 20.0, -1.0]), schedule)
    with pytest.raises(ValueError, match="batch"):
        samplers.ddim(den, torch.randn(4), schedule.timesteps(3), schedule)
    with pytest.raises(ValueError, match="denoiser returned shapes"):
        samplers.euler(lambda x, t, c: Prediction(x[:, :0], x), torch.randn(2, 1, 2, 2), schedule.timesteps(3), schedule)
    with pytest.raises(ValueError, match="variance"):
        samplers.ddpm(den, torch.randn(2, 1, 2, 2), schedule.timesteps(3), schedule, variance="learned")


def exact_flow(schedule, x, t0, t1):
    """The probability-flow ODE's exact solution for Gaussian data: x_t - a_t mu = S_t z with
    S_t = (a_t^2 COV + b_t^2 I)^(1/2) and z fixed along the path."""
    def S(t):
        a, b = (c.item() for c in schedule.alpha_sigma(torch.tensor(t, dtype=torch.float64)))
        w, v = torch.linalg.eigh(a * a * COV + b * b * torch.eye(D, dtype=torch.float64))
        return a, v @ torch.diag(w.sqrt()) @ v.T

    (a0, S0), (a1, S1) = S(t0), S(t1)
    return a1 * MU + (x - a0 * MU) @ torch.linalg.solve(S0, S1).T


@pytest.mark.parametrize("schedule_name, t0, t1", [("scaled_linear", 999.0, 200.0), ("zero_snr", 999.0, 200.0),
                                                   ("flow", 1.0, 0.2)])
@pytest.mark.parametrize("name, order", [("ddim", 1), ("euler", 1), ("heun", 2), ("dpmpp_2m", 2)])
def test_convergence_order_on_the_exact_ode(name, order, schedule_name, t0, t1):
    """Error against the ODE's closed-form solution falls as steps^-order: a sampler that lost its
    second-order term (DPM++ 2M is DDIM without it) converges at order 1 and fails."""
    schedule = SCHEDULES[schedule_name][0]
    x = MU * schedule.alpha_sigma(torch.tensor(t0))[0].item() + torch.randn(64, D, generator=gen(5), dtype=torch.float64)
    exact = exact_flow(schedule, x, t0, t1)
    errors = [(get_sampler(name)(DATA.denoiser(schedule), x.reshape(-1, *DATA.shape),
                                 torch.linspace(t0, t1, n + 1, dtype=torch.float64), schedule).reshape(-1, D) - exact).norm()
              for n in (16, 32, 64)]
    measured = torch.log2(errors[1] / errors[2]).item()
    assert abs(measured - order) < 0.3, f"order {measured:.2f}, errors {[f'{e:.2e}' for e in errors]}"
