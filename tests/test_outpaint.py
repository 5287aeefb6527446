"""Outpainting and the soft seam: the canvas and mask it builds, the mask blur's weights, and outpaint /
inpaint with a blur through generate (pixel and latent models) and the command line, where the image beyond
the seam stays exact."""

import numpy as np
import pytest
import torch

from diffusekit.cli import main
from diffusekit.images import read_parameters
from diffusekit.pipelines import generate
from diffusekit.pipelines.inputs import outpaint_canvas, soft_mask
from diffusekit.requests import parse_outpaint

from .conftest import gen
from .test_outputs import digit_files, fails, pixels  # noqa: F401  (the fixture)
from .test_tasks import digits, mnist, tiny_latent_pipe  # noqa: F401  (fixtures)


def test_canvas_and_mask():
    image = torch.arange(6.0).reshape(1, 1, 2, 3)
    canvas, mask = outpaint_canvas(image, left=2, top=1)
    assert canvas.shape == mask.shape == (1, 1, 3, 5)
    assert torch.equal(canvas[..., 1:, 2:], image) and torch.equal(canvas[0, 0, 0], torch.tensor([0., 0, 0, 1, 2]))
    assert torch.equal(mask[..., 1:, 2:], torch.zeros(1, 1, 2, 3)) and mask.sum() == 15 - 6
    with pytest.raises(ValueError, match="at least one side"):
        outpaint_canvas(image)


def test_soft_mask_weights():
    mask = torch.zeros(1, 1, 1, 30)
    mask[..., :10] = 1  # generate the first 10 pixels of a row
    grown, paste = soft_mask(mask, 3)
    assert grown[0, 0, 0, :13].eq(1).all() and grown[0, 0, 0, 13:].eq(0).all()  # 3 more pixels regenerated
    row = paste[0, 0, 0]
    assert row[:10].eq(1).all() and row[16:].eq(0).all()  # pasted whole on the mask, not at all 2 x 3 beyond it
    assert (row[9:17].diff() <= 0).all() and 0 < row[12] < 1  # a ramp between
    assert soft_mask(mask, 0) == (mask, mask)


@pytest.mark.parametrize("spec, parsed", [("left=8", {"left": 8}), ("left=8, right=4,top=2", {"left": 8, "right": 4,
                                                                                              "top": 2})])
def test_parse_outpaint(spec, parsed):
    assert parse_outpaint(spec) == parsed


@pytest.mark.parametrize("spec", ["left=-1", "middle=3", "left=0", "left=8,left=4", "left", "left=1.5"])
def test_bad_outpaint_specs(spec):
    with pytest.raises(ValueError, match="outpaint"):
        parse_outpaint(spec)


@torch.no_grad()
def test_outpaint_keeps_the_image_beyond_the_seam(mnist, digits):  # noqa: F811
    canvas, mask = outpaint_canvas(digits[:2], left=8, bottom=4)
    out = generate(mnist, 2, labels=torch.tensor([3, 5]), image=canvas, mask=mask, mask_blur=2, steps=4,
                   height=32, width=36, generator=gen(0))
    assert out.shape == (2, 1, 32, 36)
    inner = (slice(None), slice(None), slice(None, 28 - 4), slice(8 + 4, None))  # 2 x blur inside the original
    assert torch.equal(out[inner], canvas[inner]) and not torch.equal(out[..., :8], canvas[..., :8])
    band = out[..., :28, 8:12] - canvas[..., :28, 8:12]
    assert band.abs().max() > 0  # the seam is regenerated and blended, not cut
    hard = generate(mnist, 2, labels=torch.tensor([3, 5]), image=canvas, mask=mask, steps=4, height=32, width=36,
                    generator=gen(0))
    assert torch.equal(hard[..., :28, 8:], canvas[..., :28, 8:])  # no blur: every kept pixel exact


@torch.no_grad()
def test_latent_outpaint_with_a_soft_seam():
    pipe = tiny_latent_pipe()
    image = torch.rand(1, 1, 16, 16, generator=gen(3)) * 2 - 1
    canvas, mask = outpaint_canvas(image, right=8)
    out = generate(pipe, 1, labels=torch.tensor([1]), image=canvas, mask=mask, mask_blur=2, steps=3,
                   width=24, generator=gen(0))
    assert out.shape == (1, 1, 16, 24)
    assert torch.equal(out[..., :12], canvas[..., :12])  # pasted exactly beyond the seam, even through the VAE
    assert not torch.equal(out[..., 16:], canvas[..., 16:])


def test_outpaint_from_the_command_line(digit_files, capsys):  # noqa: F811
    d = digit_files
    task = ["--labels", "3", "--n", "1", "--steps", "3"]
    main(["outpaint", "--image", str(d / "digit.png"), "--outpaint", "left=8,right=4", "--mask-blur", "1",
          "--out", str(d / "out.png"), *task])
    out, src = pixels(d / "out" / "000.png"), pixels(d / "digit.png")
    assert out.shape == (28, 40) and np.array_equal(out[:, 10:34], src[:, 2:26])
    saved = read_parameters(d / "out.png")
    assert saved["outpaint"] == "left=8,right=4" and saved["mask_blur"] == 1
    main(["sample", "--from-png", str(d / "out.png"), "--out", str(d / "again.png")])
    assert np.array_equal(pixels(d / "again" / "000.png"), out)
    assert "SIDE=PIXELS" in fails(["outpaint", "--image", str(d / "digit.png"), "--outpaint", "up=8", *task], capsys)
    assert "--mask-blur: must be >= 0" in fails(["outpaint", "--image", str(d / "digit.png"), "--outpaint", "left=8",
                                              "--mask-blur", "-1", *task], capsys)
