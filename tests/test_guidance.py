import pytest
import torch

from diffusekit.guidance import CFG
from diffusekit.parametrization import Prediction
from diffusekit.samplers import dpmpp_2m
from diffusekit.schedules import VPSchedule
from diffusekit.toy import GaussianMixture

from .conftest import gen


class Recorder:
    """A conditional toy denoiser that logs the batch sizes it is called with."""

    def __init__(self):
        self.batches = []
        self.w = torch.randn(4, 3 * 4 * 4, generator=gen(0))

    def __call__(self, x, t, cond):
        self.batches.append(len(x))
        shift = (cond["label"].float()[:, None] @ self.w[:1]).reshape(x.shape) + cond["ctx"].sum((1, 2)).reshape(-1, 1, 1, 1)
        eps = torch.tanh(x + shift) * (t.float().reshape(-1, 1, 1, 1) / 1000)
        return Prediction(eps, x - eps)


def _inputs(B=3):
    x = torch.randn(B, 3, 4, 4, generator=gen(1))
    t = torch.full((B,), 500.0, dtype=torch.float64)
    cond = {"label": torch.tensor([1, 2, 3][:B]), "ctx": torch.randn(B, 5, 8, generator=gen(2))}
    uncond = {"label": torch.zeros(B, dtype=torch.long), "ctx": torch.zeros(B, 5, 8)}
    return x, t, cond, uncond


def test_scale_one_is_conditional_and_zero_unconditional():
    x, t, cond, uncond = _inputs()
    den = Recorder()
    for s, ref in [(1.0, den(x, t, cond)), (0.0, den(x, t, uncond))]:
        out = CFG(den, s, uncond)(x, t, cond)
        assert torch.equal(out.eps, ref.eps) and torch.equal(out.x0, ref.x0)


def test_guided_prediction_is_the_formula_in_one_batch():
    x, t, cond, uncond = _inputs()
    den = Recorder()
    c, u = den(x, t, cond), den(x, t, uncond)
    den.batches.clear()
    out = CFG(den, 7.5, uncond)(x, t, cond)
    assert den.batches == [6]  # cond and uncond in one batch of 2B
    torch.testing.assert_close(out.eps, u.eps + 7.5 * (c.eps - u.eps))
    torch.testing.assert_close(out.x0, u.x0 + 7.5 * (c.x0 - u.x0))
    # x0 stays consistent with eps: x_t = a x0 + b eps is linear in both
    torch.testing.assert_close(out.x0, x - out.eps)


def test_negative_condition_and_broadcast():
    x, t, cond, _ = _inputs()
    den = Recorder()
    negative = {"label": torch.tensor([5]), "ctx": torch.ones(1, 5, 8)}
    out = CFG(den, 3.0, negative)(x, t, cond)
    u = den(x, t, {k: v.expand(3, *v.shape[1:]) for k, v in negative.items()})
    c = den(x, t, cond)
    torch.testing.assert_close(out.eps, u.eps + 3.0 * (c.eps - u.eps))


def test_mismatched_conditions():
    x, t, cond, uncond = _inputs()
    with pytest.raises(ValueError, match="condition 'ctx'.*\\(3, 5, 8\\).*\\(3, 6, 8\\)"):
        CFG(Recorder(), 2.0, {**uncond, "ctx": torch.zeros(3, 6, 8)})(x, t, cond)
    with pytest.raises(ValueError, match="same keys"):
        CFG(Recorder(), 2.0, {"label": uncond["label"]})(x, t, cond)
    with pytest.raises(ValueError, match="batch 3"):
        CFG(Recorder(), 2.0, {k: v[:2] for k, v in uncond.items()})(x, t, cond)


@pytest.mark.parametrize("scale", [1.0, 0.0])
def test_cfg_extremes_sample_the_conditional_and_unconditional_distributions(scale):
    """Class-conditional Gaussian oracle: cond is the exact denoiser of class 1, uncond that of the mixture."""
    schedule = VPSchedule.named("scaled_linear")
    means = torch.tensor([[-2.0, 0.0], [2.0, 1.0]], dtype=torch.float64)
    covs = torch.stack([torch.eye(2, dtype=torch.float64) * 0.3, torch.eye(2, dtype=torch.float64) * 0.6])
    target = GaussianMixture(means[1:], covs[1:]) if scale == 1 else GaussianMixture(means, covs)
    class1, mixture = GaussianMixture(means[1:], covs[1:]).denoiser(schedule), GaussianMixture(means, covs).denoiser(schedule)

    def den(x, t, cond):
        return mixture(x, t) if (cond["label"] == -1).all() else class1(x, t)

    ts = schedule.timesteps(50)
    a, b = (c.item() for c in schedule.alpha_sigma(ts[0]))
    x = target.sample(20_000, gen(3), a, b).float()  # the exact marginal at ts[0]
    label = torch.ones(20_000, dtype=torch.long)
    y = dpmpp_2m(CFG(den, scale, {"label": -torch.ones_like(label)}), x, ts, schedule, {"label": label}).double()
    torch.testing.assert_close(y.mean(0), target.mean, atol=0.05, rtol=0)
    torch.testing.assert_close(torch.cov(y.T), target.cov, atol=0.05, rtol=0.02)
