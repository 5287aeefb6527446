"""Training checkpoints: everything a run needs to continue bit-exactly, without pickle.

A checkpoint is a folder `step_0001000/` with trainer.safetensors (the named modules' and optimizers'
tensors, RNG states) and trainer.json (step, data position, optimizer scalars, config). It is written to a
temporary folder and renamed into place, so a crash never leaves a half-written checkpoint; weights
that are not finite are never saved, and the last `keep` checkpoints are kept.

`RunFolder` owns a run's folder for the length of a run: an exclusive lock (a second trainer on the
same folder is an error), repair of what a kill or a full disk left behind, resumption from the newest
intact checkpoint with settings that fit it, and the log.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from ..checkpoints import CheckpointError, check_state, recover_dir, staging_dir
from ..tensorfiles import first_non_finite

try:
    import fcntl
except ImportError:  # pragma: no cover (Windows: no lock)
    fcntl = None

# Settings that may change when a run resumes; any other difference needs --force.
RESUMABLE = ("train.steps", "train.log_every", "train.sample_every", "train.ckpt_every", "train.keep_last",
             "train.device", "train.tensorboard", "train.compile", "train.out_dir", "data.num_workers", "sample.")


@dataclass
class Progress:
    """Where a run stands: optimizer steps done and the position in the data order."""

    step: int = 0
    epoch: int = 0
    batch: int = 0  # batches of the current epoch consumed


def _optimizer_tensors(opt: torch.optim.Optimizer, name: str) -> tuple[dict[str, Tensor], dict[str, Any]]:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"optim.{name}.{pid}.{k}"] = v
            else:
                scalars.setdefault(str(pid), {})[k] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _restore_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
    state: dict[int, dict[str, Any]] = {}
    for key, v in tensors.items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = v
    for pid, sc in meta["scalars"].items():
        state.setdefault(int(pid), {}).update(sc)
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_checkpoint(root: Path, progress: Progress, modules: dict[str, nn.Module],
                    optimizers: dict[str, torch.optim.Optimizer], generator: torch.Generator, config: dict[str, Any],
                    scaler: Any = None, keep: int = 3) -> Path:
    """Write root/step_XXXXXXX atomically (named modules and optimizers, RNG states, progress) and prune
    all but the newest `keep`. Non-finite weights raise FloatingPointError and leave the folder as it was."""
    tensors = {f"{name}.{k}": v for name, m in modules.items() for k, v in m.state_dict().items()}
    bad = first_non_finite(tensors)
    if bad is not None:
        raise FloatingPointError(f"weights are not finite at step {progress.step} ({bad}); not saved. Last finite "
                                 f"checkpoint: {latest_checkpoint(root)}")
    opt_meta = {}
    for name, opt in optimizers.items():
        opt_tensors, opt_meta[name] = _optimizer_tensors(opt, name)
        tensors.update(opt_tensors)
    tensors.update({"rng.train": generator.get_state(), "rng.torch": torch.get_rng_state()})
    if torch.cuda.is_available():
        tensors.update({f"rng.cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    meta = {"progress": asdict(progress), "optimizers": opt_meta, "config": config,
            "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None}
    final = root / f"step_{progress.step:07d}"
    with staging_dir(final) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp / "trainer.safetensors")
        (tmp / "trainer.json").write_text(json.dumps(meta, indent=1))
    for old in checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def checkpoints(root: Path) -> list[Path]:
    """Checkpoint folders under root (those with a trainer.json), oldest first."""
    return [p for p in sorted(root.glob("step_*")) if (p / "trainer.json").is_file()]


def latest_checkpoint(root: Path) -> Path | None:
    """The newest checkpoint folder under root, if any."""
    done = checkpoints(root)
    return done[-1] if done else None


def read_checkpoint(path: Path) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """(trainer.json, trainer.safetensors) of a checkpoint; CheckpointError if either is unreadable."""
    try:
        return json.loads((path / "trainer.json").read_text()), load_file(path / "trainer.safetensors")
    except Exception as e:  # OSError, JSONDecodeError, SafetensorError (truncated or empty files)
        raise CheckpointError(f"training checkpoint {path} is unreadable: {e}") from e


def load_checkpoint(meta: dict[str, Any], tensors: dict[str, Tensor], modules: dict[str, nn.Module],
                    optimizers: dict[str, torch.optim.Optimizer], generator: torch.Generator,
                    scaler: Any = None) -> Progress:
    """Restore everything `save_checkpoint` wrote, from what `read_checkpoint` read of it; returns the
    progress to continue from."""
    for name, module in modules.items():
        device = next(module.parameters()).device
        state = {k[len(name) + 1:]: v.to(device) for k, v in tensors.items() if k.startswith(name + ".")}
        check_state(module, state, f"checkpoint step {meta['progress']['step']} ({name})")
        module.load_state_dict(state)
    for name, opt in optimizers.items():
        device = opt.param_groups[0]["params"][0].device
        prefix = f"optim.{name}."
        _restore_optimizer(opt, {k[len(prefix):]: v.to(device) for k, v in tensors.items() if k.startswith(prefix)},
                           meta["optimizers"][name])
    generator.set_state(tensors["rng.train"])
    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("rng.cuda.")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    if scaler is not None and meta.get("scaler"):
        scaler.load_state_dict(meta["scaler"])
    return Progress(**meta["progress"])


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v})
    return out


def config_changes(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """'key: old -> new' for every setting that differs and may not change on resume (`RESUMABLE`)."""
    old, new = _flatten(saved), _flatten(json.loads(json.dumps(current)))
    return [f"{k}: {old.get(k, '(unset)')} -> {new.get(k, '(unset)')}" for k in sorted(old.keys() | new.keys())
            if old.get(k) != new.get(k) and not k.startswith(RESUMABLE)]


class RunFolder:
    """A run's folder `out`, held under an exclusive lock while the run lasts (by the main process)."""

    def __init__(self, out: str | Path, main: bool = True):
        self.out, self.main, self._lock = Path(out), main, None
        self.ckpt_dir = self.out / "checkpoints"

    def __enter__(self) -> "RunFolder":
        if self.main:
            self.out.mkdir(parents=True, exist_ok=True)
            self._lock = open(self.out / ".lock", "a+")
            try:
                if fcntl is not None:
                    fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                self._lock.seek(0)
                holder = self._lock.read().strip()
                self._lock.close()
                raise ValueError(f"run folder {self.out} is in use by another training process (pid {holder or '?'}); "
                                 "wait for it to finish or set another train.out_dir") from None
            self._lock.truncate(0)
            self._lock.write(str(os.getpid()))
            self._lock.flush()
            for tmp in self.ckpt_dir.glob(".tmp-step_*"):  # a checkpoint write cut off by a kill
                shutil.rmtree(tmp, ignore_errors=True)
            recover_dir(self.out / "model")
        return self

    def __exit__(self, *exc) -> None:
        if self._lock is not None:
            self._lock.close()

    def resume(self, modules: dict[str, nn.Module], optimizers: dict[str, torch.optim.Optimizer],
               generator: torch.Generator, config: dict[str, Any], scaler: Any = None, force: bool = False) -> Progress:
        """Continue from the newest readable checkpoint (older ones stand in, with a warning, for a
        truncated or empty one). Settings that differ from the checkpoint's, beyond `RESUMABLE` ones,
        are an error unless `force`. The log is cut back to the step resumed from."""
        progress = Progress()
        for path in reversed(checkpoints(self.ckpt_dir)):
            try:
                meta, tensors = read_checkpoint(path)
            except CheckpointError as e:
                warnings.warn(f"{e}; falling back to the previous checkpoint")
                continue
            changes = config_changes(meta["config"], config)
            if changes and not force:
                raise ValueError(f"cannot resume {path} with other settings ({'; '.join(changes)}); pass --force to "
                                 "resume anyway, --no-resume to start afresh, or set another train.out_dir")
            progress = load_checkpoint(meta, tensors, modules, optimizers, generator, scaler)
            if self.main:
                print(f"resuming from {path} (step {progress.step})")
            break
        self.truncate_log(progress.step)
        return progress

    def fresh(self) -> Progress:
        """Start from step 0 (the log of an earlier run here is cleared)."""
        self.truncate_log(0)
        return Progress()

    def write_config(self, config: dict[str, Any]) -> None:
        if self.main:
            atomic_write(self.out / "config.json", json.dumps(config, indent=1))

    def log(self, record: dict[str, Any]) -> None:
        """Append one record to log.jsonl."""
        with open(self.out / "log.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    def truncate_log(self, step: int) -> None:
        """Drop log records after `step` (steps that a resumed run will replay) and unreadable lines."""
        path = self.out / "log.jsonl"
        if self.main and path.is_file():
            atomic_write(path, "".join(line + "\n" for line in path.read_text().splitlines()
                                       if (row := read_record(line)) and row.get("step", 0) <= step))


def read_record(line: str) -> dict[str, Any] | None:
    """One log.jsonl record, or None for a blank or cut-off line."""
    try:
        return json.loads(line) if line.strip() else None
    except json.JSONDecodeError:
        return None


def atomic_write(path: Path, text: str) -> None:
    """Replace a file's text by way of a temporary file, so it is never seen half-written."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)
