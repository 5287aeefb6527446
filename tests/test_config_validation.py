"""Bad inputs give a ValueError naming the key: training configs (and their --set overrides), model config.json
files, and weights holding NaN / inf."""

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from diffusekit.checkpoints import CONFIG_NAME, WEIGHTS_NAME, CheckpointError, from_pretrained, save_pretrained
from diffusekit.models import build
from diffusekit.training.config import load_config
from diffusekit.validation import ConfigError

CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("*.toml"))
TINY = dict(in_channels=1, out_channels=1, channels=8, channel_mult=[1, 2], num_res_blocks=1, attention_levels=[],
            norm_groups=4, context_dim=None)

BAD = [  # (override, regex the error must match)
    ("train.steps=0", r"'train.steps' must be >= 1, got 0"),
    ("train.steps=2.5", r"'train.steps' must be int, got float 2.5"),
    ('train.steps="10"', r"'train.steps' must be int, got str '10'"),
    ("train.batch_size=0", r"'train.batch_size' must be >= 1"),
    ("train.grad_accum=0", r"'train.grad_accum' must be >= 1"),
    ("train.ckpt_every=0", r"'train.ckpt_every' must be >= 1"),
    ("train.keep_last=0", r"'train.keep_last' must be >= 1"),
    ("train.lr=-1", r"'train.lr' must be finite and > 0"),
    ("train.ema_decay=1.5", r"'train.ema_decay' must be in \[0, 1\]"),
    ("train.betas=[0.9]", r"'train.betas' must be a list of 2 floats"),
    ("train.mixed_precision=fp8", r"'train.mixed_precision' must be one of \['auto', 'bf16', 'fp16', 'no'\], got 'fp8'"),
    ("train.device=gpu", r"'train.device' must be auto, cpu, cuda or cuda:N"),
    ("train.tensorboard=1", r"'train.tensorboard' must be bool, got int 1"),
    ("train.stepz=3", r"'train.stepz'.*did you mean 'steps'"),
    ("sample.sampler=dpmpp2m", r"'sample.sampler' must be one of .*did you mean 'dpmpp_2m'"),
    ("sample.cfg=nan", r"'sample.cfg' must be finite"),
    ("sample.steps=0", r"'sample.steps' must be >= 1"),
    ("diffusion.schedule=cosinee", r"'diffusion.schedule' must be one of .*did you mean 'cosine'"),
    ("diffusion.prediction=epsilon", r"'diffusion.prediction' must be one of"),
    ("diffusion.p_uncond=1.5", r"'diffusion.p_uncond' must be in \[0, 1\]"),
    ("diffusion.beta_range=[0.1]", r"'diffusion.beta_range' must be a list of 2 floats"),
    ("diffusion.beta_range=[0.1, 2.0]", r"'diffusion.beta_range' must be 2 floats in \[0, 1\]"),
    ("diffusion.spacing=middle", r"'diffusion.spacing' must be one of"),
    ("diffusion.timesteps=0", r"'diffusion.timesteps' must be >= 1"),
    ("data.dataset=bogus", r"'data.dataset' must be one of \['folder', 'mnist', 'shape_captions', 'shape_layouts', 'shape_maps', 'shapes'\], got 'bogus'"),
    ("data.channels=2", r"'data.channels' must be one of \[1, 3\]"),
    ("data.resolution=0", r"'data.resolution' must be >= 1"),
    ("model.type=bogus", r"'model.type' must be one of .*'unet'"),
    ("model.config=3", r"'model.config' must be a table"),
    ('model.config.channels="64"', r"model.config key 'channels' must be int, got str '64'"),
    ("train=3", r"'train' must be a table"),
]


@pytest.mark.parametrize("override,error", BAD, ids=[b[0] for b in BAD])
def test_bad_config_value_names_the_key(override, error):
    with pytest.raises(ValueError, match=error):
        load_config(None, [override])


@pytest.mark.parametrize("override,error", [("train.steps=0", "'train.steps' must be >= 1"),
                                            ("train.steps.x=1", "'train.steps' is not a table")])
def test_set_overrides_of_a_file_are_checked(override, error):
    with pytest.raises(ValueError, match=error):
        load_config(CONFIGS[0], [override])


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_preset_loads(path):
    assert load_config(path).train.steps >= 1


def test_valid_values_pass():
    cfg = load_config(None, ["train.lr=1", "train.device=cuda:1", "diffusion.beta_range=[0.0001, 0.02]",
                             "train.betas=[0.9, 0.99]", "model.config.channel_mult=[1, 2]", "sample.sampler=heun"])
    assert cfg.train.betas == (0.9, 0.99) and cfg.train.device == "cuda:1"


@pytest.fixture
def saved(tmp_path):
    return save_pretrained(build("unet", TINY), tmp_path / "tiny")


def edit_config(folder: Path, edit) -> None:
    meta = json.loads((folder / CONFIG_NAME).read_text())
    edit(meta)
    (folder / CONFIG_NAME).write_text(json.dumps(meta))


@pytest.mark.parametrize("edit,error", [
    (lambda m: m["config"].update(channels="64"), r"config.json: unet config key 'channels' must be int, got str '64'"),
    (lambda m: m["config"].update(channel_mult=[1.5, 2]), r"'channel_mult' must be a list of ints"),
    (lambda m: m["config"].update(context_dim=True), r"'context_dim' must be int or None"),
    (lambda m: m["config"].update(bogus=1), r"config.json: unet config has unknown keys \['bogus'\]"),
    (lambda m: m.pop("model_type"), r"config.json has no 'model_type'"),
    (lambda m: m.pop("config"), r"config.json has no 'config'"),
    (lambda m: m.update(config=[1, 2]), r"config.json key 'config' must be dict, got list"),
], ids=["wrong_type", "list_element_type", "bool_for_int", "unknown_key", "no_model_type", "no_config", "config_list"])
def test_bad_model_config_json(saved, edit, error):
    assert from_pretrained(saved) is not None  # JSON lists for tuple fields are fine
    edit_config(saved, edit)
    with pytest.raises(CheckpointError, match=error):
        from_pretrained(saved)


def test_build_checks_value_types():
    with pytest.raises(ConfigError, match="unet config key 'num_res_blocks' must be int, got float 1.0"):
        build("unet", dict(TINY, num_res_blocks=1.0))


@pytest.mark.parametrize("bad", [float("nan"), float("-inf")])
def test_non_finite_weights_are_rejected(saved, bad):
    state = load_file(saved / WEIGHTS_NAME)
    key = sorted(k for k, v in state.items() if v.is_floating_point())[3]
    state[key].view(-1)[0] = bad
    save_file(state, saved / WEIGHTS_NAME)
    with pytest.raises(CheckpointError, match=rf"model.safetensors is corrupt: tensor '{key}' holds NaN or inf"):
        from_pretrained(saved)
