"""The speed switches of `diffusekit.acceleration.accelerate` compute what the default float32 pipeline computes:
channels_last and torch.compile to float32 rounding, bf16 close to it and drawing the requested digits."""

import copy
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from diffusekit.acceleration import accelerate, native_dtype, to_channels_last
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


def test_to_channels_last_reorders_each_tensor_within_its_storage():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.GroupNorm(2, 8), torch.nn.Conv2d(8, 4, 3))
    net[2].weight.data = torch.randn(4, 8, 3, 3).transpose(2, 3)  # a strided view: copied instead
    net.register_buffer("window", torch.randn(1, 2, 3, 4))
    reference = copy.deepcopy(net).to(memory_format=torch.channels_last)
    storage = net[0].weight.data_ptr(), net.window.data_ptr()
    assert to_channels_last(net) is net
    for (name, mine), theirs in zip(net.state_dict().items(), reference.state_dict().values()):
        assert torch.equal(mine, theirs) and mine.stride() == theirs.stride(), name
    assert (net[0].weight.data_ptr(), net.window.data_ptr()) == storage
    x = torch.randn(2, 3, 9, 9)
    assert torch.equal(net(x), reference(x))


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
    with torch.inference_mode():  # weights copied here have no version counter: nn.Conv2d's path, same function
        twin = copy.deepcopy(pipe.net)
        assert torch.allclose(twin(x, t, class_labels=LABELS), ref, atol=1e-5)


def test_the_blocked_layout_is_chosen_for_wide_networks_on_amx(monkeypatch):
    from diffusekit.acceleration import blocked_layout
    narrow = load_pipeline(MODELS["mnist"]).net
    wide = torch.nn.Sequential(torch.nn.Conv2d(4, 320, 3), torch.nn.Conv2d(320, 640, 3), torch.nn.Conv2d(640, 4, 3))
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    assert blocked_layout(wide, "cpu") and blocked_layout(wide.bfloat16(), "cpu")
    assert not blocked_layout(narrow.bfloat16(), "cpu")  # 40 / 80 channels: measured slower
    assert not blocked_layout(wide, "cuda") and not blocked_layout(wide.half(), "cpu")
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert not blocked_layout(wide.float(), "cpu")


def test_accelerate_converts_the_autoencoder_too_and_decodes_to_float32(monkeypatch):
    """A latent pipeline's autoencoder takes the network's dtype and, where `blocked_layout` holds, its layout;
    decode still returns float32 images close to the float32 decode."""
    from diffusekit.acceleration import PackedConv2d
    from diffusekit.models.autoencoder import AutoencoderConfig, AutoencoderKL
    from diffusekit.pipelines import Pipeline
    torch.manual_seed(0)
    ae = AutoencoderKL(AutoencoderConfig(in_channels=3, channels=32, channel_mult=(1, 2), num_res_blocks=1,
                                         latent_channels=4)).eval()
    mnist = load_pipeline(MODELS["mnist"])
    pipe = Pipeline(mnist.net, mnist.settings, (16, 16), 3, num_classes=10, autoencoder=ae)
    z = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        ref = pipe.decode(z)
        monkeypatch.setattr("diffusekit.acceleration.BLOCKED_LAYOUT_WIDTH", 32)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
        accelerate(pipe, dtype=torch.bfloat16)
        out = pipe.decode(z)
    assert next(ae.parameters()).dtype == torch.bfloat16 and out.dtype == torch.float32
    assert any(type(m) is PackedConv2d for m in ae.modules())
    assert ae.decoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert (out - ref).abs().max() < 0.05 * ref.abs().max() and not torch.equal(out, ref)


MALLOC_PROBE = """
import ctypes, sys
import torch
from diffusekit.acceleration import keep_freed_memory

class Info(ctypes.Structure):
    _fields_ = [(f, ctypes.c_size_t) for f in "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks "
                                              "keepcost".split()]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = Info
kept = sys.argv[1] == "kept" and keep_freed_memory()
before = libc.mallinfo2().hblkhd
x = torch.ones(40 << 18)
mapped = libc.mallinfo2().hblkhd - before
del x
free = libc.mallinfo2().fordblks
y = torch.ones(100 << 18)
print(kept, mapped >> 20, free >> 20, (libc.mallinfo2().hblkhd - before) >> 20)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="a glibc malloc setting")
def test_keep_freed_memory_serves_large_tensors_from_the_heap_and_keeps_them():
    """glibc's counters: by default a 40 MiB tensor is an mmap of its own, unmapped when freed; after
    keep_freed_memory it comes from the heap and its memory stays there (free) for the next one, while a 100 MiB
    one (above HEAP_BLOCK_BYTES) is still an mmap of its own."""
    def probe(mode: str) -> tuple[str, int, int, int]:
        out = subprocess.run([sys.executable, "-c", MALLOC_PROBE, mode], capture_output=True, text=True, check=True)
        kept, mapped, free, mapped_large = out.stdout.split()
        return kept, int(mapped), int(free), int(mapped_large)

    assert probe("default")[:2] == ("False", 40)
    kept, mapped, free, mapped_large = probe("kept")
    assert (kept, mapped) == ("True", 0) and free >= 40 and mapped_large == 100
