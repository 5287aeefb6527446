"""Upsample Guidance against its exact oracle (SPEC §7).

High-resolution Gaussian data x0 = U[y] + r, with y ~ N(mu, Sigma) at low resolution and r Gaussian
with D[r] = 0: the high-frequency part of x_t then says nothing about y, so D of the exact high-res
posterior mean is the exact low-res posterior mean at (D[x_t] / rho, tau), and UG built from the two
exact denoisers must return the exact high-res denoiser for every w."""

import math

import pytest
import torch

from diffusekit.denoisers import NetworkDenoiser
from diffusekit import defaults
from diffusekit.guidance import CFG, UpsampleGuidance, downsample, upsample, upsample_guidance_weight
from diffusekit.parametrization import Prediction, training_target
from diffusekit.samplers import SAMPLERS
from diffusekit.schedules import FlowSchedule, VPSchedule
from diffusekit.toy import GaussianMixture

from .conftest import gen


def spd(n: int, g: torch.Generator) -> torch.Tensor:
    q = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))[0]
    return q @ torch.diag(torch.rand(n, generator=g, dtype=torch.float64) * 1.5 + 0.2) @ q.T


def pooling_matrices(h: int, w: int, s: int) -> tuple[torch.Tensor, torch.Tensor]:
    """D [h*w, H*W] and U [H*W, h*w] as matrices, read off the operators on basis images."""
    eye_high = torch.eye(h * s * w * s, dtype=torch.float64).reshape(-1, 1, h * s, w * s)
    eye_low = torch.eye(h * w, dtype=torch.float64).reshape(-1, 1, h, w)
    return downsample(eye_high, s).reshape(-1, h * w).T, upsample(eye_low, s).reshape(-1, h * s * w * s).T


class Oracle:
    """Exact denoisers of the two-scale Gaussian data, dispatched on the input's size."""

    def __init__(self, schedule, h: int = 2, w: int = 3, s: int = 2, seed: int = 0):
        g = gen(seed)
        D, U = pooling_matrices(h, w, s)
        mu, sigma = torch.randn(h * w, generator=g, dtype=torch.float64), spd(h * w, g)
        P = torch.eye(len(U), dtype=torch.float64) - U @ D  # orthogonal projection onto ker D
        cov_high = U @ sigma @ U.T + P @ spd(len(U), g) @ P.T
        self.low = GaussianMixture.gaussian(mu, sigma, shape=(1, h, w))
        self.high = GaussianMixture.gaussian(U @ mu, cov_high, shape=(1, h * s, w * s))
        self.den_low, self.den_high = self.low.denoiser(schedule), self.high.denoiser(schedule)
        self.schedule, self.size_high, self.calls = schedule, (h * s, w * s), []

    def __call__(self, x, t, cond=None):
        self.calls.append(tuple(x.shape))
        return (self.den_high if tuple(x.shape[-2:]) == self.size_high else self.den_low)(x, t)

    def as_network(self, kind: str):
        """The oracle as a network predicting `kind`, behind a NetworkDenoiser."""
        scale = 1000.0 if isinstance(self.schedule, FlowSchedule) else 1.0

        def net(x, timestep):
            t = timestep.double() / scale
            p = self(x, t)
            a, b = (c.reshape(-1, 1, 1, 1) for c in self.schedule.alpha_sigma(t))
            return training_target(kind, p.x0, p.eps, a, b)

        return NetworkDenoiser(net, self.schedule, kind, timestep_scale=scale)


SCHEDULES = {"vp": VPSchedule.named("linear"), "flow": FlowSchedule(shift=2.0)}
# times where tau is not clamped (for VP: s^2 SNR(t) below the table's SNR at t = 0)
TIMES = {"vp": [120.0, 300.0, 617.25, 900.0, 999.0], "flow": [0.02, 0.3, 0.5, 0.77, 1.0]}


def _x_t(oracle: Oracle, schedule, t: float, n: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    a, b = (c.item() for c in schedule.alpha_sigma(t))
    return oracle.high.sample(n, gen(5), a, b), torch.full((n,), t, dtype=torch.float64)


@pytest.mark.parametrize("w", [0.0, 0.2, 1.0, 3.0, defaults.UG_AUTO])
@pytest.mark.parametrize("s", [2, 4])
@pytest.mark.parametrize("sched,kind", [("vp", "eps"), ("vp", "v"), ("vp", "x0"), ("flow", "flow"), ("flow", "x0")])
def test_ug_of_exact_denoisers_is_the_exact_high_res_denoiser(sched, kind, s, w):
    schedule = SCHEDULES[sched]
    oracle = Oracle(schedule, s=s)
    ug = UpsampleGuidance(oracle.as_network(kind), schedule, s, upsample_guidance_weight(w))
    for t in TIMES[sched]:
        x, tt = _x_t(oracle, schedule, t)
        exact, guided = oracle.den_high(x, tt), ug(x, tt)
        torch.testing.assert_close(guided.x0, exact.x0, atol=1e-5, rtol=0, msg=f"x0 at t={t}")
        if t > 0.02 * schedule.t_max:  # eps = (x - a x0) / b is ill-conditioned where b is tiny
            torch.testing.assert_close(guided.eps, exact.eps, atol=1e-5, rtol=0, msg=f"eps at t={t}")


def _error_with(oracle, schedule, s, pooled_time=None, eps_factor=None) -> float:
    """Largest deviation from the exact eps of UG with one ingredient replaced (negative controls)."""
    worst = 0.0
    for t in TIMES["vp" if isinstance(schedule, VPSchedule) else "flow"][1:]:
        x, tt = _x_t(oracle, schedule, t)
        p = oracle(x, tt)
        tau, rho = pooled_time(tt) if pooled_time else schedule.pooled_time(tt, s)
        q = oracle(downsample(x, s) / rho.reshape(-1, 1, 1, 1), tau)
        eps = p.eps + 1.2 * upsample((eps_factor or 1 / s) * q.eps - downsample(p.eps, s), s)
        worst = max(worst, (eps - oracle.den_high(x, tt).eps).abs().max().item())
    return worst


@pytest.mark.parametrize("sched", ["vp", "flow"])
def test_the_oracle_catches_a_wrong_tau_rho_or_factor(sched):
    schedule, s = SCHEDULES[sched], 2
    oracle = Oracle(schedule, s=s)
    assert _error_with(oracle, schedule, s) < 1e-6  # the right ingredients
    a = lambda t: schedule.alpha_sigma(t)  # noqa: E731
    assert _error_with(oracle, schedule, s, pooled_time=lambda t: (t, schedule.pooled_time(t, s)[1])) > 1e-2  # tau = t
    assert _error_with(oracle, schedule, s, pooled_time=lambda t: (schedule.pooled_time(t, s)[0], torch.ones_like(t))) > 1e-2
    assert _error_with(oracle, schedule, s, eps_factor=1.0) > 1e-2  # no 1/s
    assert a(0.5 * schedule.t_max)[0] > 0


def test_pooled_time_formulas():
    vp, flow = SCHEDULES["vp"], SCHEDULES["flow"]
    t = torch.tensor([200.0, 500.5, 999.0], dtype=torch.float64)
    tau, rho = vp.pooled_time(t, 3)
    a, b = vp.alpha_sigma(t)
    torch.testing.assert_close(vp.snr(tau), 9 * vp.snr(t))
    torch.testing.assert_close(rho, (a**2 + b**2 / 9).sqrt())
    u = torch.tensor([0.1, 0.5, 1.0], dtype=torch.float64)
    tau, rho = flow.pooled_time(u, 2)
    torch.testing.assert_close(rho, (1 - u) + u / 2)
    torch.testing.assert_close(tau, u / (rho * 2))
    assert vp.pooled_time(torch.tensor([1.0], dtype=torch.float64), 4)[0] == 0  # clamped to the table


def test_w_minus_one_is_off_and_eta_skips_the_low_res_call():
    schedule = SCHEDULES["vp"]
    oracle = Oracle(schedule, s=2)
    x, t = _x_t(oracle, schedule, 600.0)
    off = UpsampleGuidance(oracle, schedule, 2, w=-1.0)(x, t)
    plain = oracle.den_high(x, t)
    assert torch.equal(off.eps, plain.eps) and torch.equal(off.x0, plain.x0)

    oracle.calls.clear()
    ts = schedule.timesteps(20)
    SAMPLERS["ddim"](UpsampleGuidance(oracle, schedule, 2, w=0.3, eta=0.4), x, ts, schedule)
    high = [c for c in oracle.calls if c[-2:] == (4, 6)]
    low = [c for c in oracle.calls if c[-2:] == (2, 3)]
    expected_low = sum(1 for v in ts[:-1].tolist() if v >= 0.6 * 999)
    assert len(high) == 20 and len(low) == expected_low and 0 < expected_low < 20


class LabelledOracle(Oracle):
    """A class-conditional toy: the label shifts the data."""

    def __call__(self, x, t, cond=None):
        self.calls.append(tuple(x.shape))
        shift = cond["class_labels"].double().reshape(-1, 1, 1, 1) * 0.3
        p = super().__call__(x - shift, t)
        self.calls.pop()
        return Prediction(p.eps, p.x0 + shift)


def test_commutes_with_cfg_and_batches_cond_with_uncond():
    schedule = SCHEDULES["vp"]
    oracle = LabelledOracle(schedule, s=2)
    x, t = _x_t(oracle, schedule, 500.0, n=3)
    cond, uncond = {"class_labels": torch.tensor([1, 2, 3])}, {"class_labels": torch.zeros(3, dtype=torch.long)}
    oracle.calls.clear()
    a = UpsampleGuidance(CFG(oracle, 4.0, uncond), schedule, 2, 0.5)(x, t, cond)
    calls_a = list(oracle.calls)
    oracle.calls.clear()
    b = CFG(UpsampleGuidance(oracle, schedule, 2, 0.5), 4.0, uncond)(x, t, cond)
    torch.testing.assert_close(a.eps, b.eps, atol=1e-10, rtol=0)
    torch.testing.assert_close(a.x0, b.x0, atol=1e-10, rtol=0)
    assert sorted(calls_a) == sorted(oracle.calls) == [(6, 1, 2, 3), (6, 1, 4, 6)]  # 2B per resolution


def test_spatial_conditions_are_pooled_for_the_low_res_call():
    seen = []

    def den(x, t, cond):
        seen.append((tuple(x.shape), tuple(cond["concat"].shape), tuple(cond["context"].shape)))
        return Prediction(torch.zeros_like(x), torch.zeros_like(x))

    x = torch.randn(2, 4, 8, 12, dtype=torch.float64)
    cond = {"concat": torch.randn(2, 5, 8, 12), "context": torch.randn(2, 7, 16)}
    UpsampleGuidance(den, SCHEDULES["vp"], 4)(x, torch.full((2,), 500.0, dtype=torch.float64), cond)
    assert seen == [((2, 4, 8, 12), (2, 5, 8, 12), (2, 7, 16)), ((2, 4, 2, 3), (2, 5, 2, 3), (2, 7, 16))]


def test_bad_sizes_and_factors():
    schedule = SCHEDULES["vp"]
    with pytest.raises(ValueError, match="divisible by s = 2"):
        UpsampleGuidance(Oracle(schedule), schedule, 2)(torch.randn(1, 1, 5, 6), torch.full((1,), 10.0))
    with pytest.raises(ValueError, match="integer >= 2"):
        UpsampleGuidance(Oracle(schedule), schedule, 1)
    assert math.isclose(UpsampleGuidance(Oracle(schedule), schedule, 2, eta=0.3).weight(0.71 * 999), 0.2)


def test_runs_on_a_text_and_sdxl_conditioned_unet_with_cfg():
    """Cross-attention tokens, pooled text and micro-conditioning pass to both resolutions unchanged."""
    from diffusekit.models import build

    net = build("unet", dict(in_channels=4, out_channels=4, channels=8, channel_mult=(1, 2), attention_levels=(1,),
                             num_heads=2, context_dim=16, norm_groups=4, addition_time_embed_dim=8,
                             addition_embed_dim=12 + 6 * 8))
    schedule = SCHEDULES["vp"]
    cond = {"context": torch.randn(2, 5, 16), "pooled": torch.randn(2, 12), "time_ids": torch.rand(2, 6) * 64}
    uncond = {k: torch.zeros_like(v) for k, v in cond.items()}
    den = UpsampleGuidance(CFG(NetworkDenoiser(net, schedule, "v"), 5.0, uncond), schedule, 2, 0.2)
    x = SAMPLERS["dpmpp_2m"](den, torch.randn(2, 4, 16, 8), schedule.timesteps(3), schedule, cond)
    assert x.shape == (2, 4, 16, 8) and torch.isfinite(x).all()


@pytest.mark.parametrize("sched", ["vp", "flow"])
def test_sampling_with_the_auto_weight_keeps_the_exact_data_distribution(sched):
    """Sampled through UG(auto) of the exact two-scale oracle, the high-resolution samples have the data's mean and
    covariance (within the sampling error of 4,000 samples and 40 steps), as with no UG at all."""
    schedule = SCHEDULES[sched]
    oracle = Oracle(schedule, s=2)
    ug = UpsampleGuidance(oracle, schedule, 2, upsample_guidance_weight(defaults.UG_AUTO))
    ts = schedule.timesteps(40)
    a, b = (c.item() for c in schedule.alpha_sigma(ts[0]))
    x = oracle.high.sample(4000, gen(9), a, b)
    out = SAMPLERS["dpmpp_2m"](ug, x, ts, schedule).flatten(1)
    mean, cov = oracle.high.mean, oracle.high.cov
    assert (out.mean(0) - mean).abs().max() < 0.06
    assert (torch.cov(out.T) - cov).abs().max() < 0.08 * cov.abs().max()


def test_the_auto_weight_and_bad_weights():
    assert upsample_guidance_weight(defaults.UG_AUTO) == defaults.UG_AUTO_W and upsample_guidance_weight(0.7) == 0.7
    with pytest.raises(ValueError, match="must be a number or 'auto', got 'best'"):
        upsample_guidance_weight("best")


@pytest.mark.parametrize("w", [0.0, 0.5, 1.0])
def test_pooled_prediction_lies_w_times_the_disagreement_past_the_low_res_one(w):
    """D[x0~] = (1 + w) x0_low - w D[x0], so D[x0~] - x0_low = w (x0_low - D[x0]): the pooled guided prediction
    agrees with the low-resolution model exactly at w = 0 and moves away linearly in w. A rule choosing w by that
    consistency therefore always picks w = 0 (docs/upsample_guidance.md, "The weight", measured worst), shown here
    on a random network whose two resolutions disagree."""
    from diffusekit.models import build

    torch.manual_seed(0)
    net = build("unet", dict(in_channels=1, out_channels=1, channels=8, channel_mult=(1, 2), num_res_blocks=1,
                             attention_levels=(), context_dim=None, norm_groups=4))
    schedule = SCHEDULES["vp"]
    den = NetworkDenoiser(net, schedule, "eps")
    x, t = torch.randn(3, 1, 32, 32, generator=gen(1)), torch.full((3,), 500.0)
    with torch.no_grad():
        plain, guided = den(x, t), UpsampleGuidance(den, schedule, 2, w)(x, t)
        tau, rho = schedule.pooled_time(t, 2)
        low = den(downsample(x, 2) / rho[:, None, None, None], tau).x0
    disagreement = low - downsample(plain.x0, 2)
    assert disagreement.abs().mean() > 0.05  # the two resolutions really disagree
    torch.testing.assert_close(downsample(guided.x0, 2) - low, w * disagreement, atol=1e-5, rtol=1e-5)
