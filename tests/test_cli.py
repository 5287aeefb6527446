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
    assert "invalid choice: 'plms'" in capsys.readouterr().err
