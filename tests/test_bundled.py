"""The shipped models: the class-conditional MNIST UNets at 28x28 (the README samples it) and at 14x14 (the
Upsample Guidance example), measured with the shipped classifier; the super-resolution, semantic-map, layout and
caption models against their inputs."""

import pytest
import torch
from safetensors import safe_open

from diffusekit.bundled import MODELS
from diffusekit.evaluation import class_accuracy, load_mnist_classifier
from diffusekit.pipelines import generate, load_pipeline


def test_bundled_mnist_model_draws_the_requested_digits():
    pipe = load_pipeline(MODELS["mnist"])
    assert pipe.resolution == (28, 28) and pipe.num_classes == 10 and pipe.autoencoder is None
    with safe_open(MODELS["mnist"] / "model.safetensors", "pt") as f:  # shipped in half precision
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}
    assert next(pipe.net.parameters()).dtype == torch.float32  # computed in float32
    labels = torch.arange(10).repeat(3)
    images = generate(pipe, len(labels), labels=labels, steps=20, cfg=3.0, generator=torch.Generator().manual_seed(1))
    assert images.shape == (30, 1, 28, 28)
    assert class_accuracy(load_mnist_classifier(), images, labels) >= 0.9


def test_bundled_14x14_model_draws_28x28_digits_only_with_upsample_guidance():
    pipe, classifier = load_pipeline(MODELS["mnist14"]), load_mnist_classifier()
    assert pipe.resolution == (14, 14)
    labels = torch.arange(10).repeat(2)
    accuracy = {}
    for w in (None, 0.5):
        images = generate(pipe, len(labels), labels=labels, height=28, width=28, steps=10, cfg=3.0,
                          upsample_guidance=w, generator=torch.Generator().manual_seed(1))
        accuracy[w] = class_accuracy(classifier, images, labels)
    assert accuracy[None] <= 0.6 and accuracy[0.5] >= 0.9, accuracy  # tiled small digits vs one digit


def test_bundled_super_resolution_model_beats_bicubic_on_unseen_digits():
    """14x14 -> 28x28 on 20 of the digits the model was not trained on: closer to the true digits than
    bicubic upsampling (PSNR) and with their detail, which bicubic loses."""
    import torch.nn.functional as F

    from diffusekit.data import MNIST
    from experiments.super_resolution import detail, psnr

    real = MNIST(indices=slice(-20, None)).images
    low = F.avg_pool2d(real, 2)
    pipe = load_pipeline(MODELS["mnist_sr"])
    sr = generate(pipe, 20, low_res=low, steps=10, generator=torch.Generator().manual_seed(0))
    bicubic = F.interpolate(low, scale_factor=2, mode="bicubic", align_corners=False).clamp(-1, 1)
    assert psnr(sr, real) > psnr(bicubic, real) + 1.0
    assert detail(sr) > 0.7 * detail(real) > 2 * detail(bicubic)


def test_bundled_map_model_draws_held_out_maps_and_wider_ones():
    """20 maps the model never saw, at the trained 32x32 and 2x wider (64x64, convolutionally): the segmented
    samples agree with their maps nearly everywhere; another map's scene would not."""
    from diffusekit.data import MAP_CLASSES, ShapeMaps
    from diffusekit.evaluation import mean_iou, segment_shapes

    pipe = load_pipeline(MODELS["shape_maps"])
    assert pipe.map_classes == MAP_CLASSES and pipe.resolution == (32, 32)
    for resolution, tiles in ((32, 1), (64, 2)):
        maps = torch.stack([ShapeMaps(resolution, 20, seed=99, tiles=tiles)[i]["map"] for i in range(20)])
        images = generate(pipe, 20, semantic_map=maps, steps=10, generator=torch.Generator().manual_seed(0))
        pred = segment_shapes(images)
        assert mean_iou(pred, maps, len(MAP_CLASSES))[0] > 0.9
        assert mean_iou(pred, maps.roll(1, 0), len(MAP_CLASSES))[0] < 0.3


def test_bundled_layout_model_puts_the_requested_shapes_in_their_boxes():
    """30 held-out layouts: most requested boxes hold a shape of their class, far more than another layout's."""
    from diffusekit.data import LAYOUT_CLASSES, ShapeLayouts
    from diffusekit.evaluation import layout_hits, segment_shapes

    pipe = load_pipeline(MODELS["shape_layouts"])
    assert pipe.layout_classes == LAYOUT_CLASSES and pipe.conditioning == "layout"
    layouts = torch.stack([ShapeLayouts(32, 30, seed=99)[i]["layout"] for i in range(30)])
    images = generate(pipe, 30, layout=layouts, cfg=2.0, steps=10, generator=torch.Generator().manual_seed(0))
    hits = layout_hits(segment_shapes(images), layouts).box
    chance = layout_hits(segment_shapes(images), layouts.roll(1, 0)).box
    assert hits.float().mean() > 0.7 and chance.float().mean() < 0.2


def test_bundled_caption_model_puts_the_named_shapes_in_their_places():
    """The layout model's text baseline: from 40 held-out captions, far more named shapes land in their grid cell
    than in another caption's; a prompt names the text encoder's input, and the model takes no layout."""
    from diffusekit.data import ShapeCaptions
    from diffusekit.evaluation import layout_hits, segment_shapes

    pytest.importorskip("transformers")
    pipe = load_pipeline(MODELS["shape_captions"])
    assert pipe.conditioning == "text" and pipe.text_encoder_name == "minilm" and pipe.resolution == (32, 32)
    data = ShapeCaptions(32, 40, seed=99)
    layouts = torch.stack([data.layout(i) for i in range(40)])
    images = generate(pipe, 40, prompts=[data.caption(i) for i in range(40)], cfg=2.0, steps=10,
                      generator=torch.Generator().manual_seed(0))
    hits = layout_hits(segment_shapes(images), layouts).place
    chance = layout_hits(segment_shapes(images), layouts.roll(1, 0)).place
    assert hits.float().mean() > 0.25 and chance.float().mean() < 0.1
