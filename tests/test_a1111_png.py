"""A1111's infotext: every PNG carries it in the 'parameters' chunk (beside our JSON), in the format PNG Info in
AUTOMATIC1111, civitai and image browsers read; --from-png reads it back from A1111's PNGs, mapping its sampler
names and refusing what cannot be reproduced."""

import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from diffusekit.cli import main
from diffusekit.images import png_text, read_parameters
from diffusekit.outputs import A1111_SAMPLERS, a1111_fields, read_request, version
from diffusekit.samplers import SAMPLERS

from .test_outputs import SAMPLE, fails, pixels

A1111_NEW = ("a cat, (masterpiece:1.2)\nNegative prompt: blurry, lowres\nSteps: 25, Sampler: DPM++ 2M, "
             "Schedule type: Karras, CFG scale: 7, Seed: 1234, Size: 512x768, Model hash: 6ce0161689, "
             "Model: v1-5-pruned-emaonly, Lora hashes: \"a: 1234, b: 5678\", Version: v1.10.1")


def a1111_png(path, text: str):
    info = PngInfo()
    info.add_text("parameters", text)
    Image.new("RGB", (8, 8)).save(path, pnginfo=info)
    return path


def test_every_png_carries_a1111_infotext(tmp_path):
    out = tmp_path / "grid.png"
    main(SAMPLE + ["--seed", "7", "--cfg", "2", "--spacing", "karras", "--upsample-guidance", "auto", "--height",
                   "56", "--width", "56", "--out", str(out)])
    image = png_text(tmp_path / "grid" / "001.png")["parameters"]
    assert image == (f"Steps: 2, Sampler: DDIM, Schedule type: Karras, CFG scale: 2.0, Seed: 7, Size: 56x56, "
                     f"Model: mnist_unet, Class: 5, Upsample Guidance: auto, UG eta: 1.0, "
                     f"Version: diffusekit {version()}")
    assert read_parameters(out)["labels"] == [3, 5]  # our JSON stays beside it
    fields, model = a1111_fields(image, "001.png")
    assert model == "mnist_unet" and fields == {
        "prompt": None, "negative": None, "sampler": "ddim", "spacing": "karras", "steps": 2, "cfg": 2.0,
        "seed": 7, "width": 56, "height": 56, "upsample_guidance": "auto", "ug_eta": 1.0, "labels": [5]}


def test_reads_a1111_pngs(tmp_path):
    fields = read_request(a1111_png(tmp_path / "new.png", A1111_NEW))
    assert fields == {"prompt": ["a cat, (masterpiece:1.2)"], "negative": ["blurry, lowres"], "sampler": "dpmpp_2m",
                      "spacing": "karras", "steps": 25, "cfg": 7.0, "seed": 1234, "width": 512, "height": 768,
                      "task": "sample"}
    old = A1111_NEW.replace("Sampler: DPM++ 2M, Schedule type: Karras", "Sampler: Euler a")
    assert read_request(a1111_png(tmp_path / "old.png", old))["sampler"] == "euler_ancestral"
    karras = A1111_NEW.replace("Sampler: DPM++ 2M, Schedule type: Karras", "Sampler: DPM++ 2M Karras")
    assert read_request(a1111_png(tmp_path / "k.png", karras))["spacing"] == "karras"
    only_prompt = read_request(a1111_png(tmp_path / "p.png", "a lighthouse at dusk"))
    assert only_prompt == {"prompt": ["a lighthouse at dusk"], "negative": None, "sampler": "dpmpp_2m",
                           "spacing": None, "task": "sample"}
    assert set(A1111_SAMPLERS) == set(SAMPLERS)  # every sampler of ours has its A1111 name


@pytest.mark.parametrize("change, message", [
    (("Version: v1.10.1", "Hires upscale: 2, Hires upscaler: Latent, Version: v1.10.1"), "Hires upscale"),
    (("Version: v1.10.1", "Denoising strength: 0.5, Version: v1.10.1"), "Denoising strength"),
    (("Version: v1.10.1", "Clip skip: 2, Version: v1.10.1"), "Clip skip"),
    (("a cat,", "a cat <lora:detail:0.8>,"), "--lora"),
    (("Sampler: DPM++ 2M,", "Sampler: Restart,"), "sampler 'Restart'"),
    (("Schedule type: Karras", "Schedule type: SGM Uniform"), "schedule type 'SGM Uniform'"),
])
def test_refuses_what_it_cannot_reproduce(tmp_path, change, message):
    with pytest.raises(ValueError, match=message):
        read_request(a1111_png(tmp_path / "x.png", A1111_NEW.replace(*change)))


def test_from_png_of_a1111(tmp_path, capsys):
    """An A1111 PNG names its model without a file: --model is required; with it the run takes the PNG's
    parameters (our Class key here, as our own PNGs write it for class-conditional models)."""
    png = a1111_png(tmp_path / "a.png", "Steps: 2, Sampler: DDIM, CFG scale: 2, Seed: 7, Size: 28x28, Class: 3, "
                                        "Model: mnist_unet")
    assert "pass --model" in fails(["sample", "--from-png", str(png)], capsys)
    main(["sample", "--from-png", str(png), "--model", "mnist", "--n", "1", "--out", str(tmp_path / "b.png")])
    main(SAMPLE[:1] + ["--model", "mnist", "--sampler", "ddim", "--steps", "2", "--cfg", "2", "--seed", "7",
                       "--n", "1", "--labels", "3", "--out", str(tmp_path / "c.png")])
    assert (pixels(tmp_path / "b" / "000.png") == pixels(tmp_path / "c" / "000.png")).all()


def test_model_hash_of_single_files_cached(tmp_path, monkeypatch):
    """A single-file checkpoint's 'Model hash' is A1111's (the SHA-256's first 10 hex digits), kept in the cache
    by path, size and time, recomputed when the file changes; a folder has none."""
    import hashlib
    import json
    import os

    from diffusekit import outputs
    from diffusekit.outputs import cache_dir, model_hash

    file = tmp_path / "model.safetensors"
    file.write_bytes(b"weights" * 1000)
    assert model_hash(file) == hashlib.sha256(file.read_bytes()).hexdigest()[:10]
    cache = cache_dir() / "hashes.json"
    entries = json.loads(cache.read_text())
    entries[str(file.resolve())]["sha256"] = "0123456789" + "0" * 54
    cache.write_text(json.dumps(entries))
    monkeypatch.setattr(outputs, "_HASHES", {})  # (a new process: the hashes it remembers itself are gone)
    assert model_hash(file) == "0123456789"  # read from the cache, not the file
    file.write_bytes(b"other weights")
    os.utime(file, ns=(1, 1))
    assert model_hash(file) == hashlib.sha256(b"other weights").hexdigest()[:10]
    assert model_hash(tmp_path) is None
    from safetensors.torch import save_file
    import torch

    from diffusekit.outputs import file_hash

    save_file({"w": torch.arange(6.0)}, tmp_path / "lora.safetensors")  # kohya's LoRA hash: the bytes after the header
    raw = (tmp_path / "lora.safetensors").read_bytes()
    assert file_hash(tmp_path / "lora.safetensors", body=True) == hashlib.sha256(
        raw[8 + int.from_bytes(raw[:8], "little"):]).hexdigest() != file_hash(tmp_path / "lora.safetensors")
