"""No run loses or mixes up a model: kills and full disks at any point, NaN divergence, two trainers on
one folder, resuming with other settings, truncated checkpoints (issue 10)."""

import errno
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from diffusekit.checkpoints import from_pretrained, recover_dir, save_pretrained
from diffusekit.training import diffusion, state
from diffusekit.training.state import RunFolder, latest_checkpoint
from tests.test_training import log, tiny, weights


def run(out, *extra):
    return diffusion.train(tiny("mnist_unet.toml", out, *extra))


def ema_of(out, step):
    return {k[4:]: v for k, v in weights(out, step).items() if k.startswith("ema.")}


def assert_model_is(model, expected):
    got = load_file(model / "model.safetensors")
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)


def test_rerun_after_a_failed_export_exports_the_last_checkpoint(tmp_path, monkeypatch):
    run(tmp_path, "train.steps=2", "train.ckpt_every=1")
    export = diffusion.save_pipeline

    def disk_full(pipe, path, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(diffusion, "save_pipeline", disk_full)
    with pytest.raises(OSError, match="No space"):
        run(tmp_path, "train.steps=3", "train.ckpt_every=1")  # checkpoint 3 written, export fails
    assert latest_checkpoint(tmp_path / "checkpoints").name == "step_0000003"
    monkeypatch.setattr(diffusion, "save_pipeline", export)
    model = run(tmp_path, "train.steps=3", "train.ckpt_every=1")  # nothing left to train: must still export
    assert_model_is(model, ema_of(tmp_path, 3))


def test_recover_dir_finishes_or_undoes_an_interrupted_replace(tmp_path):
    from diffusekit.models.unet import UNet, UNetConfig

    unet = UNet(UNetConfig(channels=8, channel_mult=(1,), num_res_blocks=1, norm_groups=4, attention_levels=(),
                           mid_attention=False, context_dim=None))
    path = save_pretrained(unet, tmp_path / "model")
    with torch.no_grad():
        next(unet.parameters()).add_(1)
    save_pretrained(unet, tmp_path / "staged")
    # killed between the renames: the old folder moved aside, the complete new one not yet in place
    os.replace(path, tmp_path / ".model.old-111")
    os.replace(tmp_path / "staged", tmp_path / ".model.tmp-111")
    recover_dir(path)
    assert torch.equal(next(from_pretrained(path).parameters()), next(unet.parameters()))
    assert [p.name for p in tmp_path.iterdir()] == ["model"]
    # killed before the new folder was complete: the current one stays, the partial one is dropped
    (tmp_path / ".model.tmp-222").mkdir()
    recover_dir(path)
    assert [p.name for p in tmp_path.iterdir()] == ["model"]
    # only the old folder left: it is restored rather than leaving no model at all
    os.replace(path, tmp_path / ".model.old-333")
    recover_dir(path)
    assert (path / "model.safetensors").is_file() and [p.name for p in tmp_path.iterdir()] == ["model"]


def test_a_run_folder_left_between_renames_is_repaired_on_start(tmp_path):
    model = run(tmp_path, "train.steps=2")
    os.replace(model, tmp_path / ".model.old-1")
    with RunFolder(tmp_path):
        assert (model / "model.safetensors").is_file() and not (tmp_path / ".model.old-1").exists()


def test_nan_weights_are_never_checkpointed_or_exported(tmp_path, monkeypatch):
    ema = diffusion.update_ema
    calls = []

    def diverging(ema_net, net, decay):
        calls.append(1)
        if len(calls) == 3:
            with torch.no_grad():
                next(net.parameters()).fill_(float("nan"))
        ema(ema_net, net, decay)

    monkeypatch.setattr(diffusion, "update_ema", diverging)
    with pytest.raises(FloatingPointError, match=r"not finite at step 3 .*Last finite checkpoint: .*step_0000002"):
        run(tmp_path, "train.steps=5", "train.ckpt_every=1", "train.keep_last=2", "train.log_every=100")
    ckpts = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert ckpts == ["step_0000001", "step_0000002"]
    assert all(v.isfinite().all() for v in weights(tmp_path, 2).values() if v.is_floating_point())
    assert all(v.isfinite().all() for v in load_file(tmp_path / "model" / "model.safetensors").values())


def test_a_second_trainer_on_the_same_folder_is_refused(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from diffusekit.training.state import RunFolder\n"
                               f"with RunFolder({str(tmp_path)!r}):\n print('locked', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(ValueError, match=f"in use by another training process \\(pid {holder.pid}\\)"):
            run(tmp_path, "train.steps=1")
        assert not (tmp_path / "checkpoints").exists()
    finally:
        holder.kill()
        holder.wait()
    run(tmp_path, "train.steps=1")  # the lock goes with its process


def test_resuming_with_other_settings_needs_force(tmp_path):
    run(tmp_path, "train.steps=2")
    with pytest.raises(ValueError, match=r"train.batch_size: 8 -> 4.*--force"):
        run(tmp_path, "train.steps=3", "train.batch_size=4")
    with pytest.raises(ValueError, match=r"model.config.channels: 8 -> 16"):
        run(tmp_path, "train.steps=3", "model.config.channels=16")
    diffusion.train(tiny("mnist_unet.toml", tmp_path, "train.steps=3", "train.batch_size=4"), force=True)
    assert latest_checkpoint(tmp_path / "checkpoints").name == "step_0000003"


def test_leftovers_are_cleaned_and_replayed_steps_not_logged_twice(tmp_path):
    run(tmp_path, "train.steps=2")
    with open(tmp_path / "log.jsonl", "a") as f:  # a run that logged step 3, then was killed mid-line
        f.write('{"step": 3, "loss": 1.0}\n{"step": 4, "lo')
    (tmp_path / "checkpoints" / ".tmp-step_0000004-99").mkdir()
    run(tmp_path, "train.steps=4")
    assert [r["step"] for r in log(tmp_path)] == [1, 2, 3, 4]
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))


@pytest.mark.parametrize("damage", ["truncate", "empty", "empty_json"])
def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, damage):
    run(tmp_path / "a", "train.steps=4", "train.ckpt_every=2")
    run(tmp_path / "b", "train.steps=4", "train.ckpt_every=2")
    last = tmp_path / "b" / "checkpoints" / "step_0000004"
    if damage == "empty_json":
        (last / "trainer.json").write_text("")
    else:
        data = (last / "trainer.safetensors").read_bytes()
        (last / "trainer.safetensors").write_bytes(data[:len(data) // 2] if damage == "truncate" else b"")
    with pytest.warns(UserWarning, match="step_0000004 is unreadable.*falling back"):
        run(tmp_path / "b", "train.steps=4", "train.ckpt_every=2")
    a, b = weights(tmp_path / "a", 4), weights(tmp_path / "b", 4)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_full_disk_during_a_checkpoint_keeps_the_previous_one_and_resumes_exactly(tmp_path, monkeypatch):
    run(tmp_path / "a", "train.steps=4", "train.ckpt_every=2")
    save = state.save_file
    calls = []

    def full(tensors, path, *a, **k):
        calls.append(1)
        if len(calls) == 2:  # the second checkpoint
            with open(path, "wb") as f:
                f.write(b"\0" * 100)
            raise OSError(errno.ENOSPC, "No space left on device")
        save(tensors, path, *a, **k)

    monkeypatch.setattr(state, "save_file", full)
    with pytest.raises(OSError, match="No space"):
        run(tmp_path / "b", "train.steps=4", "train.ckpt_every=2")
    assert sorted(p.name for p in (tmp_path / "b" / "checkpoints").iterdir()) == ["step_0000002"]
    monkeypatch.setattr(state, "save_file", save)
    run(tmp_path / "b", "train.steps=4", "train.ckpt_every=2")
    a, b = weights(tmp_path / "a", 4), weights(tmp_path / "b", 4)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.skipif(sys.platform != "linux", reason="POSIX signals")
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_a_killed_cli_run_resumes_bit_exactly(tmp_path, sig):
    from tests.test_training import CONFIGS, FAST, TINY

    sets = [f"--set={s}" for s in TINY["unet"] + FAST + ["train.steps=20", "train.ckpt_every=5"]]
    cmd = [sys.executable, "-m", "diffusekit.cli", "train", str(CONFIGS / "mnist_unet.toml"), *sets]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(cmd + [f"--set=train.out_dir={str(tmp_path / 'a')!r}"], check=True, env=env, capture_output=True)
    proc = subprocess.Popen(cmd + [f"--set=train.out_dir={str(tmp_path / 'b')!r}"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while latest_checkpoint(tmp_path / "b" / "checkpoints") is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(sig)
    _, err = proc.communicate()
    if sig == signal.SIGTERM:
        assert proc.returncode != 0 and "checkpoint saved" in err
    subprocess.run(cmd + [f"--set=train.out_dir={str(tmp_path / 'b')!r}"], check=True, env=env, capture_output=True)
    a, b = weights(tmp_path / "a", 20), weights(tmp_path / "b", 20)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["step"] for r in log(tmp_path / "b")] == list(range(1, 21))


@pytest.mark.skipif(sys.platform != "linux", reason="POSIX signals")
def test_chaos_ten_sigkills_at_random_moments_resume_bit_exactly(tmp_path):
    """A run SIGKILLed at 10 random moments (while importing, training, checkpointing or exporting) and resumed each
    time ends with the weights of an uninterrupted run and a log of exactly steps 1..N."""
    import random

    from tests.test_training import CONFIGS, FAST, TINY

    sets = [f"--set={s}" for s in TINY["unet"] + FAST + ["train.steps=16", "train.ckpt_every=2"]]
    cmd = [sys.executable, "-m", "diffusekit.cli", "train", str(CONFIGS / "mnist_unet.toml"), *sets]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(cmd + [f"--set=train.out_dir={str(tmp_path / 'a')!r}"], check=True, env=env, capture_output=True)
    rng, b = random.Random(0), cmd + [f"--set=train.out_dir={str(tmp_path / 'b')!r}"]
    for _ in range(10):
        proc = subprocess.Popen(b, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(2.0, 6.0))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    subprocess.run(b, check=True, env=env, capture_output=True)
    a, b_ = weights(tmp_path / "a", 16), weights(tmp_path / "b", 16)
    assert a.keys() == b_.keys() and all(torch.equal(a[k], b_[k]) for k in a)
    assert [r["step"] for r in log(tmp_path / "b")] == list(range(1, 17))
    assert_model_is(tmp_path / "b" / "model", {k[4:]: v for k, v in a.items() if k.startswith("ema.")})
