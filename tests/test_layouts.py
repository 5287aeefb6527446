"""Layout-to-image: boxes as tokens through the UNet's own layout encoder into its cross-attention, the layout
syntax and its errors, the scenes' layouts, the box metric, and a layout model from the library to the command
line and the server."""

import os
import subprocess
import sys

import pytest
import torch
from PIL import Image

from diffusekit.cli import main
from diffusekit.conditioning import layout_tensor, parse_layout
from diffusekit.data import LAYOUT_CLASSES, PLACES, ShapeCaptions, ShapeLayouts, ShapeMaps, place
from diffusekit.denoisers import DiffusionSettings
from diffusekit.evaluation import box_iou, layout_hits, segment_shapes, shape_boxes
from diffusekit.models import build
from diffusekit.models.layers import LayoutEncoder
from diffusekit.pipelines import Pipeline, generate, load_pipeline, save_pipeline

TWO = "red circle 0.1 0.1 0.4 0.4; blue square 0.5 0.5 0.9 0.9"


def layout_pipeline() -> Pipeline:
    torch.manual_seed(0)
    net = build("unet", dict(in_channels=3, out_channels=3, channels=8, channel_mult=[1, 2], num_res_blocks=1,
                             attention_levels=[1], mid_attention=True, num_heads=2, norm_groups=4, context_dim=16,
                             layout_classes=len(LAYOUT_CLASSES), layout_boxes=3, layout_depth=1))
    return Pipeline(net.eval(), DiffusionSettings(schedule="linear"), (32, 32), 3, layout_classes=LAYOUT_CLASSES)


@pytest.fixture(scope="module")
def pipe() -> Pipeline:
    return layout_pipeline()


def test_the_encoder_treats_a_layout_as_a_set_and_ignores_what_padding_holds():
    torch.manual_seed(0)
    enc = LayoutEncoder(12, 32, depth=2, heads=4).eval()
    layout = torch.tensor([[[3, .1, .1, .4, .4], [7, .5, .2, .9, .6], [-1, 0, 0, 0, 0]]])
    out = enc(layout)
    assert torch.allclose(enc(layout[:, [2, 0, 1]]), out[:, [2, 0, 1]], atol=1e-5)  # permuted boxes, permuted tokens
    padded = layout.clone()
    padded[0, 2, 1:] = torch.tensor([.3, .3, .8, .8])
    assert torch.equal(enc(padded), out)
    moved = layout.clone()
    moved[0, 0, 1:] += 0.05
    assert not torch.allclose(enc(moved), out, atol=1e-3)


def test_the_layout_reaches_the_network_and_cfg_guides_against_no_boxes(pipe):
    layout = layout_tensor(parse_layout(TWO), LAYOUT_CLASSES, 3)
    seen = []
    hook = pipe.net.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["layout"]), with_kwargs=True)
    try:
        a = generate(pipe, 2, layout=layout[None], cfg=2.0, steps=2, generator=torch.Generator().manual_seed(0))
    finally:
        hook.remove()
    both = seen[0]  # CFG: the conditional and the null layouts in one batch
    assert both.shape == (4, 3, 5) and torch.equal(both[:2], layout.expand(2, -1, -1))
    assert (both[2:, :, 0] == -1).all() and (both[2:, :, 1:] == 0).all()
    other = layout_tensor(parse_layout("green triangle 0.5 0.1 0.9 0.4"), LAYOUT_CLASSES, 3)
    b = generate(pipe, 2, layout=other[None], cfg=2.0, steps=2, generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(a, b)


@pytest.mark.parametrize("text, boxes", [
    (TWO, [("red circle", .1, .1, .4, .4), ("blue square", .5, .5, .9, .9)]),
    (" yellow triangle 0 0 1 1 ;", [("yellow triangle", 0, 0, 1, 1)]),
    ('[["red circle", 0.1, 0.1, 0.4, 0.4], {"class": "blue square", "box": [0.5, 0.5, 0.9, 0.9]}]',
     [("red circle", .1, .1, .4, .4), ("blue square", .5, .5, .9, .9)]),
])
def test_layout_syntax(text, boxes):
    assert parse_layout(text) == boxes


@pytest.mark.parametrize("text, message", [
    ("red circle 0.1 0.1 0.4", "layout box 1 .*expected a class name and 4 numbers"),
    ("red circle 0.1 0.1 0.4 0.4; blue 0.5 x 0.9 0.9", "layout box 2"),
    ('[["red circle", 0.1]]', "layout box 1"),
    ("[1, 2", "not valid JSON"),
    ("red circle -0.1 0.1 0.4 0.4", r"fractions of the image in \[0, 1\]"),
    ("red circle 0.1 0.1 1.5 0.4", r"fractions of the image in \[0, 1\]"),
    ("red circle 0.4 0.1 0.1 0.4", "x0 < x1 and y0 < y1"),
    ("purple circle 0.1 0.1 0.4 0.4", "unknown layout class 'purple circle'; this model's: red circle"),
    ("; ".join(["red circle 0.1 0.1 0.4 0.4"] * 4), "4 boxes; this model takes at most 3"),
])
def test_bad_layouts_are_refused_by_name(text, message):
    with pytest.raises(ValueError, match=message):
        layout_tensor(parse_layout(text), LAYOUT_CLASSES, 3)


def test_generate_checks_layout_tensors(pipe):
    good = layout_tensor(parse_layout(TWO), LAYOUT_CLASSES, 3)[None]
    for layout, message in [(None, "this is a layout model: pass 1 layouts"),
                            (good[..., :4], "at most 3 boxes of 5 numbers"),
                            (torch.cat([good, good], 1), "at most 3 boxes"),
                            (good.clone().index_fill_(2, torch.tensor([0]), 12), r"integers in \[0, 12\)")]:
        with pytest.raises(ValueError, match=message):
            generate(pipe, 1, layout=layout, steps=1)


def test_scene_layouts_are_the_boxes_of_their_shapes_and_the_metric_reads_them_exactly():
    data, maps = ShapeLayouts(32, 100, seed=5), ShapeMaps(32, 100, seed=5)
    images = torch.stack([data[i]["image"] for i in range(100)])
    layouts = torch.stack([data[i]["layout"] for i in range(100)])
    assert torch.equal(images, torch.stack([maps[i]["image"] for i in range(100)]))
    for found, layout in zip(shape_boxes(torch.stack([maps[i]["map"] for i in range(100)])), layouts):
        real = layout[layout[:, 0] >= 0]
        assert len(found) == len(real) and sorted(found[:, 0].tolist()) == sorted((real[:, 0] + 1).tolist())
    hits = layout_hits(segment_shapes(images), layouts)
    assert hits.box.all() and hits.colour.all() and hits.place.all() and len(hits.box) == (layouts[:, :, 0] >= 0).sum()
    shuffled = layout_hits(segment_shapes(images), layouts.roll(1, 0))
    assert shuffled.box.float().mean() < 0.1 and shuffled.place.float().mean() < 0.2


def test_scenes_are_the_same_in_every_process():
    """Held-out scenes are named by seed: a process with another string-hash seed draws the same ones."""
    code = "from diffusekit.data import ShapeCaptions; print(ShapeCaptions(32, 10, seed=3).caption(7))"
    runs = {subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONHASHSEED": seed}, check=True,
                           capture_output=True, text=True).stdout for seed in ("1", "2")}
    assert runs == {ShapeCaptions(32, 10, seed=3).caption(7) + "\n"}


def test_places_by_hand():
    assert [place(x, y) for x, y in [(0, 0), (0.5, 0.5), (0.99, 0.01), (1, 1), (0.34, 0.66), (0.2, 0.7)]] == \
        [0, 4, 2, 8, 4, 6]
    assert PLACES[2] == "at the top right" and PLACES[6] == "at the bottom left"


def test_captions_say_each_box_of_the_layout_and_the_metric_reads_them():
    """A caption names every shape in order, with its size, class and the grid cell of its box centre; the real
    scenes hit every place, another scene's places rarely."""
    data = ShapeCaptions(32, 200, seed=7)
    assert torch.equal(data[3]["image"], ShapeLayouts(32, 200, seed=7)[3]["image"])
    seen = set()
    for i in range(200):
        parts = data.caption(i).replace(" and ", ", ").split(", ")
        boxes = data.layout(i)[data.layout(i)[:, 0] >= 0].tolist()
        assert len(parts) == len(boxes) == len(data.scene(i))
        for part, (cls, x0, y0, x1, y1), (*_, r) in zip(parts, boxes, data.scene(i)):
            size, colour, shape, where = part.split(" ", 4)[1:4] + [part.split(" ", 4)[4]]
            assert f"{colour} {shape}" == LAYOUT_CLASSES[int(cls)] and size == ("small" if r < 6 else "large")
            assert where == PLACES[place((x0 + x1) / 2, (y0 + y1) / 2)]
            seen.add(where)
    assert seen == set(PLACES)
    images = torch.stack([data[i]["image"] for i in range(200)])
    layouts = torch.stack([data[i]["layout"] for i in range(200)])
    assert layout_hits(segment_shapes(images), layouts).place.all()
    assert layout_hits(segment_shapes(images), layouts.roll(1, 0)).place.float().mean() < 0.2


def test_box_iou_by_hand():
    a, b = torch.tensor([0.0, 0.0, 0.5, 0.5]), torch.tensor([0.25, 0.25, 0.75, 0.75])
    assert box_iou(a, b).item() == pytest.approx(0.0625 / (0.25 + 0.25 - 0.0625))
    assert box_iou(a, a).item() == 1 and box_iou(a, torch.tensor([0.6, 0.6, 1, 1])).item() == 0


def test_a_layout_model_round_trips_and_samples_from_the_command_line_and_the_server(pipe, tmp_path):
    folder = save_pipeline(pipe, tmp_path / "layout_model")
    assert load_pipeline(folder).layout_classes == LAYOUT_CLASSES and load_pipeline(folder).conditioning == "layout"
    out = tmp_path / "grid.png"
    main(["sample", "--model", str(folder), "--layout", TWO, "--n", "2", "--steps", "2", "--out", str(out),
          "--dtype", "fp32"])
    assert Image.open(tmp_path / "grid" / "001.png").size == (32, 32)
    again = tmp_path / "again.png"
    main(["sample", "--from-png", str(out), "--out", str(again)])
    assert Image.open(again).tobytes() == Image.open(out).tobytes()
    with pytest.raises(SystemExit, match="is a layout model: pass --layout"):
        main(["sample", "--model", str(folder), "--steps", "2", "--out", str(tmp_path / "x.png")])
    with pytest.raises(SystemExit, match="--layout needs a layout model; mnist is class-conditional"):
        main(["sample", "--layout", TWO, "--steps", "2", "--out", str(tmp_path / "y.png")])
    with pytest.raises(SystemExit, match="unknown layout class"):
        main(["sample", "--model", str(folder), "--layout", "pink star 0 0 1 1", "--out", str(tmp_path / "z.png")])

    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from diffusekit.server import create_app

    with TestClient(create_app([str(folder)], outdir=tmp_path / "serve"), base_url="http://127.0.0.1") as client:
        assert client.get("/api/models").json()["models"][0]["layout_classes"] == list(LAYOUT_CLASSES)
        r = client.post("/api/jobs", json={"layout": "pink star 0 0 1 1", "steps": 1})
        assert r.status_code == 400 and "unknown layout class" in r.json()["detail"]
        r = client.post("/api/jobs", json={"layout": TWO, "steps": 1, "n": 1})
        assert r.status_code == 202, r.text
