import pytest
import torch

from diffusekit.denoisers import NetworkDenoiser
from diffusekit.parametrization import PREDICTION_TYPES, to_prediction, training_target
from diffusekit.schedules import FlowSchedule, VPSchedule


def _coeffs(schedule, t, x):
    return (c.reshape(-1, *[1] * (x.ndim - 1)) for c in schedule.alpha_sigma(t))


@pytest.mark.parametrize("schedule", [VPSchedule.named("scaled_linear"), FlowSchedule()], ids=["vp", "flow"])
@pytest.mark.parametrize("kind", PREDICTION_TYPES)
def test_target_round_trips_to_eps_and_x0(schedule, kind):
    x0, eps = torch.randn(2, 6, 3, 4, 4, dtype=torch.float64)
    t = torch.tensor([0.0, 1.7, 250.0, 600.5, 998.0, 999.0]) * (schedule.t_max / 999)
    a, b = _coeffs(schedule, t, x0)
    x_t = a * x0 + b * eps
    p = to_prediction(training_target(kind, x0, eps, a, b), x_t, a, b, kind)
    # where a coefficient vanishes the other component is all that is defined
    ok_eps = (b > 1e-9).flatten() if kind == "x0" else torch.ones(6, dtype=bool)
    ok_x0 = (a > 1e-9).flatten() if kind == "eps" else torch.ones(6, dtype=bool)
    torch.testing.assert_close(p.eps[ok_eps], eps[ok_eps], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(p.x0[ok_x0], x0[ok_x0], rtol=1e-9, atol=1e-9)


def test_v_target_is_the_definition():
    x0, eps = torch.randn(2, 3, 5, dtype=torch.float64)
    a, b = torch.tensor(0.6, dtype=torch.float64), torch.tensor(0.8, dtype=torch.float64)
    torch.testing.assert_close(training_target("v", x0, eps, a, b), a * eps - b * x0)
    torch.testing.assert_close(training_target("flow", x0, eps, a, b), eps - x0)


@pytest.mark.parametrize(
    "schedule,scale,kind", [(VPSchedule.named("linear"), 1.0, "v"), (FlowSchedule(), 1000.0, "flow")], ids=["vp", "flow"]
)
def test_network_denoiser_scales_time_and_converts(schedule, scale, kind):
    x0, eps = torch.randn(2, 2, 3, 4, 4)
    t = torch.tensor([0.25, 0.75], dtype=torch.float64) * schedule.t_max
    a, b = (c.float() for c in _coeffs(schedule, t, x0))
    x_t = a * x0 + b * eps
    seen = {}

    def net(x, timestep, label):
        seen["t"], seen["label"] = timestep, label
        return training_target(kind, x0, eps, a, b)

    p = NetworkDenoiser(net, schedule, kind, timestep_scale=scale)(x_t, t, {"label": torch.tensor([3, 4])})
    torch.testing.assert_close(seen["t"], (t * scale).float())
    assert seen["label"].tolist() == [3, 4]
    torch.testing.assert_close(p.eps, eps, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(p.x0, x0, atol=1e-5, rtol=1e-5)


def test_bad_prediction_type():
    with pytest.raises(ValueError, match="unknown prediction type 'epsilon'"):
        NetworkDenoiser(torch.nn.Identity(), FlowSchedule(), "epsilon")
    with pytest.raises(ValueError, match="unknown prediction type"):
        training_target("sample", *torch.randn(2, 3), 1.0, 0.0)


def test_network_output_shape_is_checked():
    den = NetworkDenoiser(lambda x, t: x[:, :1], VPSchedule.named("linear"))
    with pytest.raises(ValueError, match="network output shape"):
        den(torch.randn(2, 3, 4, 4), torch.tensor([5.0, 5.0], dtype=torch.float64))
