"""Given the same sequence of model outputs, our samplers follow diffusers' schedulers step for step."""

import pytest
import torch

from diffusekit import samplers
from diffusekit.denoisers import NetworkDenoiser
from diffusekit.samplers import SAMPLERS
from diffusekit.schedules import FlowSchedule, VPSchedule

from .conftest import gen

diffusers = pytest.importorskip("diffusers")

_conv = torch.nn.Conv2d(3, 3, 3, padding=1)
torch.nn.init.normal_(_conv.weight, std=0.2, generator=gen(3))


@torch.no_grad()
def toy_net(x, t):
    """A fixed nonlinear function of (x, t) standing in for a network."""
    t = torch.as_tensor(t, dtype=x.dtype).reshape(-1, 1, 1, 1)
    return torch.tanh(_conv(x)) * (1 + torch.cos(t / 300)) + 0.1 * x


PARITY = {
    "ddpm": lambda **kw: diffusers.DDPMScheduler(clip_sample=False, **kw),
    "ddpm_large": lambda **kw: diffusers.DDPMScheduler(clip_sample=False, variance_type="fixed_large", **kw),
    "ddim": lambda **kw: diffusers.DDIMScheduler(clip_sample=False, set_alpha_to_one=True, **kw),
    "ddim_eta": lambda **kw: diffusers.DDIMScheduler(clip_sample=False, set_alpha_to_one=True, **kw),
    "euler": diffusers.EulerDiscreteScheduler,
    "euler_ancestral": diffusers.EulerAncestralDiscreteScheduler,
    "heun": diffusers.HeunDiscreteScheduler,
    "dpmpp_2m": lambda **kw: diffusers.DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2, **kw),
}
OURS = {"ddpm_large": lambda *a, **k: samplers.ddpm(*a, variance="large", **k),
        "ddim_eta": lambda *a, **k: samplers.ddim(*a, eta=0.7, **k)}
SIGMA_SPACE = ("euler", "euler_ancestral", "heun")  # diffusers keeps these samples as x_t / a_t


def run_diffusers(sched, sample, step_kw):
    """diffusers' denoising loop from `sample`; returns the trajectory of its samples."""
    traj = []
    for t in sched.timesteps:
        scale_input = getattr(sched, "scale_model_input", lambda x_, t_: x_)
        out = toy_net(scale_input(sample, t), t)
        sample = sched.step(out, t, sample, **step_kw).prev_sample
        traj.append(sample)
    return traj


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("name", list(PARITY))
def test_matches_diffusers(name, prediction, spacing):
    if prediction == "sample" and name not in ("ddpm", "ddim", "dpmpp_2m"):
        pytest.skip("diffusers' sigma-space schedulers take no x0 prediction")
    sched = PARITY[name](beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                         prediction_type=prediction, timestep_spacing=spacing)
    sched.set_timesteps(20)
    schedule = VPSchedule.named("scaled_linear")
    model_ts = sched.timesteps[::2] if name == "heun" else sched.timesteps  # Heun lists each time twice
    ts = torch.cat([model_ts.double(), torch.tensor([-1.0], dtype=torch.float64)])
    x = torch.randn(2, 3, 8, 8, generator=gen(1))
    a = schedule.alpha_sigma(ts)[0]
    if name == "ddpm_large" and spacing == "trailing":
        pytest.skip("diffusers adds beta-sized noise on the last step to clean data when that step starts at t > 0")
    step_kw = {"generator": gen(5)} if name in ("ddpm", "ddpm_large", "euler_ancestral", "ddim_eta") else {}
    if name == "ddim_eta":
        step_kw["eta"] = 0.7
    # diffusers' sigma-space samples are x_t / a_t (its init_noise_sigma only approximates 1 / a_T)
    theirs = run_diffusers(sched, x / a[0].item() if name in SIGMA_SPACE else x, step_kw)
    if name == "heun":
        theirs = theirs[1::2] + theirs[-1:]  # after each completed Heun step
    ours = []
    kind = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}[prediction]
    (OURS.get(name) or SAMPLERS[name])(NetworkDenoiser(toy_net, schedule, kind), x, ts, schedule, generator=gen(5),
                                        callback=lambda i, t, x_, p: ours.append(x_))
    assert len(ours) == len(ts) - 1 == len(theirs)
    for i, (o, th) in enumerate(zip(ours, theirs)):
        th = th * a[i + 1].item() if name in SIGMA_SPACE else th
        scale = th.abs().max().item()
        assert (o - th).abs().max().item() < 1e-5 * max(scale, 1), f"step {i}: {(o - th).abs().max()} (scale {scale})"


def test_flow_euler_matches_diffusers():
    sched = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(20)
    schedule = FlowSchedule(shift=3.0)
    x = torch.randn(2, 3, 8, 8, generator=gen(1))
    theirs = run_diffusers(sched, x, {})
    ours = []
    den = NetworkDenoiser(toy_net, schedule, "flow", timestep_scale=1000)
    samplers.euler(den, x, sched.sigmas.double(), schedule, callback=lambda i, t, x_, p: ours.append(x_))
    for o, th in zip(ours, theirs, strict=True):
        assert (o - th).abs().max().item() < 1e-5 * max(th.abs().max().item(), 1)


class LearnedSigmaNet(torch.nn.Module):
    """toy_net plus a variance channel block v in [-1, 1], flagged as a learned-sigma network."""

    config = type("Config", (), {"learned_sigma": True})()

    def forward(self, x, t):
        return torch.cat([toy_net(x, t), torch.tanh(toy_net(x.flip(1), t))], dim=1)


@pytest.mark.parametrize("spacing", ["leading", "linspace"])  # grids ending at t = 0 (see ddpm_large above)
def test_ddpm_learned_variance_matches_diffusers(spacing):
    sched = diffusers.DDPMScheduler(beta_schedule="linear", variance_type="learned_range", clip_sample=False,
                                    timestep_spacing=spacing)
    sched.set_timesteps(25)
    net = LearnedSigmaNet()
    x = torch.randn(2, 3, 8, 8, generator=gen(1))
    g, sample = gen(5), x.clone()
    for t in sched.timesteps:
        sample = sched.step(net(sample, t), t, sample, generator=g).prev_sample
    schedule = VPSchedule.named("linear")
    ts = torch.cat([sched.timesteps.double(), torch.tensor([-1.0], dtype=torch.float64)])
    ours = samplers.ddpm(NetworkDenoiser(net, schedule), x, ts, schedule, variance="learned", generator=gen(5))
    # diffusers interpolates log variances in float32: agreement to its rounding, 1e-4
    torch.testing.assert_close(ours, sample, atol=1e-4, rtol=1e-4)


def test_learned_variance_needs_a_learned_sigma_network():
    schedule = VPSchedule.named("linear")
    with pytest.raises(ValueError, match="learned sigma"):
        samplers.ddpm(NetworkDenoiser(toy_net, schedule), torch.randn(1, 3, 8, 8), schedule.timesteps(3), schedule,
                      variance="learned")
