"""Semantic-map-to-image: the shape scenes and their maps, the segmenter that scores samples against their maps,
map files, and a map model's condition reaching its network, at the training size and beyond it."""

import base64
import io

import numpy as np
import pytest
import torch
from PIL import Image

from diffusekit.cli import main
from diffusekit.data import BACKGROUND, COLOURS, MAP_CLASSES, ShapeMaps
from diffusekit.denoisers import DiffusionSettings
from diffusekit.evaluation import colour_classes, mean_iou, segment_shapes, shape_components
from diffusekit.images import MAP_PALETTE, load_map, save_map
from diffusekit.models import build
from diffusekit.pipelines import Pipeline, generate, load_pipeline, save_pipeline
from diffusekit.pipelines.inputs import map_condition

K = len(MAP_CLASSES)


def scenes(n: int, **kw) -> tuple[torch.Tensor, torch.Tensor]:
    data = ShapeMaps(**kw)
    samples = [data[i] for i in range(n)]
    return torch.stack([s["image"] for s in samples]), torch.stack([s["map"] for s in samples])


def test_each_pixel_has_the_colour_of_its_map_class():
    images, maps = scenes(50)
    rgb = ((images + 1) * 127.5).round().permute(0, 2, 3, 1)
    colours = torch.tensor([BACKGROUND, *COLOURS.values()], dtype=torch.float32)
    assert torch.equal(rgb, colours[colour_classes(maps)])
    assert set(maps.unique().tolist()) - {0} and maps.max() < K
    assert torch.equal(ShapeMaps(seed=3)[7]["map"], ShapeMaps(seed=3)[7]["map"])
    assert not torch.equal(ShapeMaps(seed=3)[7]["map"], ShapeMaps(seed=4)[7]["map"])


def test_wider_scenes_keep_the_shape_size_and_zoomed_ones_scale_it():
    def mean_shapes_and_radius(**kw):
        d = ShapeMaps(**kw)
        shapes = [s for i in range(200) for s in d.scene(i)]
        return len(shapes) / 200, np.mean([s[4] for s in shapes])

    n1, r1 = mean_shapes_and_radius(resolution=32)
    n2, r2 = mean_shapes_and_radius(resolution=64, tiles=2)
    n3, r3 = mean_shapes_and_radius(resolution=64)
    assert n2 > 3 * n1 and abs(r2 - r1) < 0.1 * r1  # 4 canvases of shapes of the trained size
    assert abs(n3 - n1) < 0.3 * n1 and abs(r3 - 2 * r1) < 0.2 * r1  # the same scene, twice the size


@pytest.mark.parametrize("kw", [dict(resolution=32), dict(resolution=64, tiles=2), dict(resolution=64)])
def test_the_segmenter_reads_real_scenes_exactly(kw):
    images, maps = scenes(100, **kw)
    assert torch.equal(segment_shapes(images), maps)
    noisy = segment_shapes((images + 0.2 * torch.randn_like(images, generator=None)).clamp(-1, 1))
    assert mean_iou(noisy, maps, K)[0] > 0.9


def test_the_segmenter_tells_shapes_and_colours_apart():
    images, maps = scenes(100)
    recoloured = images[:, [2, 0, 1]]  # red -> green -> ... : the same shapes in other colours
    assert mean_iou(colour_classes(segment_shapes(recoloured)), colour_classes(maps), 5)[0] < 0.7
    square = torch.full((1, 3, 16, 16), 245 / 127.5 - 1)
    square[:, :, 4:12, 4:12] = torch.tensor([220, 40, 40]).view(1, 3, 1, 1) / 127.5 - 1
    assert segment_shapes(square)[0, 8, 8] == MAP_CLASSES.index("red square")
    square[:, :, 4:12, 4:12] = torch.tril(torch.ones(8, 8)).flip(1) * (square[:, :, 4:12, 4:12] - square[0, 0, 0, 0]) \
        + square[0, 0, 0, 0]  # half the box: a triangle
    assert segment_shapes(square)[0, 11, 11] == MAP_CLASSES.index("red triangle")


def test_components_do_not_wrap_around_or_join_across_colours():
    colour = torch.tensor([[[1, 0, 1], [1, 0, 2], [0, 0, 2]]])
    ids = shape_components(colour)
    assert ids[0, 0, 0] == ids[0, 1, 0] and len({ids[0, 0, 0].item(), ids[0, 0, 2].item(), ids[0, 1, 2].item()}) == 3
    assert (ids[colour == 0] == 0).all()


def test_mean_iou_by_hand():
    pred, target = torch.tensor([0, 0, 1, 1, 2]), torch.tensor([0, 1, 1, 1, 0])
    miou, iou = mean_iou(pred, target, 4)
    assert torch.allclose(iou[:3], torch.tensor([1 / 3, 2 / 3, 0.0], dtype=torch.float64)) and iou[3].isnan()
    assert miou == pytest.approx((1 / 3 + 2 / 3 + 0) / 3)


def test_map_files_round_trip_and_painted_maps_take_the_nearest_class(tmp_path):
    _, maps = scenes(1)
    assert torch.equal(load_map(save_map(maps[0], tmp_path / "map.png"), K), maps)
    painted = torch.tensor(MAP_PALETTE, dtype=torch.float32)[maps[0]] + torch.randint(-20, 20, (32, 32, 3))
    Image.fromarray(painted.clamp(0, 255).to(torch.uint8).numpy()).save(tmp_path / "painted.png")
    assert torch.equal(load_map(tmp_path / "painted.png", K), maps)
    high = maps[0].clone()
    high[0, 0] = 12
    with pytest.raises(ValueError, match="holds class 12; the model has 5 classes"):
        load_map(save_map(high, tmp_path / "high.png"), 5)
    Image.fromarray(np.full((4, 4), 12, np.uint8), mode="L").save(tmp_path / "grey.png")
    with pytest.raises(ValueError, match="holds class 12; the model has 5 classes"):
        load_map(tmp_path / "grey.png", 5)
    with pytest.raises(ValueError, match="no map file"):
        load_map(tmp_path / "missing.png", K)


def map_pipeline() -> Pipeline:
    torch.manual_seed(0)
    net = build("unet", dict(in_channels=3 + K, out_channels=3, channels=8, channel_mult=[1, 2], num_res_blocks=1,
                             attention_levels=[], mid_attention=False, norm_groups=4, context_dim=None))
    return Pipeline(net.eval(), DiffusionSettings(schedule="linear"), (32, 32), 3, map_classes=MAP_CLASSES)


@pytest.fixture(scope="module")
def pipe() -> Pipeline:
    return map_pipeline()


def test_the_one_hot_map_reaches_the_network_and_changes_the_image(pipe):
    _, maps = scenes(2)
    seen = []
    hook = pipe.net.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["concat"]), with_kwargs=True)
    try:
        a = generate(pipe, 2, semantic_map=maps, steps=2, generator=torch.Generator().manual_seed(0))
    finally:
        hook.remove()
    assert seen and all(torch.equal(c, map_condition(maps, K, (32, 32))) for c in seen)
    assert torch.equal(seen[0].argmax(1), maps) and torch.equal(seen[0].sum(1), torch.ones(2, 32, 32))
    b = generate(pipe, 2, semantic_map=maps.flip(0), steps=2, generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(a, b)


def test_a_larger_map_samples_a_larger_image_with_and_without_upsample_guidance(pipe):
    _, maps = scenes(1, resolution=64, tiles=2)
    for ug in (None, 0.5):
        out = generate(pipe, 1, semantic_map=maps, steps=2, upsample_guidance=ug)
        assert out.shape == (1, 3, 64, 64) and out.isfinite().all()
    pooled = map_condition(maps, K, (16, 16))  # a latent-sized state: the shares of each pixel's classes
    assert torch.allclose(pooled.sum(1), torch.ones(1, 16, 16))


def test_bad_maps_are_refused_by_name(pipe):
    _, maps = scenes(1)
    cases = [({}, "this is a semantic-map model: pass a map"),
             (dict(semantic_map=maps.float()), "integer tensor"),
             (dict(semantic_map=maps[:, :16], height=32), "the map is 16x32; it must be 32x32"),
             (dict(semantic_map=maps + K), "map classes must be in 0-12"),
             (dict(semantic_map=maps.expand(3, -1, -1)), "holds 3 maps; pass 1 or 2")]
    for kw, message in cases:
        with pytest.raises(ValueError, match=message):
            generate(pipe, 2, steps=1, **kw)
    other = Pipeline(build("unet", dict(in_channels=3, out_channels=3, channels=8, channel_mult=[1], num_res_blocks=1,
                                        attention_levels=[], norm_groups=4, context_dim=None)).eval(),
                     DiffusionSettings(schedule="linear"), (32, 32), 3)
    with pytest.raises(ValueError, match="not a semantic-map model"):
        generate(other, 1, semantic_map=maps, steps=1)


def test_a_map_model_folder_round_trips_and_samples_from_the_command_line(pipe, tmp_path):
    folder = save_pipeline(pipe, tmp_path / "maps_model")
    loaded = load_pipeline(folder)
    assert loaded.map_classes == MAP_CLASSES and not loaded.is_inpainting and "sample" in loaded.tasks
    _, maps = scenes(1, resolution=64, tiles=2)
    save_map(maps[0], tmp_path / "map.png")
    out = tmp_path / "grid.png"
    main(["sample", "--model", str(folder), "--map", str(tmp_path / "map.png"), "--n", "2", "--steps", "2",
          "--out", str(out), "--dtype", "fp32"])
    assert Image.open(out).size == (2 * (128 + 2) + 2, 128 + 2 + 2)  # two 64x64 images at scale 2, padded
    assert Image.open(tmp_path / "grid" / "000.png").size == (64, 64)
    with pytest.raises(SystemExit, match="is a semantic-map model: pass a map"):
        main(["sample", "--model", str(folder), "--steps", "2", "--out", str(tmp_path / "x.png")])
    with pytest.raises(SystemExit, match="--map needs a semantic-map model"):
        main(["sample", "--map", str(tmp_path / "map.png"), "--steps", "2", "--out", str(tmp_path / "y.png")])
    assert not (tmp_path / "x.png").exists() and not (tmp_path / "y.png").exists()


def test_the_server_takes_a_map_as_indices_or_painted_and_refuses_a_map_model_job_without_one(pipe, tmp_path):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from diffusekit.server import JobRequest, create_app

    folder = save_pipeline(pipe, tmp_path / "maps_model")
    app = create_app([str(folder)], outdir=tmp_path / "serve", worker_thread=False)
    server = app.state.server
    info = server.model_info["maps_model"]
    assert info["map_classes"] == list(MAP_CLASSES) and info["map_colours"][1] == list(MAP_PALETTE[1])
    _, maps = scenes(1, resolution=64, tiles=2)
    save_map(maps[0], tmp_path / "map.png")
    painted = Image.fromarray(np.asarray(MAP_PALETTE, np.uint8)[maps[0].numpy()])
    for image in (Image.open(tmp_path / "map.png"), painted):
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        job = server.prepare(JobRequest(map=base64.b64encode(buf.getvalue()).decode(), steps=1))
        assert torch.equal(job.plan.inputs["semantic_map"], maps) and job.plan.request.height == 64
    with TestClient(app, base_url="http://127.0.0.1") as client:
        r = client.post("/api/jobs", json={"steps": 1})
        assert r.status_code == 400 and "semantic-map model: pass a map" in r.json()["detail"]
    assert len(list((tmp_path / "serve" / "inputs").iterdir())) == 2  # the two prepared jobs' maps, not the refused
