"""`sample` outputs: numbered files that never overwrite, single images beside the grid, generation parameters in
each PNG, and --from-png reproducing a run bit for bit (issues 12 and 15)."""

import numpy as np
import pytest
import torch
from PIL import Image

from diffusekit.acceleration import native_dtype
from diffusekit.bundled import MODELS
from diffusekit.cli import main, make_parser
from diffusekit.outputs import version
from diffusekit.images import read_parameters, save_image

SAMPLE = ["sample", "--sampler", "ddim", "--steps", "2", "--n", "1", "--labels", "3,5"]
AUTO = "bf16" if native_dtype("cpu") == torch.bfloat16 else "fp32"  # what --dtype auto (the default) runs here


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path))


def fails(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as e:
        main(argv)
    message = e.value.code if isinstance(e.value.code, str) else capsys.readouterr().err.strip().splitlines()[-1]
    assert message.startswith("diffusekit") and "\n" not in message
    return message


@pytest.fixture
def no_sampling(monkeypatch):
    def sampled(*args, **kwargs):
        raise AssertionError("sampled before checking the arguments")

    monkeypatch.setattr("diffusekit.requests.generate", sampled)


def test_numbered_outputs_never_overwrite(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    main(SAMPLE)
    main(SAMPLE + ["--seed", "4"])
    main(SAMPLE + ["--outdir", "elsewhere"])
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["00001-0", "00001-0.png", "00002-4", "00002-4.png"]
    assert sorted(p.name for p in (tmp_path / "out" / "00002-4").iterdir()) == ["000.png", "001.png"]
    assert (tmp_path / "elsewhere" / "00001-0.png").is_file()


def test_existing_out_needs_overwrite(tmp_path, capsys, monkeypatch):
    out = tmp_path / "grid.png"
    out.write_bytes(b"mine")
    with monkeypatch.context() as m:
        m.setattr("diffusekit.requests.generate", lambda *a, **k: pytest.fail("sampled"))
        assert "grid.png exists: pass --overwrite" in fails(SAMPLE + ["--out", str(out)], capsys)
        out.unlink()
        (tmp_path / "grid").mkdir()  # its image folder counts too
        assert "grid exists: pass --overwrite" in fails(SAMPLE + ["--out", str(out)], capsys)
    (tmp_path / "grid" / "007.png").write_bytes(b"an image of an earlier run")
    main(SAMPLE + ["--out", str(out), "--overwrite"])
    assert read_parameters(out)["labels"] == [3, 5]
    assert sorted(p.name for p in (tmp_path / "grid").iterdir()) == ["000.png", "001.png"]


def test_pngs_record_their_parameters(tmp_path):
    out = tmp_path / "grid.png"
    main(SAMPLE + ["--seed", "7", "--cfg", "2", "--spacing", "trailing", "--out", str(out)])
    grid = read_parameters(out)
    assert grid == {"model": "mnist", "model_path": str(MODELS["mnist"].resolve()), "labels": [3, 5],
                    "prompt": None, "negative": None, "prompt_syntax": "a1111", "n": 1, "seed": 7, "sampler": "ddim", "steps": 2, "cfg": 2.0,
                    "classifier": None, "classifier_scale": 1.0,
                    "spacing": "trailing", "eta": None, "variance": None, "cfg_until": 1.0, "cache": 1, "cache_depth": 1,
                    "upsample_guidance": None, "ug_eta": 1.0, "interpolate_positions": False,
                    "height": 28, "width": 28, "vae_tile": None, "scale": 2, "input_image": None, "mask": None, "map": None, "layout": None,
                    "strength": None, "outpaint": None, "mask_blur": None,
                    "text_encoder": None, "lora": None, "embedding": None, "refiner": None, "refiner_start": 0.8,
                    "dtype": AUTO, "model_hash": None, "device": "cpu", "diffusekit": version()}
    assert read_parameters(tmp_path / "grid" / "001.png") == {**grid, "image": {"index": 1, "label": 5}}
    assert pixels(tmp_path / "grid" / "001.png").shape == (28, 28)


def test_png_without_parameters_is_a_one_line_error(tmp_path, capsys, no_sampling):
    Image.new("L", (4, 4)).save(tmp_path / "plain.png")
    assert "holds no generation parameters" in fails(["sample", "--from-png", str(tmp_path / "plain.png")], capsys)
    save_image(torch.zeros(1, 4, 4), tmp_path / "odd.png", {"model": "mnist", "steps": "two"})
    assert "parameter steps must be int, got str 'two'" in fails(["sample", "--from-png", str(tmp_path / "odd.png")],
                                                               capsys)


def test_from_png_reproduces_the_grid_and_single_images(tmp_path):
    a, b, c = (tmp_path / f"{name}.png" for name in "abc")
    main(SAMPLE + ["--seed", "7", "--eta", "0.5", "--spacing", "trailing", "--out", str(a)])  # eta > 0 draws noise
    main(["sample", "--from-png", str(a), "--out", str(b)])
    assert np.array_equal(pixels(a), pixels(b))
    assert read_parameters(a) == read_parameters(b)
    main(["sample", "--from-png", str(tmp_path / "a" / "001.png"), "--out", str(c)])
    assert np.array_equal(pixels(tmp_path / "a" / "001.png"), pixels(tmp_path / "c" / "001.png"))
    main(["sample", "--from-png", str(a), "--seed", "8", "--out", str(tmp_path / "d.png")])  # options override
    assert read_parameters(tmp_path / "d.png")["seed"] == 8
    assert not np.array_equal(pixels(a), pixels(tmp_path / "d.png"))


def test_the_fewer_evaluation_options_are_recorded_and_rerun(tmp_path):
    a, b, exact = (tmp_path / f"{name}.png" for name in ("a", "b", "exact"))
    fast = ["--steps", "6", "--cache", "3", "--cache-depth", "0", "--cfg-until", "0.5"]
    main(SAMPLE + fast + ["--out", str(a)])
    assert {k: read_parameters(a)[k] for k in ("cache", "cache_depth", "cfg_until")} == dict(cache=3, cache_depth=0,
                                                                                           cfg_until=0.5)
    main(["sample", "--from-png", str(a), "--out", str(b)])
    assert np.array_equal(pixels(a), pixels(b))
    main(SAMPLE + ["--steps", "6", "--out", str(exact)])
    assert not np.array_equal(pixels(a), pixels(exact))


def test_from_png_prompts_given_replace_the_recorded_ones():
    saved = {"prompt": ["a cat"], "negative": ["blurry"]}
    assert make_parser(saved).parse_args(["sample", "--prompt", "a dog"]).prompt == ["a dog"]
    assert make_parser(saved).parse_args(["sample"]).negative == ["blurry"]


def test_eta_and_variance_are_refused_for_other_samplers(capsys, no_sampling):
    assert "--eta is an option of sampler ddim, not of euler" in fails(SAMPLE + ["--sampler", "euler", "--eta", "1"],
                                                                       capsys)
    assert "--variance is an option of sampler ddpm" in fails(SAMPLE + ["--variance", "large"], capsys)


def test_eta_changes_ddim(tmp_path):
    for eta in ("0", "1"):
        main(SAMPLE + ["--eta", eta, "--out", str(tmp_path / f"{eta}.png")])
    assert not np.array_equal(pixels(tmp_path / "0.png"), pixels(tmp_path / "1.png"))


def test_sampler_typo_suggests_the_name(capsys, no_sampling):
    assert "unknown sampler 'dpmpp2m'; did you mean 'dpmpp_2m'?" in fails(SAMPLE + ["--sampler", "dpmpp2m"], capsys)
    assert "did you mean 'karras'?" in fails(SAMPLE + ["--spacing", "karas"], capsys)


@pytest.fixture
def digit_files(tmp_path):
    """A real digit as a 28x28 PNG, its 14x14 version, and a mask PNG whose white centre is regenerated."""
    from diffusekit.data import MNIST

    digit = MNIST(indices=slice(-1, None)).images[0]
    save_image(digit, tmp_path / "digit.png")
    save_image(torch.nn.functional.avg_pool2d(digit, 2), tmp_path / "small.png")
    mask = -torch.ones(1, 28, 28)
    mask[:, 8:20, 8:20] = 1
    save_image(mask, tmp_path / "mask.png")
    return tmp_path


TASK = ["--labels", "3", "--n", "1", "--steps", "3"]


def test_img2img_and_inpaint_from_the_command_line(digit_files, capsys):
    d = digit_files
    main(["img2img", "--image", str(d / "digit.png"), "--strength", "0.5", "--out", str(d / "i2i.png"), *TASK])
    assert read_parameters(d / "i2i.png")["input_image"] == str(d / "digit.png")
    main(["sample", "--from-png", str(d / "i2i.png"), "--out", str(d / "again.png")])
    assert np.array_equal(pixels(d / "i2i.png"), pixels(d / "again.png"))
    main(["inpaint", "--image", str(d / "digit.png"), "--mask", str(d / "mask.png"), "--out", str(d / "inp.png"), *TASK])
    out, src, hole = pixels(d / "inp" / "000.png"), pixels(d / "digit.png"), pixels(d / "mask.png") > 127
    assert np.array_equal(out[~hole], src[~hole]) and not np.array_equal(out[hole], src[hole])
    assert "image is 14x14; it must be 28x28" in fails(
        ["img2img", "--image", str(d / "small.png"), "--height", "28", "--width", "28", *TASK], capsys)
    assert "mask is 14x14; it must be 28x28" in fails(
        ["inpaint", "--image", str(d / "digit.png"), "--mask", str(d / "small.png"), *TASK], capsys)
    assert "no image file at" in fails(["img2img", "--image", str(d / "missing.png"), *TASK], capsys)


def test_upscale_needs_a_super_resolution_model(tmp_path, digit_files, capsys):
    from diffusekit.training import diffusion
    from tests.test_training import tiny

    sr = diffusion.train(tiny("mnist_sr.toml", tmp_path / "sr", "train.steps=1"))
    main(["upscale", "--model", str(sr), "--image", str(digit_files / "small.png"), "--n", "1", "--steps", "2",
          "--out", str(tmp_path / "up.png")])
    assert pixels(tmp_path / "up" / "000.png").shape == (28, 28)
    assert "not a super-resolution model" in fails(["upscale", "--model", "mnist", "--image",
                                                    str(digit_files / "small.png"), *TASK], capsys)


def test_a_refiner_finishes_what_the_base_model_started(tmp_path):
    main(SAMPLE + ["--refiner", "mnist", "--refiner-start", "0.5", "--steps", "4", "--out", str(tmp_path / "r.png")])
    main(SAMPLE + ["--steps", "4", "--out", str(tmp_path / "one.png")])
    assert np.array_equal(pixels(tmp_path / "r.png"), pixels(tmp_path / "one.png"))  # the same model: one run
    main(SAMPLE + ["--refiner", "mnist14", "--refiner-start", "0.5", "--steps", "4", "--out", str(tmp_path / "x.png")])
    assert not np.array_equal(pixels(tmp_path / "x.png"), pixels(tmp_path / "one.png"))


def test_bf16_from_the_command_line_is_recorded_and_close_to_fp32(tmp_path):
    main(SAMPLE + ["--steps", "10", "--dtype", "bf16", "--out", str(tmp_path / "bf16.png")])
    main(SAMPLE + ["--steps", "10", "--dtype", "fp32", "--out", str(tmp_path / "fp32.png")])
    assert read_parameters(tmp_path / "bf16.png")["dtype"] == "bf16"
    difference = np.abs(pixels(tmp_path / "bf16.png").astype(float) - pixels(tmp_path / "fp32.png")).mean()
    assert 0 < difference < 10  # of 255: rounded differently, the same digits


@pytest.mark.parametrize("native", [torch.bfloat16, None])
def test_auto_dtype_runs_the_devices_native_precision(tmp_path, monkeypatch, native):
    monkeypatch.setattr("diffusekit.acceleration.native_dtype", lambda device: native)
    seen = []
    monkeypatch.setattr("diffusekit.requests.accelerate", lambda pipe, dtype, compile: seen.append(dtype) or pipe)
    main(SAMPLE + ["--out", str(tmp_path / "auto.png")])
    assert seen == [native] and read_parameters(tmp_path / "auto.png")["dtype"] == ("bf16" if native else "fp32")
    main(SAMPLE + ["--dtype", "fp32", "--out", str(tmp_path / "fp32.png")])
    assert seen == [native, None]
