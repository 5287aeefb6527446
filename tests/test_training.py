"""The trainers: presets run, losses fall, resumption is bit-exact, interruptions and NaNs are handled,
two processes equal one."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from diffusekit.cli import main
from diffusekit.data import MAP_CLASSES
from diffusekit.denoisers import NetworkDenoiser
from diffusekit.pipelines import load_pipeline
from diffusekit.training import diffusion, loop
from diffusekit.training.autoencoder import train_autoencoder
from diffusekit.training.config import load_config
from diffusekit.training.state import latest_checkpoint

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
TINY = {
    "unet": ["model.config.channels=8", "model.config.channel_mult=[1, 2]", "model.config.num_res_blocks=1",
             "model.config.norm_groups=4", "model.config.attention_levels=[1]", "model.config.num_heads=2"],
    "dit": ["model.config.hidden_size=32", "model.config.depth=1", "model.config.num_heads=2"],
    "autoencoder_kl": ["model.config.channels=8", "model.config.groups=4"],
}
FAST = ["train.batch_size=8", "train.log_every=1", "train.sample_every=1000", "train.ckpt_every=1000",
        "train.warmup=1", "sample.steps=2", "sample.n=1"]
FAST_AUTOENCODER = [*FAST[:5], "autoencoder.scale_samples=16"]


def tiny(name: str, out: Path, *extra: str):
    cfg = load_config(CONFIGS / name)
    fast = FAST_AUTOENCODER if cfg.model.type.startswith("autoencoder") else FAST
    return load_config(CONFIGS / name, TINY[cfg.model.type] + fast + [f"train.out_dir={json.dumps(str(out))}", *extra])


def log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def weights(out: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(out / "checkpoints" / f"step_{step:07d}" / "trainer.safetensors")


def test_presets_load_and_build():
    from diffusekit.models import build

    names = sorted(p.name for p in CONFIGS.glob("*.toml"))
    assert {"mnist_unet.toml", "mnist_autoencoder.toml", "mnist_ldm.toml", "shapes_autoencoder.toml",
            "shapes_ldm.toml", "mnist_dit.toml"} <= set(names)
    for name in names:
        cfg = load_config(CONFIGS / name)
        net = build(cfg.model.type, cfg.model.config, device="meta")
        assert sum(p.numel() for p in net.parameters()) > 0


@pytest.fixture(scope="module")
def autoencoders(tmp_path_factory):
    """Tiny trained-for-a-few-steps autoencoders for the latent presets."""
    root = tmp_path_factory.mktemp("ae")
    extra = {"mnist": [], "shapes": ["data.size=32"]}
    return {name: train_autoencoder(tiny(f"{name}_autoencoder.toml", root / name, "train.steps=3",
                                         "autoencoder.disc_start=1", *extra[name]))
            for name in ("mnist", "shapes")}


@pytest.mark.parametrize("preset", ["mnist_unet.toml", "mnist_dit.toml", "mnist_ldm.toml", "shapes_ldm.toml",
                                    "shape_maps.toml", "shape_layouts.toml", "shape_captions.toml"])
def test_preset_trains_and_samples(preset, autoencoders, tmp_path):
    extra = ["train.steps=3", "train.sample_every=3"]
    if "ldm" in preset:
        extra.append(f"latent.autoencoder={json.dumps(str(autoencoders[preset.split('_')[0]]))}")
    if "shape" in preset:
        extra.append("data.size=64")
    tmp_path = tmp_path / "run"  # a run folder that does not exist yet
    model = diffusion.train(tiny(preset, tmp_path, *extra))
    rows = log(tmp_path)
    assert [r["step"] for r in rows] == [1, 2, 3] and all(r["loss"] == r["loss"] for r in rows)
    assert (tmp_path / "samples" / "step_0000003.png").is_file() and (tmp_path / "loss.png").is_file()
    assert (model / "model.safetensors").is_file()
    assert (model / "autoencoder").is_dir() == ("ldm" in preset)
    assert load_pipeline(model).map_classes == (MAP_CLASSES if preset == "shape_maps.toml" else ())
    assert load_pipeline(model).layout_classes == (MAP_CLASSES[1:] if preset == "shape_layouts.toml" else ())


def test_autoencoder_trainer_adversarial_start_and_scaling(autoencoders, tmp_path):
    out = tmp_path / "ae"
    model = train_autoencoder(tiny("mnist_autoencoder.toml", out, "train.steps=4", "autoencoder.disc_start=2"))
    rows = log(out)
    assert "g_loss" not in rows[0] and "g_loss" in rows[-1] and "d_loss" in rows[-1]
    cfg = json.loads((model / "config.json").read_text())
    from diffusekit.checkpoints import from_pretrained
    from diffusekit.data import MNIST

    ae = from_pretrained(model)
    z = ae.to_latent(MNIST(32, pad=2).images[:16])
    assert abs(z.std().item() - 1) < 1e-4 and cfg["config"]["scaling_factor"] > 0


def test_overfitting_a_handful_of_images_lowers_the_loss(tmp_path):
    cfg = tiny("mnist_unet.toml", tmp_path, "train.steps=80", "data.holdout=9992", "train.lr=3e-3",
               "diffusion.min_snr_gamma=0", "model.config.channels=16", "train.log_every=10")
    diffusion.train(cfg)
    losses = [r["loss"] for r in log(tmp_path)]
    assert losses[-1] < 0.6 * losses[0], losses


def test_resume_is_bit_exact(tmp_path):
    args = ["train.ckpt_every=3", "model.config.dropout=0.1"]  # dropout draws from the global RNG
    diffusion.train(tiny("mnist_unet.toml", tmp_path / "a", "train.steps=6", *args))
    diffusion.train(tiny("mnist_unet.toml", tmp_path / "b", "train.steps=3", *args))
    diffusion.train(tiny("mnist_unet.toml", tmp_path / "b", "train.steps=6", *args))
    a, b = weights(tmp_path / "a", 6), weights(tmp_path / "b", 6)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    diffusion.train(tiny("mnist_unet.toml", tmp_path / "c", "train.steps=6", "train.seed=1", *args))
    c = weights(tmp_path / "c", 6)  # negative control: another seed gives other weights
    assert not all(torch.equal(a[k], c[k]) for k in a if k.startswith("model."))


def test_interrupt_checkpoints_at_a_step_boundary_and_resumes(tmp_path, monkeypatch):
    diffusion.train(tiny("mnist_unet.toml", tmp_path / "a", "train.steps=5"))
    ema = diffusion.update_ema
    calls = []

    def interrupting_ema(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C in the middle of step 3
        ema(*a, **k)

    monkeypatch.setattr(diffusion, "update_ema", interrupting_ema)
    with pytest.raises(KeyboardInterrupt, match="stopped at step 3"):
        diffusion.train(tiny("mnist_unet.toml", tmp_path / "b", "train.steps=5"))
    assert latest_checkpoint(tmp_path / "b" / "checkpoints").name == "step_0000003"
    monkeypatch.setattr(diffusion, "update_ema", ema)
    diffusion.train(tiny("mnist_unet.toml", tmp_path / "b", "train.steps=5"))
    a, b = weights(tmp_path / "a", 5), weights(tmp_path / "b", 5)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_nan_loss_is_an_error_naming_the_step(tmp_path, monkeypatch):
    monkeypatch.setattr(NetworkDenoiser, "loss", lambda self, x0, *a, **k: self.net(x0, torch.zeros(len(x0)),
                        class_labels=torch.zeros(len(x0), dtype=torch.long)).mean() * float("nan"))
    with pytest.raises(FloatingPointError, match="loss is nan at step 1"):
        diffusion.train(tiny("mnist_unet.toml", tmp_path, "train.steps=3"))


def test_checkpoints_keep_the_last_k_and_ignore_partial_ones(tmp_path):
    diffusion.train(tiny("mnist_unet.toml", tmp_path, "train.steps=4", "train.ckpt_every=1", "train.keep_last=2"))
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step_0000003", "step_0000004"]
    (root / ".tmp-step_0000005-1").mkdir()  # what a crash during a save leaves behind
    (root / "step_0000009").mkdir()  # a folder without trainer.json is not a checkpoint
    assert latest_checkpoint(root).name == "step_0000004"


@pytest.mark.skipif(sys.platform != "linux", reason="torchrun with gloo")
@pytest.mark.parametrize("preset", ["mnist_unet.toml", "mnist_ldm.toml"])
def test_two_processes_equal_one(tmp_path, preset, autoencoders):
    """Each process draws its samples' noise and encodes (latent models: posterior samples) only its slice.
    In float32: bf16 autocast rounds each process's half-batch activations differently from the whole's."""
    cfg = CONFIGS / preset
    latent = [f"latent.autoencoder={json.dumps(str(autoencoders['mnist']))}", "latent.cache=false"] if "ldm" in preset else []
    sets = [f"--set={s}" for s in TINY["unet"] + FAST + ["train.steps=3", "train.ckpt_every=3",
                                                          "train.mixed_precision='no'", *latent]]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517",
                    "-m", "diffusekit.cli", "train", str(cfg), *sets, f"--set=train.out_dir={json.dumps(str(tmp_path / 'ddp'))}"],
                   check=True, env=env, capture_output=True)
    main(["train", str(cfg), *sets, f"--set=train.out_dir={json.dumps(str(tmp_path / 'one'))}"])
    a, b = weights(tmp_path / "ddp", 3), weights(tmp_path / "one", 3)
    for k in a:
        if k.startswith(("model.", "ema.")):
            torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4, msg=k)


def test_unknown_config_key_names_it(tmp_path, capsys):
    with pytest.raises(SystemExit, match="unknown config key 'train.learning_rate'.*'lr'"):
        main(["train", str(CONFIGS / "mnist_unet.toml"), "--set", "train.learning_rate=1"])
    with pytest.raises(SystemExit, match="unknown config key 'dat'"):
        main(["train", str(CONFIGS / "mnist_unet.toml"), "--set", "dat.resolution=1"])


def test_bf16_autocast_accumulation_offset_noise_and_flow_targets(tmp_path):
    """The remaining trainer options run and learn: bf16 autocast, 2 accumulated micro-batches, offset
    noise, logit-normal times, rectified flow with a velocity target."""
    cfg = tiny("mnist_unet.toml", tmp_path, "train.steps=30", "train.mixed_precision='bf16'", "train.grad_accum=2",
               "diffusion.offset_noise=0.1", "diffusion.schedule='flow'", "diffusion.prediction='flow'",
               "diffusion.timestep_scale=1000.0", "diffusion.t_sampling='logit_normal'", "train.lr=3e-3",
               "train.log_every=10", "data.holdout=9984", "sample.sampler='euler'", "train.sample_every=30")
    diffusion.train(cfg)
    losses = [r["loss"] for r in log(tmp_path)]
    assert len(losses) == 3 and losses[-1] < losses[0], losses
    assert (tmp_path / "samples" / "step_0000030.png").is_file()


@pytest.mark.parametrize("native", [torch.bfloat16, None])
def test_auto_mixed_precision_is_bf16_where_the_device_computes_it_natively(tmp_path, monkeypatch, native):
    monkeypatch.setattr(loop, "native_dtype", lambda device: native)
    losses = {}
    for precision in ("auto", "bf16", "no"):
        diffusion.train(tiny("mnist_unet.toml", tmp_path / precision, "train.steps=2", "train.log_every=1",
                        f"train.mixed_precision='{precision}'"))
        losses[precision] = [r["loss"] for r in log(tmp_path / precision)]
    same, other = ("bf16", "no") if native else ("no", "bf16")
    assert losses["auto"] == losses[same] and losses["auto"] != losses[other]


def test_one_source_of_diffusion_settings():
    from dataclasses import fields

    from diffusekit.denoisers import DiffusionSettings
    from diffusekit.training.config import DiffusionSection

    section = load_config(CONFIGS / "mnist_ldm.toml").diffusion
    assert isinstance(section, DiffusionSettings) and section.settings() == DiffusionSettings(
        **{f.name: getattr(section, f.name) for f in fields(DiffusionSettings)})
    base = DiffusionSection()
    assert all(getattr(base, f.name) == getattr(DiffusionSettings(), f.name) for f in fields(DiffusionSettings))


@pytest.mark.parametrize("key", ["train.ema_decay=0.9", "train.grad_accum=2", "train.mixed_precision='bf16'",
                                 "train.betas=[0.9, 0.99]", "train.compile=true", "sample.steps=2"])
def test_the_autoencoder_trainer_has_no_keys_it_would_ignore(key):
    with pytest.raises(ValueError, match="unknown config key"):
        load_config(CONFIGS / "mnist_autoencoder.toml", [key])


def test_per_sample_randomness_does_not_depend_on_the_split():
    from diffusekit.schedules import VPSchedule
    from diffusekit.training.config import DiffusionSection

    d, schedule = DiffusionSection(offset_noise=0.1), VPSchedule.named("linear")
    whole = diffusion.draw(0, 5, range(0, 8), (1, 4, 4), schedule, d, posterior=True)
    halves = [diffusion.draw(0, 5, r, (1, 4, 4), schedule, d, posterior=True) for r in (range(0, 4), range(4, 8))]
    assert all(torch.equal(whole[k], torch.cat([h[k] for h in halves])) for k in whole)
    assert not torch.equal(whole["eps"], diffusion.draw(0, 6, range(0, 8), (1, 4, 4), schedule, d, True)["eps"])
    procs = loop.Processes(rank=1, world=2)
    local = procs.shard({"image": torch.arange(8), "caption": list("abcdefgh")})
    assert torch.equal(local["image"], torch.arange(4, 8)) and local["caption"] == list("efgh")
    assert procs.positions(8, offset=16) == range(20, 24)


def test_vq_latent_diffusion_trains_with_cached_latents(tmp_path):
    vq = train_autoencoder(tiny("mnist_autoencoder.toml", tmp_path / "vq", "train.steps=2", "model.type='autoencoder_vq'",
                                "model.config.embed_dim=4", "model.config.num_embeddings=16"))
    model = diffusion.train(tiny("mnist_ldm.toml", tmp_path / "ldm", "train.steps=2", "latent.cache=true",
                            f"latent.autoencoder={json.dumps(str(vq))}"))
    cache = load_file(tmp_path / "ldm" / "latents.safetensors")
    assert cache["std"].abs().max() == 0 and (model / "autoencoder" / "config.json").is_file()
