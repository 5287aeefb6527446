"""`sample` outputs: numbered files that never overwrite, single images beside the grid, generation parameters in
each PNG, and --from-png reproducing a run bit for bit (issues 12 and 15)."""

import numpy as np
import pytest
import torch
from PIL import Image

from diffusekit.cli import BUNDLED, main, make_parser, version
from diffusekit.images import read_parameters, save_image

SAMPLE = ["sample", "--steps", "2", "--n", "1", "--labels", "3,5"]


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

    monkeypatch.setattr("diffusekit.pipelines.common.generate", sampled)


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
        m.setattr("diffusekit.pipelines.common.generate", lambda *a, **k: pytest.fail("sampled"))
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
    assert grid == {"model": "mnist", "model_path": str(BUNDLED["mnist"].resolve()), "labels": [3, 5],
                    "prompt": None, "negative": None, "n": 1, "seed": 7, "sampler": "ddim", "steps": 2, "cfg": 2.0,
                    "spacing": "trailing", "eta": None, "variance": None, "upsample_guidance": None, "ug_eta": 1.0,
                    "height": 28, "width": 28, "scale": 2, "device": "cpu", "diffusekit": version()}
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
