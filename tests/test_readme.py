"""The README runs as written: every Python block executes (a tiny diffusers pipeline stands in for the
user's Stable Diffusion folder), every `diffusekit` command line parses (issue 15)."""

import re
import shlex
from pathlib import Path

import pytest

from diffusekit.cli import make_parser

ROOT = Path(__file__).resolve().parent.parent
BLOCKS = re.findall(r"```(\w+)\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    """A tiny SD 1.x diffusers folder, standing in for the user's."""
    from tests.test_interop import tiny_sd_folder

    return tiny_sd_folder(tmp_path_factory.mktemp("sd"), tmp_path_factory.mktemp("vocab") / "files")[0]


@pytest.mark.parametrize("code", [code for lang, code in BLOCKS if lang == "python"])
def test_python_blocks_run(code, sd_folder, monkeypatch):
    monkeypatch.chdir(ROOT)
    code = code.replace("path/to/stable-diffusion-v1-5", str(sd_folder))
    exec(compile(code, "README.md", "exec"), {})


def commands() -> list[str]:
    lines = [line.split("  #")[0].strip() for lang, code in BLOCKS if lang == "bash" for line in code.splitlines()]
    return [line.split("&& ")[-1] for line in lines if line.split("&& ")[-1].startswith(("diffusekit ", "torchrun "))]


@pytest.mark.parametrize("line", commands())
def test_command_lines_parse(line):
    argv = shlex.split(line)
    argv = argv[argv.index("diffusekit.cli") + 1:] if "diffusekit.cli" in argv else argv[1:]
    assert callable(make_parser().parse_args(argv).func)
