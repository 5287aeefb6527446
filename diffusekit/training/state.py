"""Training checkpoints: everything a run needs to continue bit-exactly, without pickle.

A checkpoint is a folder `step_0001000/` with trainer.safetensors (the named modules' and optimizers'
tensors, RNG states) and trainer.json (step, data position, optimizer scalars, config). It is written to a
temporary folder and renamed into place, so a crash never leaves a half-written checkpoint; the
last `keep` checkpoints are kept.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from ..checkpoints import CheckpointError, check_state, replace_dir


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
    all but the newest `keep`."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{progress.step:07d}"
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    tensors = {f"{name}.{k}": v for name, m in modules.items() for k, v in m.state_dict().items()}
    opt_meta = {}
    for name, opt in optimizers.items():
        opt_tensors, opt_meta[name] = _optimizer_tensors(opt, name)
        tensors.update(opt_tensors)
    tensors.update({"rng.train": generator.get_state(), "rng.torch": torch.get_rng_state()})
    if torch.cuda.is_available():
        tensors.update({f"rng.cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp / "trainer.safetensors")
    meta = {"progress": asdict(progress), "optimizers": opt_meta, "config": config,
            "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None}
    (tmp / "trainer.json").write_text(json.dumps(meta, indent=1))
    replace_dir(tmp, final)
    for old in sorted(root.glob("step_*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(root: Path) -> Path | None:
    """The newest complete checkpoint folder under root, if any."""
    done = [p for p in sorted(root.glob("step_*")) if (p / "trainer.json").is_file()]
    return done[-1] if done else None


def load_checkpoint(path: Path, modules: dict[str, nn.Module], optimizers: dict[str, torch.optim.Optimizer],
                    generator: torch.Generator, scaler: Any = None) -> Progress:
    """Restore everything `save_checkpoint` wrote; returns the progress to continue from."""
    try:
        meta = json.loads((path / "trainer.json").read_text())
        tensors = load_file(path / "trainer.safetensors")
    except (OSError, ValueError) as e:
        raise CheckpointError(f"training checkpoint {path} is unreadable: {e}") from e
    for name, module in modules.items():
        device = next(module.parameters()).device
        state = {k[len(name) + 1:]: v.to(device) for k, v in tensors.items() if k.startswith(name + ".")}
        check_state(module, state, f"{path} ({name})")
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
