"""The request layer: one Request checked once, every documented value of every option runs, and each default
lives in one place (issue 21)."""

import dataclasses
import inspect

import pytest
import torch

from diffusekit import defaults
from diffusekit.cli import main, make_parser
from diffusekit.outputs import read_request
from diffusekit.pipelines import Pipeline, generate
from diffusekit.requests import CHECKS, Request, load_model, plan, run
from diffusekit.samplers import DDPM_VARIANCES, SAMPLERS, taking
from diffusekit.schedules import SPACINGS
from diffusekit.training.config import SampleSection


@pytest.fixture(scope="module")
def mnist14():
    return load_model("mnist14", dtype="fp32")[0]


def sample(pipe: Pipeline, **fields) -> torch.Tensor:
    """One image of class 3 from a request with `fields`, resolved and run as the front-ends run it."""
    request = Request(model="mnist14", labels=[3], n=1, steps=2, dtype="fp32", **fields)
    return run(plan(request, pipe), pipe)


def test_upsample_guidance_minus_one_is_off_at_the_training_size(mnist14):
    """`--upsample-guidance -1` is documented as off: it runs at the model's own size and equals no guidance."""
    assert torch.equal(sample(mnist14, upsample_guidance=-1), sample(mnist14))
    assert torch.equal(sample(mnist14, upsample_guidance=-1, height=28, width=28), sample(mnist14, height=28, width=28))
    assert not torch.equal(sample(mnist14, upsample_guidance=0.2, height=28, width=28),
                           sample(mnist14, height=28, width=28))


def test_upsample_guidance_auto_is_the_rule_s_weight_through_every_layer(mnist14, tmp_path):
    """'auto' runs the weight guidance.upsample_guidance_weight picks (the same samples, the same cost), is
    recorded as 'auto' and reruns from the PNG."""
    from diffusekit.guidance import upsample_guidance_weight
    from diffusekit.images import load_image

    auto = sample(mnist14, upsample_guidance="auto", height=28, width=28)
    assert torch.equal(auto, sample(mnist14, upsample_guidance=upsample_guidance_weight("auto"), height=28, width=28))
    assert not torch.equal(auto, sample(mnist14, upsample_guidance=upsample_guidance_weight("auto") + 0.3, height=28,
                                        width=28))
    args = ["sample", "--model", "mnist14", "--labels", "7", "--n", "1", "--steps", "2", "--height", "28", "--width",
            "28", "--upsample-guidance", "auto", "--out", str(tmp_path / "a.png")]
    main(args)
    assert read_request(tmp_path / "a.png")["upsample_guidance"] == "auto"
    main(["sample", "--from-png", str(tmp_path / "a.png"), "--out", str(tmp_path / "b.png")])
    assert torch.equal(load_image(tmp_path / "a.png", 1), load_image(tmp_path / "b.png", 1))
    with pytest.raises(SystemExit):
        make_parser().parse_args(args[:-3] + ["best"])


def test_upsample_guidance_minus_one_from_the_command_line(tmp_path):
    main(["sample", "--model", "mnist14", "--labels", "7", "--n", "1", "--steps", "2", "--upsample-guidance", "-1",
          "--out", str(tmp_path / "off.png")])
    assert read_request(tmp_path / "off.png")["upsample_guidance"] is None


DOCUMENTED = [  # every value the README and --help name, per option (samplers and spacings from their registries)
    *({"sampler": s} for s in SAMPLERS),
    *({"spacing": s} for s in SPACINGS),
    *({"sampler": "ddpm", "variance": v} for v in DDPM_VARIANCES if v != "learned"),
    *({"sampler": "ddim", "eta": e} for e in (0.0, 0.5, 1.0)),
    *({"dtype": d} for d in ("auto", "fp32", "bf16")),
    *({"upsample_guidance": w, "height": 28, "width": 28} for w in (0.0, defaults.UG_W, 0.5, defaults.UG_MAX)),
    *({"upsample_guidance": defaults.UG_W, "height": 28, "width": 28, "ug_eta": e} for e in (0.0, 0.6, 1.0)),
    {"cfg": 1.0}, {"cfg": 0.0}, {"scale": 1}, {"seed": 2**40},
    {"cfg_until": 0.5}, {"cache": 3}, {"cache": 2, "cache_depth": 0}, {"cache": 2, "cfg_until": 0.3},
]


@pytest.mark.parametrize("fields", DOCUMENTED, ids=[str(f) for f in DOCUMENTED])
def test_every_documented_value_runs(mnist14, fields):
    if fields.get("dtype") not in (None, "fp32"):
        pipe = load_model("mnist14", dtype=fields["dtype"])[0]
    else:
        pipe = mnist14
    images = sample(pipe, **{k: v for k, v in fields.items() if k != "dtype"})
    assert images.isfinite().all() and images.shape[-1] == fields.get("width", 14)


def test_learned_variance_needs_a_learned_sigma_network(mnist14):
    with pytest.raises(ValueError, match="learned sigma"):
        sample(mnist14, sampler="ddpm", variance="learned")


@pytest.mark.parametrize("fields, message", [
    ({"sampler": "plms"}, "unknown sampler 'plms'; did you mean 'lms'?"),
    ({"spacing": "karas"}, "did you mean 'karras'?"),
    ({"variance": "large"}, "--variance is an option of sampler ddpm, not of dpmpp_2m"),
    ({"sampler": "euler", "eta": 0.5}, "--eta is an option of sampler ddim, not of euler"),
    ({"sampler": "ddim", "eta": 1.5}, "eta must be in [0, 1]"),
    ({"steps": 0}, "steps must be >= 1"),
    ({"n": 0}, "n must be >= 1"),
    ({"cfg": float("nan")}, "cfg must be finite"),
    ({"upsample_guidance": 11}, "upsample_guidance must be 'auto', -1 (off) or in [0, 10]"),
    ({"upsample_guidance": -0.5}, "upsample_guidance must be 'auto', -1 (off)"),
    ({"upsample_guidance": "best"}, "upsample_guidance must be 'auto', -1 (off) or in [0, 10], got 'best'"),
    ({"ug_eta": 2}, "ug_eta must be in [0, 1]"),
    ({"task": "paint"}, "unknown task 'paint'"),
    ({"task": "img2img"}, "img2img needs input image"),
    ({"task": "inpaint", "input_image": "a.png"}, "inpaint needs input mask"),
    ({"input_image": "a.png"}, "sample takes no input image"),
    ({"task": "upscale", "input_image": "a.png", "mask": "m.png"}, "upscale takes no input mask"),
    ({"strength": 0.5}, "strength is an option of img2img, inpaint and outpaint, not of sample"),
    ({"task": "img2img", "input_image": "a.png", "strength": 0}, "strength must be in (0, 1]"),
    ({"labels": [-1]}, "labels must be non-negative"),
    ({"negative": ["blurry"]}, "a negative prompt needs a prompt"),
    ({"dtype": "fp64"}, "unknown dtype 'fp64'"),
    ({"device": "gpu"}, "must be a torch device"),
    ({"cfg_until": 0}, "cfg_until must be in (0, 1]"),
    ({"cfg_until": 1.5}, "cfg_until must be in (0, 1]"),
    ({"cache": 0}, "cache must be >= 1"),
    ({"cache_depth": -1}, "cache_depth must be >= 0"),
    ({"vae_tile": -8}, "vae_tile must be >= 0"),
    ({"cache": 2, "compile": True}, "cache and compile do not combine"),
])
def test_a_request_is_checked_once_on_creation(fields, message):
    with pytest.raises(ValueError) as e:
        Request(**fields)
    assert message in str(e.value)


def test_img2img_and_inpaint_take_their_tasks_default_strength():
    assert Request(task="img2img", input_image="a.png").strength == defaults.STRENGTH["img2img"]
    assert Request(task="inpaint", input_image="a.png", mask="m.png").strength == defaults.STRENGTH["inpaint"]
    assert Request().strength is None


def test_a_request_is_not_changed_by_resolving_it(mnist14):
    request = Request(model="mnist14", n=1, steps=1, dtype="fp32")
    p = plan(request, mnist14)
    assert request.labels is None and request.height is None  # (frozen: resolution makes a new one)
    assert p.request.labels == list(range(10)) and (p.request.height, p.request.width) == (14, 14)
    with pytest.raises(dataclasses.FrozenInstanceError):
        request.steps = 3


def test_the_model_decides_what_a_request_may_ask(mnist14):
    with pytest.raises(ValueError, match="--labels 10 is out of range"):
        plan(Request(labels=[10]), mnist14)
    with pytest.raises(ValueError, match="need a text-conditional model"):
        plan(Request(prompt=["a cat"]), mnist14)
    with pytest.raises(ValueError, match="not a super-resolution model"):
        plan(Request(task="upscale", input_image="a.png"), mnist14)
    with pytest.raises(ValueError, match="vae_tile is an option of latent models.* has no autoencoder"):
        plan(Request(vae_tile=64), mnist14)
    with pytest.raises(ValueError, match=r"0 <= depth <= 5 \(the UNet's input blocks\), got interval 2, depth 6"):
        plan(Request(cache=2, cache_depth=6), mnist14)


def test_the_pipeline_knows_what_it_is(mnist14):
    sr = load_model("mnist_sr")[0]
    assert (mnist14.conditioning, mnist14.tasks, mnist14.is_inpainting) == ("class", ("sample", "img2img", "inpaint", "outpaint"),
                                                                           False)
    assert (sr.conditioning, sr.tasks, sr.is_inpainting) == ("unconditional", ("upscale",), False)


def test_each_default_lives_in_one_place():
    """generate, the diffusers-style call, the request (so the command line and the web API) and the training
    previews all take the defaults table's values."""
    table = {"sampler": defaults.SAMPLER, "steps": defaults.STEPS, "cfg": defaults.CFG, "cfg_until": defaults.CFG_UNTIL,
             "cache": defaults.CACHE, "cache_depth": defaults.CACHE_DEPTH}
    gen = inspect.signature(generate).parameters
    assert {k: gen[k].default for k in table} == table
    call = inspect.signature(Pipeline.__call__).parameters
    assert (call["num_inference_steps"].default, call["guidance_scale"].default) == (defaults.STEPS, defaults.CFG)
    assert {k: getattr(Request(), k) for k in table} == table
    section = {k: v for k, v in table.items() if k in dataclasses.asdict(SampleSection())}
    assert dataclasses.asdict(SampleSection()) | section == dataclasses.asdict(SampleSection())
    args = make_parser().parse_args(["sample"])
    assert {k: getattr(args, k) for k in table} == table and args.n == Request.n == defaults.N
    assert (args.ug_eta, args.scale, args.refiner_start) == (defaults.UG_ETA, defaults.GRID_SCALE,
                                                             defaults.REFINER_START)
    inputs = {"img2img": ["--image", "x.png"], "inpaint": ["--image", "x.png", "--mask", "m.png"],
              "outpaint": ["--image", "x.png", "--outpaint", "left=8"]}
    for task, strength in defaults.STRENGTH.items():
        assert make_parser().parse_args([task, *inputs[task]]).strength == strength
    for task, blur in defaults.MASK_BLUR.items():
        assert make_parser().parse_args([task, *inputs[task]]).mask_blur == blur


def test_command_line_types_are_the_requests_checks():
    """The parser refuses what the request refuses, with the same words (one check per field)."""
    for option, value, name in [("--steps", "0", "steps"), ("--eta", "2", "eta"), ("--sampler", "x", "sampler"),
                                ("--upsample-guidance", "11", "upsample_guidance")]:
        with pytest.raises(SystemExit):
            make_parser().parse_args(["sample", option, value])
        parsed = float(value) if name not in ("sampler",) else value
        assert CHECKS[name](int(parsed) if name == "steps" else parsed)


def test_samplers_declare_their_options():
    assert taking("eta") == ["ddim"] and taking("variance") == ["ddpm"] and taking("order") == ["unipc", "lms"]
    for name, f in SAMPLERS.items():
        assert set(f.options) <= set(inspect.signature(f).parameters), name
