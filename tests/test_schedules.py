import math

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from diffusekit.schedules import FlowSchedule, VPSchedule, check_grid, flow_shift, img2img_grid, make_schedule

DIFFUSERS_NAMES = {
    "linear": dict(beta_schedule="linear", beta_start=1e-4, beta_end=0.02),
    "scaled_linear": dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
    "cosine": dict(beta_schedule="squaredcos_cap_v2"),
}


@pytest.mark.parametrize("zero_snr", [False, True])
@pytest.mark.parametrize("name", list(DIFFUSERS_NAMES))
def test_alphas_cumprod_match_diffusers(name, zero_snr):
    ref = diffusers.DDPMScheduler(**DIFFUSERS_NAMES[name], rescale_betas_zero_snr=zero_snr)
    ours = VPSchedule.named(name, zero_terminal_snr=zero_snr)
    # diffusers keeps float32 tables; ours are float64, so they agree to float32 resolution
    torch.testing.assert_close(ours.alphas_cumprod, ref.alphas_cumprod.double(), atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(ours.betas, ref.betas.double(), atol=1e-6, rtol=1e-4)
    if zero_snr:
        assert ours.alphas_cumprod[-1] == 0 and ours.logsnr(999) == -math.inf
        assert ours.alpha_sigma(999)[0] == 0


@pytest.mark.parametrize("name", list(DIFFUSERS_NAMES))
def test_logsnr_integer_times_are_the_table(name):
    s = VPSchedule.named(name)
    t = torch.arange(1000, dtype=torch.float64)
    a, b = s.alpha_sigma(t)
    torch.testing.assert_close(a**2, s.alphas_cumprod, rtol=1e-12, atol=0)
    torch.testing.assert_close(a**2 + b**2, torch.ones_like(a), rtol=1e-14, atol=0)
    torch.testing.assert_close(s.snr(t), s.alphas_cumprod / (1 - s.alphas_cumprod), rtol=1e-10, atol=0)
    assert s.alpha_sigma(-1.0) == (1.0, 0.0)


@pytest.mark.parametrize("name", list(DIFFUSERS_NAMES))
def test_fractional_logsnr_is_monotone_and_inverted(name):
    s = VPSchedule.named(name)
    t = torch.rand(10_000, dtype=torch.float64) * 999
    l = s.logsnr(t)
    ts = t.sort().values
    assert (s.logsnr(ts).diff() < 0).all()
    torch.testing.assert_close(s.t_from_logsnr(l), t, atol=1e-6, rtol=0)
    torch.testing.assert_close(s.logsnr(s.t_from_logsnr(l)), l, atol=1e-6, rtol=0)
    # linear interpolation between table entries
    torch.testing.assert_close(s.logsnr(10.25), 0.75 * s.logsnr(10) + 0.25 * s.logsnr(11))
    # out-of-range logSNR clamps to the schedule's ends
    assert s.t_from_logsnr(100.0) == 0 and s.t_from_logsnr(-100.0) == 999


def test_zero_terminal_snr_inverse_reaches_the_end():
    s = VPSchedule.named("scaled_linear", zero_terminal_snr=True)
    assert s.t_from_logsnr(-math.inf) == 999
    t = torch.rand(1000, dtype=torch.float64) * 998
    torch.testing.assert_close(s.t_from_logsnr(s.logsnr(t)), t, atol=1e-6, rtol=0)


def test_flow_schedule():
    s = FlowSchedule()
    t = torch.rand(1000, dtype=torch.float64)
    a, b = s.alpha_sigma(t)
    torch.testing.assert_close(a + b, torch.ones_like(t))
    torch.testing.assert_close(s.t_from_logsnr(s.logsnr(t)), t, atol=1e-12, rtol=0)
    torch.testing.assert_close(s.snr(t), ((1 - t) / t) ** 2)
    assert s.logsnr(0.0) == math.inf and s.logsnr(1.0) == -math.inf


def test_flow_shift():
    t = torch.rand(100, dtype=torch.float64)
    torch.testing.assert_close(flow_shift(t, 3.0), 3 * t / (1 + 2 * t))
    torch.testing.assert_close(flow_shift(t, 1.0), t)
    # shift s multiplies the noise-to-signal ratio t / (1 - t) by s
    u = flow_shift(t, 3.0)
    torch.testing.assert_close(u / (1 - u), 3 * t / (1 - t))
    grid = FlowSchedule(shift=3.0).timesteps(10)
    assert grid[0] == 1 and grid[-1] == 0 and len(grid) == 11
    assert (grid[1:-1] > FlowSchedule().timesteps(10)[1:-1]).all()


@pytest.mark.parametrize("n", [1, 7, 20, 50, 333])
@pytest.mark.parametrize("spacing,offset", [("leading", 0), ("leading", 1), ("trailing", 0), ("linspace", 0)])
def test_spacings_match_diffusers(n, spacing, offset):
    ref = diffusers.DDIMScheduler(timestep_spacing=spacing, steps_offset=offset)
    ref.set_timesteps(n)
    ts = VPSchedule.named("linear").timesteps(n, spacing, offset)
    assert ts[-1] == -1
    assert ts[:-1].tolist() == ref.timesteps.tolist()


def test_img2img_grid_matches_diffusers_strength():
    ts = VPSchedule.named("scaled_linear").timesteps(50, "leading", 1)
    sub = img2img_grid(ts, 0.6)
    assert len(sub) == 31 and sub[0] == ts[20] and sub[-1] == -1
    assert len(img2img_grid(ts, 1.0)) == 51


@pytest.mark.parametrize(
    "grid,msg",
    [
        ([999.0, 500.0, 600.0, -1.0], "strictly decreasing"),
        ([1200.0, 500.0, -1.0], "lie in"),
        ([999.0, 500.0, -2.0], "lie in"),
        ([999.0, 0.5, -0.5], "-1 \\(clean\\) or inside"),
        ([999.0], "at least 2"),
        ([999.0, float("nan"), -1.0], "non-finite"),
    ],
)
def test_bad_grids(grid, msg):
    with pytest.raises(ValueError, match=msg):
        check_grid(VPSchedule.named("linear"), torch.tensor(grid))


def test_bad_names():
    with pytest.raises(ValueError, match="unknown schedule 'quadratic'"):
        make_schedule("quadratic")
    with pytest.raises(ValueError, match="unknown timestep spacing"):
        VPSchedule.named("linear").timesteps(10, "uniform")
    with pytest.raises(ValueError, match="number of steps"):
        VPSchedule.named("linear").timesteps(0)
    with pytest.raises(ValueError, match="inside \\[0, 1\\]"):
        FlowSchedule().alpha_sigma(1.5)
    with pytest.raises(ValueError, match="strictly decreasing"):
        VPSchedule(torch.tensor([0.5, 0.6, 0.1]))
