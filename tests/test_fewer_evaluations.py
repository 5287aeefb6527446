"""Fewer network evaluations (docs/fewer_evaluations.md): DeepCache's reuse of a UNet's deep features and CFG over
the first part of the schedule only. Both are opt-in approximations, so the tests pin what each computes against
the plain path: off (the default) is the plain path bit for bit, and on, each call is the plain computation with
exactly the named part skipped."""

import math

import pytest
import torch

from diffusekit.denoisers import DiffusionSettings
from diffusekit.guidance import CFG
from diffusekit.models.dit import DiT, DiTConfig
from diffusekit.models.unet import DeepCache, UNet, UNetConfig
from diffusekit.pipelines import Pipeline, generate
from diffusekit.pipelines.generate import cfg_stop

from .conftest import gen
from .test_guidance import Recorder, _inputs

CONFIG = UNetConfig(in_channels=2, out_channels=2, channels=8, channel_mult=(1, 2), num_res_blocks=1,
                    attention_levels=(1,), context_dim=6, num_heads=2, norm_groups=4, num_classes=3, null_class=True)


def unet() -> UNet:
    torch.manual_seed(0)
    return UNet(CONFIG).eval()


def inputs(seed: int, B: int = 2):
    x = torch.randn(B, 2, 8, 8, generator=gen(seed))
    return x, torch.full((B,), 300.0 + seed), dict(context=torch.randn(B, 5, 6, generator=gen(seed + 1)),
                                                  class_labels=torch.arange(B) % 3)


def deep_calls(monkeypatch, net: UNet) -> list[tuple[int, ...]]:
    """Record the input shape of every computation of the deep blocks."""
    calls, deep = [], net.deep
    monkeypatch.setattr(net, "deep", lambda h, *a: calls.append(tuple(h.shape)) or deep(h, *a))
    return calls


@torch.no_grad()
@pytest.mark.parametrize("depth", [0, 1, 3])
def test_interval_one_and_every_recomputing_call_are_the_plain_unet_bit_for_bit(depth):
    net = unet()
    x, t, cond = inputs(0)
    plain = net(x, t, **cond)
    assert torch.equal(DeepCache(net, 1, depth)(x, t, **cond), plain)
    cached = DeepCache(net, 3, depth)
    assert torch.equal(cached(x, t, **cond), plain)  # the first call computes everything
    assert torch.equal(cached(x, t, **cond), plain)  # a reusing call on the same input: the same features


@torch.no_grad()
@pytest.mark.parametrize("depth", [0, 2])
def test_a_reusing_call_runs_the_shallow_blocks_on_the_new_input_around_the_old_deep_features(depth):
    net = unet()
    (x1, t1, c1), (x2, t2, c2) = inputs(1), inputs(2)
    cached = DeepCache(net, 2, depth)
    cached(x1, t1, **c1)
    out = cached(x2, t2, **c2)
    # by hand: the shallow path of x2 (its own time embedding and context), the deep features of x1
    emb1, emb2 = (net.embed(x, t, c["class_labels"], None, None) for x, t, c in ((x1, t1, c1), (x2, t2, c2)))
    h1, h2 = net.conv_in(x1), net.conv_in(x2)
    hs = [h2]
    for block in net.input_blocks[:depth]:
        h1, h2 = block(h1, emb1, c1["context"]), block(h2, emb2, c2["context"])
        hs.append(h2)
    h = net.deep(h1, emb1, c1["context"], depth)
    for block in net.output_blocks[len(net.output_blocks) - depth - 1:]:
        h = block(torch.cat([h, hs.pop()], dim=1), emb2, c2["context"])
    expected = net.conv_out(torch.nn.functional.silu(net.norm_out(h)))
    assert torch.allclose(out, expected, atol=1e-6)
    assert not torch.allclose(out, net(x2, t2, **c2), atol=1e-3)  # it did reuse: the plain output differs


@torch.no_grad()
def test_features_are_recomputed_every_interval_calls_per_input_shape(monkeypatch):
    net = unet()
    calls = deep_calls(monkeypatch, net)
    cached = DeepCache(net, 3)
    small, large = inputs(0, B=1), inputs(0, B=2)
    for i in range(7):
        cached(*small[:2], **small[2])
        cached(*large[:2], **large[2])
    assert [s[0] for s in calls] == [1, 2] * 3  # calls 0, 3 and 6 of each shape
    cached.reset()
    cached(*small[:2], **small[2])
    assert len(calls) == 7


def test_deep_cache_refuses_what_it_cannot_cache():
    with pytest.raises(ValueError, match="needs a UNet; this model's network is a DiT"):
        DeepCache(DiT(DiTConfig(input_size=8, patch_size=2, in_channels=2, hidden_size=16, depth=1, num_heads=2)), 2)
    with pytest.raises(ValueError, match=r"0 <= depth <= 3 .* got interval 2, depth 4"):
        DeepCache(unet(), 2, depth=4)
    with pytest.raises(ValueError, match="interval >= 1"):
        DeepCache(unet(), 0)


def test_cfg_stops_below_t_stop_and_runs_the_conditional_denoiser_at_half_the_batch():
    rec = Recorder()
    x, t, cond, uncond = _inputs()
    guided = CFG(rec, 3.0, uncond, t_stop=400.0)
    assert torch.equal(guided(x, t, cond).eps, CFG(rec, 3.0, uncond)(x, t, cond).eps)  # t = 500 > 400: guided
    rec.batches.clear()
    low = t - 200
    assert torch.equal(guided(x, low, cond).eps, rec(x, low, cond).eps)
    assert rec.batches == [3, 3]
    mixed = torch.tensor([500.0, 300.0, 450.0], dtype=torch.float64)
    p = guided(x, mixed, cond)
    for i, on in enumerate([True, False, True]):
        one = {k: v[i:i + 1] for k, v in cond.items()}
        ref = (CFG(rec, 3.0, {k: v[i:i + 1] for k, v in uncond.items()}) if on else rec)(x[i:i + 1], mixed[i:i + 1], one)
        assert torch.allclose(p.eps[i:i + 1], ref.eps, atol=1e-6) and torch.allclose(p.x0[i:i + 1], ref.x0, atol=1e-6)


def test_cfg_stop_is_the_time_of_the_first_unguided_step():
    ts = torch.linspace(999, 0, 21, dtype=torch.float64)
    assert cfg_stop(ts, 1.0) == -math.inf
    assert cfg_stop(ts, 0.5) == ts[10].item()  # steps 0-9 (t > ts[10]) guided, 10-19 not
    assert cfg_stop(ts, 0.01) == ts[0].item()  # no step guided


@pytest.fixture
def pipe():
    torch.manual_seed(0)
    return Pipeline(UNet(UNetConfig(in_channels=2, out_channels=2, channels=8, channel_mult=(1, 2), num_res_blocks=1,
                                    attention_levels=(), context_dim=0, norm_groups=4, num_classes=3,
                                    null_class=True)).eval(), DiffusionSettings(), (8, 8), 2, 3)


def net_calls(monkeypatch, net) -> list[tuple[int, float]]:
    """Record (batch, time) of every network call."""
    seen, forward = [], net.forward
    monkeypatch.setattr(net, "forward", lambda x, t, **k: seen.append((len(x), float(t[0]))) or forward(x, t, **k))
    return seen


@pytest.mark.parametrize("sampler", ["dpmpp_2m", "heun"])
def test_generate_defaults_are_the_plain_path_and_the_options_skip_what_they_name(pipe, monkeypatch, sampler):
    labels = torch.tensor([0, 1, 2])
    run = lambda **kw: generate(pipe, 3, labels=labels, steps=6, cfg=3.0, sampler=sampler, generator=gen(0),
                           output="latent", **kw)
    plain = run()
    assert torch.equal(run(cfg_until=1.0, cache=1), plain)
    seen = net_calls(monkeypatch, pipe.net)
    run()
    evaluations = len(seen)
    assert {b for b, _ in seen} == {6}
    seen.clear()
    half = run(cfg_until=0.5)
    t_stop = cfg_stop(pipe.settings.grid(pipe.schedule, 6), 0.5)
    assert len(seen) == evaluations and [b for b, _ in seen] == [6 if t > t_stop else 3 for _, t in seen]
    assert 0 < sum(b == 6 for b, _ in seen) < evaluations and not torch.equal(half, plain)
    calls = deep_calls(monkeypatch, pipe.net)
    cached = run(cache=4)
    assert len(calls) == math.ceil(evaluations / 4) and not torch.equal(cached, plain)
