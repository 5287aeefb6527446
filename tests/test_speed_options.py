"""The speed switches of `diffusekit.acceleration.accelerate` compute what the default float32 pipeline computes:
channels_last and torch.compile to float32 rounding, bf16 close to it and drawing the requested digits."""

import re
import shutil
from pathlib import Path

import pytest
import torch

from diffusekit.acceleration import accelerate, native_dtype
from diffusekit.bundled import MODELS
from diffusekit.evaluation import class_accuracy, load_mnist_classifier
from diffusekit.pipelines import generate, load_pipeline

LABELS = torch.arange(10).repeat(2)


def sample(pipe) -> torch.Tensor:
    return generate(pipe, len(LABELS), labels=LABELS, sampler="dpmpp_2m", steps=10, cfg=3.0,
                    generator=torch.Generator().manual_seed(0))


def eps(pipe, x, t) -> torch.Tensor:
    with torch.no_grad():
        return pipe.net(x.to(next(pipe.net.parameters()).dtype), t, class_labels=LABELS).float()


def test_channels_last_is_the_float32_function():
    x, t = torch.randn(len(LABELS), 1, 28, 28), torch.linspace(0, 999, len(LABELS))
    pipe = load_pipeline(MODELS["mnist"])
    ref, ref_images = eps(pipe, x, t), sample(pipe)
    accelerate(pipe, channels_last=True)
    assert torch.allclose(eps(pipe, x, t), ref, atol=1e-5)
    assert torch.allclose(sample(pipe), ref_images, atol=1e-3)  # 10 CFG-3 steps grow float32 rounding to ~1e-4


def test_bf16_is_close_to_float32_and_keeps_the_class_accuracy():
    x, t = torch.randn(len(LABELS), 1, 28, 28), torch.linspace(0, 999, len(LABELS))
    pipe = load_pipeline(MODELS["mnist"])
    ref, ref_images = eps(pipe, x, t), sample(pipe)
    accelerate(pipe, dtype=torch.bfloat16)
    assert next(pipe.net.parameters()).dtype == torch.bfloat16
    rel = (eps(pipe, x, t) - ref).norm() / ref.norm()
    assert rel < 0.02  # bf16 keeps 8 mantissa bits: ~0.4% per rounding
    images = sample(pipe)
    assert images.dtype == torch.float32 and (images - ref_images).abs().mean() < 0.02
    clf = load_mnist_classifier()
    assert class_accuracy(clf, images, LABELS) >= class_accuracy(clf, ref_images, LABELS) - 0.05


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None, reason="inductor needs a C++ compiler")
def test_compile_is_the_float32_function():
    x, t = torch.randn(len(LABELS), 1, 28, 28), torch.linspace(0, 999, len(LABELS))
    pipe = load_pipeline(MODELS["mnist"])
    ref = eps(pipe, x, t)
    accelerate(pipe, compile=True)
    assert torch.allclose(eps(pipe, x, t), ref, atol=1e-4)


@pytest.mark.skipif(not Path("/proc/cpuinfo").is_file(), reason="reads the Linux CPU flags")
def test_native_dtype_follows_the_cpu_flags():
    flags = set(re.search(r"^flags\s*:(.*)$", Path("/proc/cpuinfo").read_text(), re.M).group(1).split())
    assert native_dtype("cpu") == (torch.bfloat16 if flags & {"avx512_bf16", "amx_bf16"} else None)
    assert native_dtype("meta") is None


def test_prepacked_convolutions_are_the_float32_function_and_follow_weight_changes():
    import copy
    import pickle

    from diffusekit.acceleration import PackedConv2d, prepack
    x, t = torch.randn(len(LABELS), 1, 28, 28), torch.linspace(0, 999, len(LABELS))
    pipe = load_pipeline(MODELS["mnist"])
    ref = eps(pipe, x, t)
    keys = list(pipe.net.state_dict())
    accelerate(pipe, packed=True)
    convs = [m for m in pipe.net.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(type(m) is PackedConv2d for m in convs)
    assert list(pipe.net.state_dict()) == keys
    assert torch.allclose(eps(pipe, x, t), ref, atol=1e-5)
    assert all(hasattr(m, "_packed") for m in convs)  # the packed path ran
    with torch.no_grad():  # a weight changed in place (as a merged LoRA does) is packed again
        convs[0].weight.mul_(2)
        changed = eps(pipe, x, t)
        convs[0].weight.div_(2)
    assert not torch.allclose(changed, ref, atol=1e-3)
    assert torch.allclose(eps(pipe, x, t), ref, atol=1e-5)
    for twin in (copy.deepcopy(pipe.net), pickle.loads(pickle.dumps(pipe.net))):  # the opaque copy is left out
        with torch.no_grad():
            assert torch.allclose(twin(x, t, class_labels=LABELS), ref, atol=1e-5)
    conv = prepack(torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1)))[0]
    y = torch.randn(2, 3, 9, 9, requires_grad=True)
    conv(y).square().sum().backward()  # autograd takes nn.Conv2d's path and gets gradients
    assert conv.weight.grad is not None and y.grad is not None and not hasattr(conv, "_packed")


def test_the_blocked_layout_is_chosen_for_wide_networks_on_amx_in_bf16(monkeypatch):
    from diffusekit.acceleration import blocked_layout
    narrow = load_pipeline(MODELS["mnist"]).net
    wide = torch.nn.Sequential(torch.nn.Conv2d(4, 320, 3), torch.nn.Conv2d(320, 640, 3), torch.nn.Conv2d(640, 4, 3))
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    assert blocked_layout(wide, "cpu", torch.bfloat16)
    assert not blocked_layout(narrow, "cpu", torch.bfloat16)  # 40 / 80 channels: measured slower
    assert not blocked_layout(wide, "cpu", None) and not blocked_layout(wide, "cuda", torch.bfloat16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert not blocked_layout(wide, "cpu", torch.bfloat16)
