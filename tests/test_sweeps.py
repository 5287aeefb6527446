"""X/Y/Z sweeps: axes parsed and checked, cells in X-fastest order with one seed, each cell equal to the run of its
own options, one model and one text encoding per distinct prompt, a labelled plot whose --from-png reruns the
sweep."""

import numpy as np
import pytest
from PIL import Image

from diffusekit import requests
from diffusekit.cli import main
from diffusekit.images import read_parameters
from diffusekit.pipelines.foreign import load_diffusers_pipeline
from diffusekit.requests import Request, parse_sweep, sweep, sweep_runs

from .test_outputs import fails, pixels
from .test_interop import _one_thread, tiny_sd_folder  # noqa: F401  (the fixture runs these tests on one thread)


@pytest.mark.parametrize("spec, want", [
    ("cfg=3,5,7.5", ("cfg", [3.0, 5.0, 7.5])),
    ("steps=10, 20", ("steps", [10, 20])),
    ("--upsample-guidance=auto,0.5,-1", ("upsample_guidance", ["auto", 0.5, -1.0])),
    ("sampler=ddim,euler", ("sampler", ["ddim", "euler"])),
    ("interpolate_positions=true,false", ("interpolate_positions", [True, False])),
    ("prompt=cat, red fox", ("prompt", ["cat", "red fox"])),
])
def test_parse_sweep(spec, want):
    name, values = parse_sweep(spec)
    assert (name, values) == want and [type(v) for v in values] == [type(v) for v in want[1]]


@pytest.mark.parametrize("spec, message", [
    ("cgf=1,2", "did you mean 'cfg'"), ("model=a,b", "OPTION one of"), ("cfg", "OPTION=V1"),
    ("steps=1.5", "not an integer"), ("steps=0,1", "steps must be"), ("sampler=ddim,dim", "did you mean 'ddim'"),
    ("cfg=1,1", "distinct values"), ("cfg=", "distinct values"), ("eta=2", "eta must be"),
    ("prompt=cat,a/b", "no / or"),
])
def test_bad_sweeps(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_sweep(spec)


def test_cells_in_x_fastest_order_with_one_seed():
    base = Request(model="mnist", seed=7)
    cells = sweep(base, [parse_sweep("cfg=1,3"), parse_sweep("steps=2,4,6")])
    assert [(c.cfg, c.steps) for c in cells] == [(1, 2), (3, 2), (1, 4), (3, 4), (1, 6), (3, 6)]
    assert {c.seed for c in cells} == {7} and all(c.sampler == base.sampler for c in cells)
    with pytest.raises(ValueError, match="sweep cell eta=0: --eta is an option of sampler ddim"):
        sweep(base, [parse_sweep("eta=0,0.5")])
    with pytest.raises(ValueError, match="at most 3 axes"):
        sweep(base, [parse_sweep(s) for s in ("cfg=1,2", "steps=1,2", "seed=1,2", "eta=0,1")])
    with pytest.raises(ValueError, match="each option once"):
        sweep(base, [parse_sweep("cfg=1,2"), parse_sweep("cfg=3,4")])


def test_prompt_search_and_replace():
    """A1111's Prompt S/R: the first value is searched for in the prompts and negative prompts and replaced by each
    value in turn (the first cell unchanged); a first value in no prompt is refused."""
    base = Request(model="sd", prompt=["a cat on a cat", "a dog"], negative=["cat hair"], seed=1)
    cells = sweep(base, [parse_sweep("prompt=cat,red fox"), parse_sweep("cfg=1,2")])
    assert [(c.prompt, c.negative, c.cfg) for c in cells] == [
        (["a cat on a cat", "a dog"], ["cat hair"], 1.0), (["a red fox on a red fox", "a dog"], ["red fox hair"], 1.0),
        (["a cat on a cat", "a dog"], ["cat hair"], 2.0), (["a red fox on a red fox", "a dog"], ["red fox hair"], 2.0)]
    assert requests.cell_labels([parse_sweep("prompt=cat,red fox"), parse_sweep("cfg=1,2")]) == [
        "prompt=cat,cfg=1", "prompt=red fox,cfg=1", "prompt=cat,cfg=2", "prompt=red fox,cfg=2"]
    with pytest.raises(ValueError, match="'horse', the text its values replace, is in no prompt"):
        sweep(base, [parse_sweep("prompt=horse,cow")])


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    return tiny_sd_folder(tmp_path_factory.mktemp("sd"), tmp_path_factory.mktemp("vocab") / "files")[0]


def test_a_sweep_shares_the_model_loras_and_text_encodings(sd, monkeypatch):
    """Six cells with two prompts: the prompts and the empty negative are encoded once, the LoRA / embedding context
    entered once; each cell's images equal its own run."""
    pipe = load_diffusers_pipeline(sd)
    calls, entered = [], []
    encoder = pipe.conditioner.text_encoder
    monkeypatch.setattr(pipe.conditioner, "text_encoder", lambda prompts, syntax="plain": (
        calls.append(tuple(prompts)), encoder(prompts, syntax))[1])
    monkeypatch.setattr(pipe.conditioner.text_encoder, "zero_null", False, raising=False)
    real = requests.LoRAs
    monkeypatch.setattr(requests, "LoRAs", lambda *a, **k: (entered.append(1), real(*a, **k))[1])
    base = requests.plan(Request(model=str(sd), prompt=["a cat", "a dog"], steps=2, n=1), pipe)
    runs = list(sweep_runs(base.request, [parse_sweep("cfg=1,4"), parse_sweep("sampler=ddim,euler,dpmpp_2m")], pipe))
    assert len(runs) == 6 and len(entered) == 1
    assert calls.count(("a cat", "a dog")) == 1 and calls.count(("",)) == 1
    for p, images in runs[::5]:
        assert (images == requests.run(requests.plan(p.request, pipe), pipe)).all()


def test_sweep_from_the_command_line(sd, tmp_path, capsys):
    """The plot has one cell per value pair, labelled; every cell is a run of its own (parameters, --from-png);
    --from-png of the plot reruns the whole sweep bit-exactly; an existing plot is not replaced without --overwrite."""
    base = ["sample", "--model", str(sd), "--prompt", "a cat", "--n", "2", "--steps", "2", "--dtype", "fp32"]
    main([*base, "--sweep", "cfg=1,5", "--sweep", "steps=1,2,3", "--out", str(tmp_path / "plot.png")])
    plot = Image.open(tmp_path / "plot.png")
    assert plot.width > 2 * (2 * 32) and plot.height > 3 * 32
    cell = tmp_path / "plot" / "cfg=5,steps=3"
    assert read_parameters(cell / "001.png")["cfg"] == 5 and read_parameters(cell / "001.png")["steps"] == 3
    assert read_parameters(tmp_path / "plot.png")["sweep"] == ["cfg=1.0,5.0", "steps=1,2,3"]
    assert len(list((tmp_path / "plot").glob("*.png"))) == 6
    main([*base, "--cfg", "5", "--steps", "3", "--out", str(tmp_path / "alone.png")])
    assert np.array_equal(pixels(tmp_path / "alone" / "001.png"), pixels(cell / "001.png"))
    main(["sample", "--from-png", str(tmp_path / "plot.png"), "--out", str(tmp_path / "again.png")])
    assert np.array_equal(pixels(tmp_path / "again.png"), pixels(tmp_path / "plot.png"))
    assert np.array_equal(pixels(tmp_path / "again" / "cfg=1,steps=2" / "000.png"),
                          pixels(tmp_path / "plot" / "cfg=1,steps=2" / "000.png"))
    main([*base, "--sweep", "prompt=cat,dog", "--out", str(tmp_path / "sr.png")])
    main([*base[:4], "a dog", *base[5:], "--out", str(tmp_path / "dog.png")])
    assert np.array_equal(pixels(tmp_path / "dog" / "000.png"), pixels(tmp_path / "sr" / "prompt=dog" / "000.png"))
    assert "exists" in fails([*base, "--sweep", "cfg=1,5", "--out", str(tmp_path / "plot.png")], capsys)
