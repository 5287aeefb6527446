"""What every converter shares: option checks, key renaming by rules (with q / k / v fusing), and reading a
diffusers model folder into one of our models built on the meta device.

A rule is (pattern, replacement): the pattern must match a whole key; the replacement is a regex template or a
function of the match. A rule that renames a key to `<module>.<param>#<part>` marks one slice of a fused
projection; `rename_keys` concatenates the slices in the order the module's name spells them (`qkv`: q, k, v;
`kv`: k, v).
"""

from __future__ import annotations

import json
import re
import reprlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from ..checkpoints import CheckpointError, load_weights, read_state_dict
from ..models import build

Rule = tuple[str, str | Callable[[re.Match], str | None]]
KEEP: Rule = (r".+", r"\g<0>")  # a last rule that passes unknown keys through, so that load_weights names them
PART = "#"

# diffusers' Attention with a group norm (pixel UNets, the autoencoder's mid-block), current and deprecated
# names -> layers.SpatialSelfAttention
SPATIAL_ATTENTION: list[Rule] = [
    (r"group_norm\.(\w+)", r"norm.\1"),
    (r"to_([qkv])\.(\w+)", r"attn.qkv.\2#\1"),
    (r"(query|key|value)\.(\w+)", lambda m: f"attn.qkv.{m[2]}#{m[1][0]}"),
    (r"(?:to_out\.0|proj_attn)\.(\w+)", r"attn.out.\1"),
]
# diffusers' FeedForward -> layers.FeedForward
FEED_FORWARD: list[Rule] = [(r"net\.0\.proj\.(\w+)", r"proj_in.\1"), (r"net\.2\.(\w+)", r"proj_out.\1")]


def unsupported(model: str, key: str, value: Any, allowed: Any) -> CheckpointError:
    return CheckpointError(f"{model}: option {key}={reprlib.repr(value)} is not supported (supported: {allowed!r})")


def check_options(cfg: Mapping[str, Any], allowed: Mapping[str, tuple], model: str) -> None:
    """CheckpointError naming the first option of a diffusers config whose value is not allowed (a missing option
    counts as its first allowed value; a per-level list as its value when all levels agree)."""
    for key, values in allowed.items():
        value = cfg.get(key, values[0])
        if (value[0] if isinstance(value, (list, tuple)) and len(set(value)) == 1 else value) not in values:
            raise unsupported(model, key, value, values)


def rename_key(key: str, rules: Sequence[Rule]) -> str | None:
    """`key` renamed by the first rule whose pattern matches it whole (a replacement function returning None
    passes it on to the next rule); None if no rule knows it."""
    for pattern, repl in rules:
        if (m := re.fullmatch(pattern, key)) and (new := m.expand(repl) if isinstance(repl, str) else repl(m)):
            return new
    return None


def nested(prefix: str, rules: Sequence[Rule]) -> Callable[[re.Match], str | None]:
    """A replacement: `prefix` (a template on the match) joined to the match's last group renamed by `rules`."""
    def repl(m: re.Match) -> str | None:
        rest = rename_key(m[m.lastindex], rules)
        return None if rest is None else f"{m.expand(prefix)}.{rest}"

    return repl


def rename_keys(state: Mapping[str, Tensor], rules: Sequence[Rule], source: str) -> dict[str, Tensor]:
    """Rename every key by `rename_key` and concatenate the marked slices of fused projections. CheckpointError
    for keys that no rule knows (end the rules with KEEP to pass them through), for keys that map to one name
    (old and new names mixed) and for fused projections with missing slices."""
    names = {k: rename_key(k, rules) for k in state}
    unknown = [k for k, n in names.items() if n is None]
    if unknown:
        raise CheckpointError(f"{source}: {len(unknown)} unknown keys: {', '.join(unknown[:8])}")
    if len(set(names.values())) < len(names):
        raise CheckpointError(f"{source}: several keys map to the same parameter (old and new names mixed?)")
    out: dict[str, Tensor] = {}
    parts: dict[str, dict[str, Tensor]] = {}
    for key, value in state.items():
        name, _, part = names[key].partition(PART)
        if part:
            parts.setdefault(name, {})[part] = value
        else:
            out[name] = value
    for name, p in parts.items():
        order = name.split(".")[-2]  # qkv or kv
        if sorted(p) != sorted(order):
            raise CheckpointError(f"{source}: {name} lacks {sorted(set(order) - set(p))} (the checkpoint has only "
                                  f"the {sorted(p)} parts)")
        if name in out:
            raise CheckpointError(f"{source}: {name} is in the checkpoint both fused and in parts")
        out[name] = torch.cat([p[c] for c in order])
    return out


def strip_prefix(sd: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """The entries of a single-file checkpoint under `prefix`, without it (no tensor is copied)."""
    state = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    if not state:
        raise CheckpointError(f"checkpoint has no {prefix}* keys (not an original Stable Diffusion file?)")
    return state


def linear_from_conv(state: dict[str, Tensor], pattern: str) -> dict[str, Tensor]:
    """1x1-conv weights [O, I, 1, 1] of the keys matching `pattern` as the same linear maps [O, I]."""
    for key, w in state.items():
        if w.ndim == 4 and w.shape[2:] == (1, 1) and re.fullmatch(pattern, key):
            state[key] = w.flatten(1)
    return state


def assign(model_type: str, config: Any, state: Mapping[str, Tensor], source: str,
           dtype: torch.dtype | None = None) -> nn.Module:
    """Our model built on the meta device with the converted `state` assigned to it (then cast to `dtype`)."""
    model = load_weights(build(model_type, config, device="meta"), state, source=source)
    return model.to(dtype) if dtype else model


def read_json(path: Path, what: str) -> dict[str, Any]:
    """A JSON file of a checkpoint folder; CheckpointError saying the folder is not `what` if it is unreadable."""
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path.parent} is not a {what} (no readable {path.name}: {e})") from e


def with_variant(name: str, variant: str | None) -> str:
    """diffusers' file naming: the variant goes before the last suffix (model.safetensors -> model.fp16.safetensors)."""
    stem, _, suffix = name.rpartition(".")
    return f"{stem}.{variant}.{suffix}" if variant else name


def read_diffusers_weights(folder: Path, device: str, variant: str | None = None,
                           dtype: torch.dtype | None = None) -> dict[str, Tensor]:
    """diffusion_pytorch_model[.variant].safetensors of a diffusers model folder, or all shards of its index, read
    lazily into `dtype`."""
    index = folder / with_variant("diffusion_pytorch_model.safetensors.index.json", variant)
    if not index.is_file():
        return read_state_dict(folder / with_variant("diffusion_pytorch_model.safetensors", variant), device, dtype)
    state: dict[str, Tensor] = {}
    for shard in sorted(set(read_json(index, "sharded checkpoint")["weight_map"].values())):
        state.update(read_state_dict(folder / shard, device, dtype))
    return state


@dataclass(frozen=True)
class DiffusersModel:
    """How diffusers model classes convert to one of ours: our model type, the config and state-dict converters
    (state_from(state, our_config)), and the subfolder a pipeline folder keeps the model in."""

    class_names: tuple[str, ...]
    subfolder: str
    model_type: str
    config_from: Callable[[dict], Any]
    state_from: Callable[[dict, Any], dict]

    def load(self, folder: str | Path, device: str = "cpu", dtype: torch.dtype | None = None,
             variant: str | None = None) -> nn.Module:
        """Our model from a diffusers model folder (or a pipeline folder holding it in `subfolder`): config.json
        converted, the model built on the meta device and the converted weights assigned to it."""
        folder = Path(folder)
        if not (folder / "config.json").is_file() and (folder / self.subfolder / "config.json").is_file():
            folder = folder / self.subfolder
        cfg = read_json(folder / "config.json", "diffusers model folder")
        if cfg.get("_class_name", self.class_names[0]) not in self.class_names:
            raise CheckpointError(f"{folder} holds a {cfg['_class_name']}, not a {' or '.join(self.class_names)}")
        config = self.config_from(cfg)
        state = self.state_from(read_diffusers_weights(folder, device, variant, dtype), config)
        return assign(self.model_type, config, state, str(folder), dtype)
