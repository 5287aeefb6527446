"""Every user mistake ends in one line on stderr and a non-zero exit code, never in a traceback or a silently
wrong result (issue 10)."""

import functools
import importlib
import pathlib
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from diffusekit.bundled import MODELS
from diffusekit.cli import main
from diffusekit.pipelines import Pipeline, generate, load_pipeline, save_pipeline

SAMPLE = ["sample", "--steps", "2", "--n", "1", "--labels", "3"]


def fails(argv: list[str], capsys) -> str:
    """Run the CLI expecting a user error: return its one-line message (main's or argparse's)."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code not in (0, None)
    err = capsys.readouterr().err
    message = e.value.code if isinstance(e.value.code, str) else err.strip().splitlines()[-1]
    assert message.startswith("diffusekit") and "\n" not in message and "Traceback" not in err
    return message


@pytest.fixture(scope="module")
def mnist() -> Pipeline:
    return load_pipeline(MODELS["mnist"])


@pytest.fixture
def no_sampling(monkeypatch):
    """Fail the test if the CLI gets as far as sampling."""
    importlib.import_module("diffusekit.training.diffusion")  # before the patch: it keeps the `generate` it imports

    def sampled(*args, **kwargs):
        raise AssertionError("sampled before checking the arguments")

    monkeypatch.setattr("diffusekit.requests.generate", sampled)


class Evil:
    """Unpickling this creates a marker file: what a malicious .pth can do to torch.load(weights_only=False)."""

    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (self.marker,)


def test_inception_weights_are_never_unpickled(tmp_path, capsys):
    marker, evil = tmp_path / "pwned", tmp_path / "evil.pth"
    torch.save({"Conv2d_1a_3x3.conv.weight": torch.zeros(1), "payload": Evil(marker)}, evil)
    message = fails(["eval", "--inception", str(evil), "--fake", str(tmp_path)], capsys)
    assert "evil.pth" in message and "weights-only" in message
    assert not marker.exists()
    torch.load(evil, weights_only=False)  # the payload is real: an unsafe load runs it
    assert marker.exists()


@pytest.mark.parametrize("args, option", [
    (["--cfg", "nan"], "--cfg"), (["--cfg", "inf"], "--cfg"),
    (["--upsample-guidance", "nan"], "--upsample-guidance"), (["--upsample-guidance", "-0.5"], "--upsample-guidance"),
    (["--upsample-guidance", "50"], "--upsample-guidance"), (["--ug-eta", "1.5"], "--ug-eta"),
    (["--ug-eta", "-0.1"], "--ug-eta"), (["--height", "0"], "--height"), (["--width", "-28"], "--width"),
    (["--n", "0"], "--n"), (["--steps", "0"], "--steps"), (["--steps", "-3"], "--steps"),
    (["--labels", "5-2"], "--labels"), (["--labels", "a"], "--labels"), (["--labels", "3,"], "--labels"),
    (["--labels", "12"], "--labels"),
])
def test_sample_numbers_out_of_range_are_refused(args, option, capsys, no_sampling):
    message = fails(SAMPLE + args, capsys)
    assert option in message


@pytest.mark.parametrize("args, option", [(["--cfg", "nan"], "--cfg"), (["--n", "0"], "--n"),
                                          (["--steps", "0"], "--steps"), (["--resolution", "-1"], "--resolution")])
def test_eval_numbers_out_of_range_are_refused(args, option, capsys, no_sampling):
    assert option in fails(["eval", "--model", "mnist"] + args, capsys)


def test_sample_negative_seed_is_fine(tmp_path, capsys):
    main(SAMPLE + ["--seed", "-5", "--out", str(tmp_path / "a.png")])
    assert (tmp_path / "a.png").is_file()


@pytest.mark.parametrize("n, kwargs, match", [(0, {}, "positive"), (1, {"steps": 0}, "positive"),
                                              (1, {"cfg": float("nan")}, "finite"), (1, {"ug_eta": 1.5}, "ug_eta")])
def test_generate_refuses_invalid_numbers(mnist, n, kwargs, match):
    with pytest.raises(ValueError, match=match):
        generate(mnist, n, labels=torch.tensor([3] * n), **{"steps": 2, **kwargs})


def test_bad_output_path_is_refused_before_sampling(tmp_path, capsys, no_sampling):
    assert ".png" in fails(SAMPLE + ["--out", str(tmp_path / "grid.gif")], capsys)
    (tmp_path / "file").write_text("")
    assert "not a writable folder" in fails(SAMPLE + ["--out", str(tmp_path / "file" / "sub" / "grid.png")], capsys)
    (tmp_path / "dir.png").mkdir()
    assert "is a folder" in fails(SAMPLE + ["--out", str(tmp_path / "dir.png")], capsys)


def nan_after(calls: int):
    """A `wrap` whose denoiser returns NaN from its (calls + 1)-th call on."""
    def wrap(denoiser):
        count = [0]

        def nan_denoiser(x, t, cond=None):
            count[0] += 1
            p = denoiser(x, t, cond)
            return p._replace(eps=p.eps * torch.nan, x0=p.x0 * torch.nan) if count[0] > calls else p

        return nan_denoiser

    return wrap


def test_sampled_nan_names_the_step(mnist):
    steps = []
    with pytest.raises(FloatingPointError, match=r"NaN/inf at step 3 of 5 \(sampler ddim\)"):
        generate(mnist, 1, labels=torch.tensor([3]), sampler="ddim", steps=5, wrap=nan_after(2),
                 callback=lambda i, t, x, p: steps.append(i))
    assert steps == [0, 1, 2, 3, 4]  # a caller's callback still sees every step
    assert generate(mnist, 1, labels=torch.tensor([3]), steps=2, wrap=nan_after(2)).isfinite().all()


def test_cli_reports_sampled_nan_in_one_line(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr("diffusekit.requests.generate", functools.partial(generate, wrap=nan_after(0)))
    assert "NaN/inf at step 1 of 2" in fails(SAMPLE + ["--out", str(tmp_path / "a.png")], capsys)


def test_file_mistakes_are_one_line_errors(tmp_path, capsys, no_sampling):
    (tmp_path / "some_file.txt").write_text("hello")
    (tmp_path / "empty").mkdir()
    for argv, expected in [
        (["sample", "--model", str(tmp_path / "does/not/exist")], "is neither a model folder"),
        (["sample", "--model", str(tmp_path / "some_file.txt")], "is neither a model folder"),
        (["sample", "--model", "mnsit"], "did you mean 'mnist'?"),
        (["sample", "--model", str(tmp_path / "empty")], "no config.json"),
        (["sample", "--sampler", "bogus"], "unknown sampler 'bogus'; valid: ddpm, ddim"),
        (["eval", "--real", str(tmp_path / "nope"), "--fake", str(tmp_path / "empty")], "does not exist"),
        (["eval", "--fake", str(tmp_path / "empty")], "no images found"),
        (["train", str(tmp_path / "missing.toml")], "missing.toml"),
    ]:
        assert expected in fails(argv, capsys), argv


def test_os_errors_are_one_line_but_bugs_keep_their_traceback(monkeypatch, capsys):
    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied", "model.safetensors")

    monkeypatch.setattr("diffusekit.requests.load_pipeline", denied)
    assert "Permission denied: 'model.safetensors'" in fails(SAMPLE, capsys)

    def bug(*args, **kwargs):
        raise TypeError("a bug")

    monkeypatch.setattr("diffusekit.requests.load_pipeline", bug)
    with pytest.raises(TypeError, match="a bug"):
        main(SAMPLE)


def test_debug_shows_the_traceback(tmp_path):
    config = str(tmp_path / "missing.toml")
    for argv in (["--debug", "train", config], ["train", config, "--debug"]):
        with pytest.raises(ValueError, match="missing.toml"):
            main(argv)


def test_conditions_the_model_would_ignore_are_refused(tmp_path, capsys, no_sampling):
    from diffusekit.models.unet import UNet, UNetConfig
    from diffusekit.denoisers import DiffusionSettings

    assert "--prompt" in fails(SAMPLE + ["--prompt", "a seven"], capsys)
    net = UNet(UNetConfig(in_channels=1, out_channels=1, channels=8, channel_mult=(1,), num_res_blocks=1,
                          attention_levels=(), mid_attention=False, context_dim=0, norm_groups=4))
    save_pipeline(Pipeline(net, DiffusionSettings(), (8, 8), 1), tmp_path / "uncond")
    message = fails(SAMPLE + ["--model", str(tmp_path / "uncond")], capsys)
    assert "--labels" in message and "unconditional" in message


@pytest.mark.parametrize("device, problem", [("gpu", "must be a torch device, got 'gpu'"),
                                            ("cuda", "must be a device this machine has"),
                                            ("mps", "must be a device this machine has")])
def test_a_device_the_machine_lacks_is_refused(device, problem, capsys, no_sampling):
    if device != "gpu" and getattr(torch, device).is_available():
        pytest.skip(f"this machine has {device}")
    for command in (SAMPLE, ["eval", "--model", "mnist"]):
        message = fails(command + ["--device", device], capsys)
        assert "--device" in message and problem in message


def test_interrupted_training_says_where_it_stopped(monkeypatch, capsys):
    def interrupted(cfg, resume=True, force=False):
        raise KeyboardInterrupt("stopped at step 7; checkpoint saved, run again to resume")

    monkeypatch.setattr("diffusekit.training.diffusion.train", interrupted)
    with pytest.raises(SystemExit) as e:
        main(["train", "configs/mnist_unet_14.toml"])
    assert e.value.code == 130
    assert capsys.readouterr().err.strip() == "diffusekit: stopped at step 7; checkpoint saved, run again to resume"


def _png(path: pathlib.Path, array: np.ndarray) -> None:
    Image.fromarray(array).save(path)


def test_16_bit_and_float_images_are_scaled_not_clipped(tmp_path):
    from diffusekit.data import ImageFolder, to_tensor

    _png(tmp_path / "grey16.png", np.full((8, 8), 32768, dtype=np.uint16))
    with Image.open(tmp_path / "grey16.png") as img:
        assert img.mode.startswith("I")
        assert to_tensor(img, 1).abs().max() < 0.01  # mid-grey, not the white of convert("L")
    ds = ImageFolder(tmp_path, resolution=8, channels=3)
    assert ds[0]["image"].shape == (3, 8, 8) and ds[0]["image"].abs().max() < 0.01
    for values in (np.full((4, 4), 0.5, np.float32), np.full((4, 4), 127.5, np.float32)):
        assert to_tensor(Image.fromarray(values, "F"), 1).abs().max() < 0.01


def test_decompression_bombs_and_truncated_images_are_skipped_with_a_warning(tmp_path, monkeypatch):
    from diffusekit.data import ImageFolder

    _png(tmp_path / "a_ok.png", np.zeros((8, 8), np.uint8))
    _png(tmp_path / "b_bomb.png", np.zeros((16, 16), np.uint8))  # 256 > 2 x 100 pixels: an error in PIL
    _png(tmp_path / "c_big.png", np.zeros((12, 12), np.uint8))  # 144 > 100 pixels: only a warning in PIL
    _png(tmp_path / "d_truncated.png", np.random.default_rng(0).integers(0, 255, (8, 8), np.uint8))
    (tmp_path / "d_truncated.png").write_bytes((tmp_path / "d_truncated.png").read_bytes()[:80])
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    ds = ImageFolder(tmp_path, resolution=8, channels=1)
    with pytest.warns(UserWarning) as record:
        assert torch.equal(ds[1]["image"], ds[0]["image"])  # replaced by the next readable one, a_ok.png
    bad = ["b_bomb.png", "c_big.png", "d_truncated.png"]
    assert [pathlib.Path(p).name for p in ds.bad] == bad
    assert [name in str(w.message) for w, name in zip(record, bad)] == [True] * 3
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds[2]  # reported once


def test_python_m_diffusekit_and_version(capsys):
    out = subprocess.run([sys.executable, "-m", "diffusekit", "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.startswith("diffusekit 0.")
    with pytest.raises(SystemExit) as e:
        main(["sample", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert e.value.code == 0 and "(default: dpmpp_2m)" in out and "(default: 20)" in out and "(default: auto)" in out
