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


def test_the_batched_path_extrapolates_to_the_early_returns():
    """out(s) = u + s (c - u) from the one-batch path at s = 2 and 3 meets the s = 0 and s = 1 shortcuts."""
    x, t, cond, uncond = _inputs()
    den = Recorder()
    out2, out3 = (CFG(den, s, uncond)(x, t, cond) for s in (2.0, 3.0))
    zero, one = CFG(den, 0.0, uncond)(x, t, cond), CFG(den, 1.0, uncond)(x, t, cond)
    for field in ("eps", "x0"):
        diff = getattr(out3, field) - getattr(out2, field)
        torch.testing.assert_close(getattr(out2, field) - 2 * diff, getattr(zero, field))
        torch.testing.assert_close(getattr(out2, field) - diff, getattr(one, field))


def test_learned_variance_survives_cfg_into_ddpm():
    """CFG keeps the conditional branch's variance interpolation, so a learned-sigma DiT samples with
    ddpm(variance='learned') under guidance."""
    from diffusekit.models import build
    from diffusekit.denoisers import NetworkDenoiser
    from diffusekit.samplers import ddpm

    net = build("dit", dict(input_size=8, patch_size=2, in_channels=2, hidden_size=32, depth=1, num_heads=2,
                            num_classes=10, learned_sigma=True)).eval()
    schedule = VPSchedule.named("linear")
    den = NetworkDenoiser(net, schedule)
    labels = torch.tensor([1, 2])
    guided = CFG(den, 4.0, {"class_labels": torch.full((2,), 10)})
    x, t = torch.randn(2, 2, 8, 8, generator=gen(0)), torch.full((2,), 500.0, dtype=torch.float64)
    with torch.no_grad():
        p, c = guided(x, t, {"class_labels": labels}), den(x, t, {"class_labels": labels})
        assert p.var_frac is not None and torch.equal(p.var_frac, c.var_frac)
        y = ddpm(guided, x, schedule.timesteps(3), schedule, {"class_labels": labels}, variance="learned",
                 generator=gen(1))
    assert y.shape == x.shape and torch.isfinite(y).all()


def test_prediction_chunk_cat_map_keep_every_field():
    p = Prediction(torch.arange(4.0), torch.arange(4.0) + 10, torch.arange(4.0) / 10)
    a, b = p.chunk(2)
    assert torch.equal(b.x0, torch.tensor([12.0, 13.0])) and torch.equal(b.var_frac, torch.tensor([0.2, 0.3]))
    assert all(torch.equal(u, v) for u, v in zip(Prediction.cat([a, b]), p))
    assert torch.equal(p.map(lambda v: 2 * v).var_frac, 2 * p.var_frac)
    assert Prediction(torch.ones(2), torch.ones(2)).chunk(2)[1].var_frac is None
