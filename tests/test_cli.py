import pytest

from diffusekit.cli import main


def test_demo_writes_png_and_reports(tmp_path, capsys):
    out = tmp_path / "demo.png"
    main(["demo", "--n", "400", "--steps", "10", "--sampler", "heun", "--schedule", "flow", "--out", str(out)])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = capsys.readouterr().out
    assert "mode shares" in report and "wrote" in report


def test_bad_arguments_exit_with_message(capsys):
    with pytest.raises(SystemExit, match="number of steps"):
        main(["demo", "--steps", "0"])
    with pytest.raises(SystemExit):
        main(["demo", "--sampler", "plms"])
    assert "unknown sampler 'plms'; did you mean 'lms'?" in capsys.readouterr().err


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A 14x14 class-conditional UNet trained for two steps with the real trainer."""
    from diffusekit.training.config import load_config
    from diffusekit.training.diffusion import train

    out = tmp_path_factory.mktemp("tiny")
    sets = ["model.config.channels=8", "model.config.norm_groups=4", "train.steps=2", "train.batch_size=4",
            "train.sample_every=100", "train.log_every=1", f"train.out_dir='{out}'"]
    return train(load_config("configs/mnist_unet_14.toml", sets))


def test_sample_writes_a_labelled_grid(tiny_model, tmp_path, capsys):
    out = tmp_path / "grid.png"
    main(["sample", "--model", str(tiny_model), "--labels", "1,3-4", "--n", "2", "--steps", "3", "--out", str(out)])
    from PIL import Image

    grid = Image.open(out)
    assert grid.height == 2 * 3 + 3 * 2 * 14 + 2  # 3 rows of 2x-magnified 14 px digits, 2 px padding
    assert "6 images of 14x14" in capsys.readouterr().out


def test_sample_above_the_trained_size_hints_at_and_uses_upsample_guidance(tiny_model, tmp_path, capsys):
    main(["sample", "--model", str(tiny_model), "--labels", "0", "--n", "1", "--steps", "2", "--height", "28",
          "--width", "28", "--out", str(tmp_path / "a.png")])
    assert "hint: the model was trained at 14x14" in capsys.readouterr().out
    main(["sample", "--model", str(tiny_model), "--labels", "0", "--n", "1", "--steps", "2", "--height", "28",
          "--width", "56", "--upsample-guidance", "0.2", "--out", str(tmp_path / "b.png")])  # s = 2, low-res 14x28
    assert "hint" not in capsys.readouterr().out
    with pytest.raises(SystemExit, match="integer multiple s >= 2 of the training height 14"):
        main(["sample", "--model", str(tiny_model), "--labels", "0", "--height", "20", "--width", "28",
              "--upsample-guidance", "0.2", "--out", str(tmp_path / "c.png")])
    with pytest.raises(SystemExit, match="must be divisible by 2"):  # 28 x 42 -> a 14 x 21 low-res call
        main(["sample", "--model", str(tiny_model), "--labels", "0", "--height", "28", "--width", "42",
              "--upsample-guidance", "0.2", "--out", str(tmp_path / "c.png")])
    with pytest.raises(SystemExit, match="divisible by 2"):
        main(["sample", "--model", str(tiny_model), "--labels", "0", "--height", "21", "--width", "21",
              "--out", str(tmp_path / "d.png")])


@pytest.mark.parametrize("command", ["sample", "img2img", "inpaint", "upscale", "eval", "train", "demo", "serve"])
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0 and "(default:" in capsys.readouterr().out
