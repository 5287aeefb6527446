"""The A1111 sampler menu (issue 12): DPM++ 2M Karras / exponential, DPM++ SDE, DPM++ 2S a, UniPC and LMS follow
diffusers' schedulers step for step (k-diffusion's algorithm where diffusers has none), reproduce Gaussian data
with the exact denoiser, and converge at their order on the exact ODE."""

import importlib
import importlib.util
import math
import sys
import types

import pytest
import torch

from diffusekit import samplers
from diffusekit.denoisers import NetworkDenoiser
from diffusekit.schedules import VPSchedule, exponential_sigmas, karras_sigmas

from .conftest import gen
from .test_samplers import D, DATA, MU, SCHEDULES, assert_moments, exact_flow, output_moments
from .test_samplers_diffusers import diffusers, run_diffusers, toy_net

SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
KIND = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}
GRIDS = {"karras": dict(use_karras_sigmas=True), "exponential": dict(use_exponential_sigmas=True)}


def sigmas(schedule, ts):
    return (-schedule.logsnr(ts) / 2).exp()


def max_rel_diff(ours, theirs):
    """Largest |ours - theirs| over steps, relative to each step's scale (at least 1)."""
    assert len(ours) == len(theirs)
    return max(((o - th).abs().max() / max(th.abs().max().item(), 1)).item() for o, th in zip(ours, theirs))


def trajectory(sampler, net, schedule, x, ts, prediction, **kw):
    ours = []
    sampler(NetworkDenoiser(net, schedule, KIND[prediction]), x, ts, schedule,
            callback=lambda i, t, x_, p: ours.append(x_), **kw)
    return ours


def on_their_times(ts, their_ts):
    """toy_net fed diffusers' integer timestep for our (fractional) grid time: diffusers' multistep schedulers round
    Karras times and truncate exponential ones for the network, but integrate with the exact sigmas."""
    return lambda x, t: toy_net(x, their_ts[(ts[:-1] - t[0]).abs().argmin()])


# ----------------------------------------------------------------------------- grids

@pytest.mark.parametrize("n", [1, 5, 20, 100])
@pytest.mark.parametrize("grid", list(GRIDS))
def test_sigma_grids_match_diffusers(grid, n):
    sched = diffusers.DPMSolverMultistepScheduler(**SD, **GRIDS[grid])
    sched.set_timesteps(n)
    schedule = VPSchedule.named("scaled_linear")
    ts = schedule.timesteps(n, grid)
    assert len(ts) == n + 1 and ts[0] == 999 and ts[-1] == -1
    # diffusers' table is float32 (1e-5 relative in sigma); its network times are rounded (karras) or truncated
    torch.testing.assert_close(sigmas(schedule, ts[:-1]).float(), sched.sigmas[:-1], rtol=3e-5, atol=0)
    their_ts = ts[:-1].round() if grid == "karras" else ts[:-1].floor()
    assert (their_ts - sched.timesteps).abs().max() <= 1  # float32 table: at most one step off after rounding


def test_sigma_grid_shapes():
    s = karras_sigmas(8, 0.03, 14.6)
    assert s[0].item() == pytest.approx(14.6) and s[-1].item() == pytest.approx(0.03)
    inv = s ** (1 / 7)
    torch.testing.assert_close(inv.diff(), inv.diff()[:1].expand(7))  # uniform in sigma^(1/rho)
    e = exponential_sigmas(8, 0.03, 14.6).log()
    torch.testing.assert_close(e.diff(), e.diff()[:1].expand(7))  # uniform in log sigma
    with pytest.raises(ValueError, match="finite sigma_max"):
        VPSchedule.named("scaled_linear", zero_terminal_snr=True).timesteps(10, "karras")


# ----------------------------------------------------------------------------- parity with diffusers

@pytest.mark.parametrize("prediction", list(KIND))
@pytest.mark.parametrize("grid", list(GRIDS))
def test_dpmpp_2m_sigma_grids_match_diffusers(grid, prediction):
    sched = diffusers.DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2, prediction_type=prediction,
                                                  **SD, **GRIDS[grid])
    sched.set_timesteps(20)
    schedule = VPSchedule(sched.alphas_cumprod)  # diffusers' float32 table: differences are the samplers' alone
    ts = schedule.timesteps(20, grid)
    x = torch.randn(2, 3, 8, 8, generator=gen(1))
    ours = trajectory(samplers.dpmpp_2m, on_their_times(ts, sched.timesteps), schedule, x, ts, prediction)
    assert max_rel_diff(ours, run_diffusers(sched, x, {})) < 1e-5


@pytest.mark.parametrize("grid", ["leading", "trailing", "karras"])
@pytest.mark.parametrize("prediction", list(KIND))
@pytest.mark.parametrize("order", [1, 2, 3])
def test_unipc_matches_diffusers(order, prediction, grid):
    spacing = {"timestep_spacing": grid} if grid != "karras" else GRIDS[grid]
    sched = diffusers.UniPCMultistepScheduler(solver_type="bh2", solver_order=order, predict_x0=True,
                                              prediction_type=prediction, **SD, **spacing)
    sched.set_timesteps(20)
    schedule = VPSchedule(sched.alphas_cumprod)
    # UniPC's leading spacing differs from DDIM's: take its grid (and for karras, ours, checked above)
    ts = schedule.timesteps(20, grid) if grid == "karras" else torch.cat([sched.timesteps.double(), torch.tensor([-1.0])])
    x = torch.randn(2, 3, 8, 8, generator=gen(1))
    net = on_their_times(ts, sched.timesteps) if grid == "karras" else toy_net
    ours = trajectory(samplers.unipc, net, schedule, x, ts, prediction, order=order)
    assert max_rel_diff(ours, run_diffusers(sched, x, {})) < 1e-5


@pytest.mark.parametrize("grid", ["leading", "trailing", "karras", "exponential"])
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])  # diffusers' LMS takes no x0 prediction
def test_lms_matches_diffusers(prediction, grid):
    # diffusers' LMS makes Karras / exponential grids from its spaced sigmas: 'linspace' spans the whole table
    spacing = {"timestep_spacing": grid} if grid in ("leading", "trailing") else {"timestep_spacing": "linspace", **GRIDS[grid]}
    sched = diffusers.LMSDiscreteScheduler(prediction_type=prediction, **SD, **spacing)
    sched.set_timesteps(20)
    schedule = VPSchedule(sched.alphas_cumprod)
    ts = schedule.timesteps(20, grid)
    a = schedule.alpha_sigma(ts)[0].tolist()
    x = torch.randn(2, 3, 8, 8, generator=gen(1))
    ours = trajectory(samplers.lms, toy_net, schedule, x, ts, prediction)
    theirs = [th * a[i + 1] for i, th in enumerate(run_diffusers(sched, x / a[0], {}))]  # diffusers: x_t / a_t
    assert max_rel_diff(ours, theirs) < 1e-5


class BrownianPath:
    """W(sigma) along decreasing sigma, each new point one unit normal further, called like k-diffusion's noise
    samplers: (sigma, sigma_next) -> (W(sigma_next) - W(sigma)) / sqrt|sigma_next - sigma|."""

    def __init__(self, normals):
        self.normals, self.points = iter(normals), []  # [(sigma, W(sigma))], sigma decreasing

    def W(self, sigma):
        for s, w in self.points:
            if abs(s - sigma) <= 1e-5 * s:
                return w
        if self.points:
            s, w = self.points[-1]
            assert sigma < s
            self.points.append((sigma, w + (s - sigma) ** 0.5 * next(self.normals)))
        else:
            self.points.append((sigma, 0.0))
        return self.points[-1][1]

    def __call__(self, sigma, sigma_next):
        sigma, sigma_next = float(sigma), float(sigma_next)
        w = self.W(sigma)
        return (self.W(sigma_next) - w) / abs(sigma_next - sigma) ** 0.5


def replay(normals):
    """Noise for our samplers that draws `normals` in order."""
    it = iter(normals)
    return lambda x, generator: next(it)


@pytest.mark.parametrize("grid", ["leading", "trailing", "karras"])
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])  # diffusers' SDE scheduler takes no x0 prediction
def test_dpmpp_sde_matches_diffusers(prediction, grid, monkeypatch):
    """diffusers' DPMSolverSDEScheduler (k-diffusion's sample_dpmpp_sde) with its Brownian tree replaced by a Brownian
    path built from the normals our sampler draws; torchsde itself is needed only for that tree."""
    if importlib.util.find_spec("torchsde") is None:
        monkeypatch.setitem(sys.modules, "torchsde", types.ModuleType("torchsde"))
    module = importlib.import_module("diffusers.schedulers.scheduling_dpmsolver_sde")
    spacing = {"timestep_spacing": grid} if grid != "karras" else {"timestep_spacing": "linspace", **GRIDS[grid]}
    sched = module.DPMSolverSDEScheduler(prediction_type=prediction, **SD, **spacing)
    sched.set_timesteps(20)
    schedule = VPSchedule(sched.alphas_cumprod)
    ts = schedule.timesteps(20, grid)
    torch.testing.assert_close(sched.timesteps[::2].double(), ts[:-1], rtol=1e-6, atol=1e-6)  # diffusers also lists midpoints
    a = schedule.alpha_sigma(ts)[0].tolist()
    x = torch.randn(2, 3, 8, 8, generator=gen(1))
    normals = [torch.randn(x.shape, generator=gen(100 + k)) for k in range(38)]
    sched.noise_sampler = BrownianPath(normals)
    theirs = run_diffusers(sched, x / a[0], {})
    theirs = [th * a[i + 1] for i, th in enumerate(theirs[1::2] + theirs[-1:])]  # after each completed step
    ours = trajectory(samplers.dpmpp_sde, toy_net, schedule, x, ts, prediction, noise=replay(normals))
    assert max_rel_diff(ours, theirs) < 1e-5


def k_dpmpp_2s_ancestral(model, x, sigmas, noise_sampler):
    """DPM-Solver++(2S) ancestral (eta = 1) as k-diffusion runs it, written out here in sigma space as an independent
    reference; returns the state after each step. diffusers has no such scheduler."""
    traj = []
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        sigma_up = min(sigmas[i + 1], (sigmas[i + 1] ** 2 * (sigmas[i] ** 2 - sigmas[i + 1] ** 2) / sigmas[i] ** 2) ** 0.5)
        sigma_down = (sigmas[i + 1] ** 2 - sigma_up ** 2) ** 0.5
        if sigma_down == 0:
            x = x + (x - denoised) / sigmas[i] * (sigma_down - sigmas[i])
        else:
            t, t_next = -math.log(sigmas[i]), -math.log(sigma_down)
            h = t_next - t
            s = t + h / 2
            x_2 = (math.exp(-s) / math.exp(-t)) * x - math.expm1(-h / 2) * denoised
            denoised_2 = model(x_2, math.exp(-s))
            x = (math.exp(-t_next) / math.exp(-t)) * x - math.expm1(-h) * denoised_2
        if sigmas[i + 1] > 0:
            x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * sigma_up
        traj.append(x)
    return traj


@pytest.mark.parametrize("grid", ["leading", "karras"])
@pytest.mark.parametrize("prediction", list(KIND))
def test_dpmpp_2s_ancestral_matches_k_diffusion(prediction, grid):
    schedule = VPSchedule.named("scaled_linear")
    den = NetworkDenoiser(toy_net, schedule, KIND[prediction])
    ts = schedule.timesteps(20, grid)
    sig = sigmas(schedule, ts).tolist()

    def model(x_k, sigma):  # k-diffusion's CompVisDenoiser: x_k = x / a, time by interpolating log sigma
        t = schedule.t_from_logsnr(-2 * math.log(sigma))
        return den(x_k / (1 + sigma**2) ** 0.5, t.reshape(1).expand(len(x_k))).x0

    x = torch.randn(2, 3, 8, 8, generator=gen(1))
    normals = [torch.randn(x.shape, generator=gen(100 + k)) for k in range(19)]
    it = iter(normals)
    a = schedule.alpha_sigma(ts)[0].tolist()
    theirs = [x_k * a[i + 1] for i, x_k in enumerate(k_dpmpp_2s_ancestral(model, x / a[0], sig, lambda *_: next(it)))]
    ours = trajectory(samplers.dpmpp_2s_ancestral, toy_net, schedule, x, ts, prediction, noise=replay(normals))
    assert max_rel_diff(ours, theirs) < 1e-5


# ----------------------------------------------------------------------------- Gaussian oracle and convergence

ORACLE_STEPS = {"dpmpp_2m": 100, "dpmpp_2s_ancestral": 250, "dpmpp_sde": 250, "unipc": 100, "lms": 100}


@pytest.mark.parametrize("grid", list(GRIDS))
@pytest.mark.parametrize("name", list(ORACLE_STEPS))
def test_gaussian_oracle_on_sigma_grids(name, grid):
    schedule = SCHEDULES["scaled_linear"][0]
    ts = schedule.timesteps(ORACLE_STEPS[name], grid)
    assert_moments(*output_moments(samplers.SAMPLERS[name], schedule, ts), tol=0.02)


def ode_errors(name, kw, schedule_name, t0, t1, ns, before_last=False):
    """Errors against the ODE's closed-form solution (test_samplers.exact_flow) on uniform grids of ns steps from t0
    to t1, at t1 or, with before_last, at the grid's last time before t1."""
    schedule = SCHEDULES[schedule_name][0]
    x = MU * schedule.alpha_sigma(torch.tensor(t0))[0].item() + torch.randn(64, D, generator=gen(5), dtype=torch.float64)
    errors = []
    for n in ns:
        ts, traj = torch.linspace(t0, t1, n + 1, dtype=torch.float64), []
        samplers.SAMPLERS[name](DATA.denoiser(schedule), x.reshape(-1, *DATA.shape), ts, schedule,
                                callback=lambda i, t, x_, p: traj.append(x_.reshape(-1, D)), **kw)
        k = -2 if before_last else -1
        errors.append((traj[k] - exact_flow(schedule, x, t0, ts[k].item())).norm().item())
    return errors


@pytest.mark.parametrize("name, kw, lo, hi", [
    ("unipc", {"order": 1}, 1.7, 2.3), ("unipc", {}, 1.7, 2.3), ("unipc", {"order": 3}, 1.7, 2.3),
    ("lms", {"order": 1}, 0.7, 1.3), ("lms", {"order": 2}, 1.7, 2.3), ("lms", {"order": 3}, 1.7, 3.3),
    ("lms", {}, 1.7, 4.3)])
@pytest.mark.parametrize("schedule_name, t0, t1", [("scaled_linear", 999.0, 200.0), ("zero_snr", 999.0, 200.0),
                                                   ("flow", 1.0, 0.2)])
def test_convergence_order_on_the_exact_ode(name, kw, lo, hi, schedule_name, t0, t1):
    """As in test_samplers, errors fall as steps^-order, where the order is capped by first-order steps: UniPC's
    last step (lower_order_final, as in diffusers and the reference code) makes every order 2 at the grid's end;
    LMS warms up through orders 1, 2, .. (as k-diffusion and diffusers do), which caps it at 2 in theory
    (measured 2.0 - 2.9 for orders 3 and 4)."""
    errors = ode_errors(name, kw, schedule_name, t0, t1, (32, 64))
    measured = math.log2(errors[0] / errors[1])
    assert lo < measured < hi, f"order {measured:.2f}, errors {[f'{e:.2e}' for e in errors]}"


@pytest.mark.parametrize("name, kw, order", [("unipc", {}, 3), ("unipc", {"order": 3}, 3), ("dpmpp_2m", {}, 2)])
def test_unipc_corrector_adds_an_order(name, kw, order):
    """Before its first-order last step, UniPC-2 (whose predictor is DPM++ 2M) is third order thanks to UniC; on
    zero-SNR and flow grids the first step from pure noise caps it at 2."""
    errors = ode_errors(name, kw, "scaled_linear", 999.0, 200.0, (64, 128), before_last=True)
    measured = math.log2(errors[0] / errors[1])
    assert abs(measured - order) < 0.3, f"order {measured:.2f}, errors {[f'{e:.2e}' for e in errors]}"
