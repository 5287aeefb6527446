"""`generate`: conditions -> task inputs -> guidance -> grid -> initial state -> sampler -> decode, each step a
function of its own that reads against that list."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch
from torch import Tensor

from .. import defaults
from ..denoisers import Denoiser
from ..guidance import CFG, ClassifierGuidance, Inpaint, NoisyClassifier, UpsampleGuidance, upsample_guidance_weight
from ..parametrization import Prediction
from ..samplers import Callback, get_sampler
from ..prompts import SYNTAXES
from ..schedules import img2img_grid
from .inputs import TaskInputs, check_inputs, encode_inputs, randn, upsample_factor

if TYPE_CHECKING:
    from .pipeline import Pipeline

OUTPUTS = ("image", "latent")


def generate(pipe: Pipeline, n: int, *, labels: Tensor | None = None, prompts: Sequence[str] | None = None,
             negative: Sequence[str] | None = None, prompt_syntax: str = defaults.PROMPT_SYNTAX,
             height: int | None = None, width: int | None = None, sampler: str = defaults.SAMPLER,
             steps: int = defaults.STEPS, cfg: float = defaults.CFG,
             spacing: str | None = None, cfg_until: float = defaults.CFG_UNTIL, cache: int = defaults.CACHE,
             cache_depth: int = defaults.CACHE_DEPTH, upsample_guidance: float | str | None = None,
             ug_eta: float = defaults.UG_ETA, interpolate_positions: bool = False,
             image: Tensor | None = None, strength: float = 1.0, mask: Tensor | None = None, mask_blur: int = 0,
             low_res: Tensor | None = None, semantic_map: Tensor | None = None, layout: Tensor | None = None,
             latents: Tensor | None = None, vae_tile: int | None = None,
             denoising_start: float = 0.0, denoising_end: float = 1.0, output: str = "image",
             original_size: tuple[int, int] | None = None, crop_top_left: tuple[int, int] = (0, 0),
             target_size: tuple[int, int] | None = None,
             generator: torch.Generator | None = None, wrap: Callable[[Denoiser], Denoiser] | None = None,
             classifier: NoisyClassifier | None = None, classifier_scale: float = 1.0,
             callback: Callback | None = None, progress: bool = False, **sampler_options: Any) -> Tensor:
    """Sample n images [n, C, H, W] in [-1, 1] (or, with output='latent', the diffusion state):
    conditions -> CFG -> inpainting -> Upsample Guidance -> (wrap) -> sampler -> decode.

    - text-to-image / class-conditional / unconditional: `prompts` (+ `negative`), `labels`, or neither; prompts
      in `prompt_syntax` (`prompts.SYNTAXES`: 'a1111' reads attention weights and encodes beyond 77 tokens in
      chunks, 'plain' does neither);
    - image-to-image (SDEdit): `image` [1 or n, C, H, W] in [-1, 1] is encoded and noised to the time
      a fraction `strength` in (0, 1] down the grid; strength 1 starts from pure noise (text-to-image);
    - inpainting: `image` and `mask` [1 or n, 1, H, W] (1 = generate); dedicated 9-channel models also
      get mask + masked-image latent concatenated; every model keeps the known region (`Inpaint`); `mask_blur`
      > 0 regenerates that many pixels into it and pastes the result back with a seam as soft as that
      (`inputs.soft_mask`); outpainting is inpainting of `inputs.outpaint_canvas`;
    - super-resolution models: `low_res` [1 or n, C, H / f, W / f];
    - layout models: `layout` [1 or n, N, 5] boxes (class index in `Pipeline.layout_classes`, x0, y0, x1, y1 in
      [0, 1]; class -1: no box; `conditioning.layout_tensor` builds one from names), CFG against no boxes;
    - semantic-map models: `semantic_map` [1 or n, H, W] of class indices (`Pipeline.map_classes`), one-hot
      concatenated; a map larger than the training size samples convolutionally (or with Upsample Guidance);
    - refiner hand-off: `denoising_end` < 1 stops a fraction of the way down the grid (use output='latent'),
      `denoising_start` > 0 with those `latents` finishes it;
    - SDXL micro-conditioning: `original_size`, `crop_top_left`, `target_size` (default: the output size);
    - classifier guidance: a noise-aware `classifier(x_t, t, cond) -> log p(y | x_t)` of the labels, at
      `classifier_scale` (with cfg=0 it guides the model's unconditional mode alone);
    - fewer network evaluations (each trades exactness for speed; the defaults are exact): `cfg_until` < 1 guides
      only the first fraction of the steps (the rest run the conditional model alone, half the batch); `cache`
      > 1 recomputes a UNet's deep features every `cache` steps and runs only its blocks above the
      `cache_depth`-th skip in between (`DeepCache`);
    - `interpolate_positions` (DiT): above the trained size, positions scaled to span the trained grid
      (`models.dit`); with Upsample Guidance it helps (docs/upsample_guidance.md);
    - `vae_tile`: latent models decode in tiles of this many pixels (0: whole; None: whole up to
      defaults.DECODE_MEMORY, tiled above, `Pipeline.decode`);
    - `callback(i, t, x, prediction)` after every step; `sampler_options` (eta, variance, order) go to the sampler.
    A state that turns NaN / inf raises FloatingPointError naming the first such step."""
    if upsample_guidance is not None:  # 'auto' -> its weight, once
        upsample_guidance = upsample_guidance_weight(upsample_guidance)
    check_settings(n, steps, cfg, upsample_guidance, ug_eta, denoising_start, denoising_end, output, cfg_until)
    if prompt_syntax not in SYNTAXES:
        raise ValueError(f"prompt_syntax must be one of {', '.join(SYNTAXES)}, got {prompt_syntax!r}")
    if mask_blur < 0:
        raise ValueError(f"mask_blur must be >= 0 pixels, got {mask_blur}")
    size = tuple(semantic_map.shape[-2:]) if torch.is_tensor(semantic_map) else pipe.resolution  # the default
    H, W = height or size[0], width or size[1]
    shape, image, mask, low_res, semantic_map = check_inputs(pipe, n, H, W, image, mask, low_res, upsample_guidance,
                                                             semantic_map)
    cond = conditions(pipe, n, labels, prompts, (H, W), original_size, crop_top_left, target_size, layout,
                      prompt_syntax)
    task = encode_inputs(pipe, shape, image, mask, low_res, generator, semantic_map, mask_blur)
    if task.concat is not None:
        cond["concat"] = task.concat
    null = None
    if pipe.conditioner.keys and cfg != 1:
        cond, null = pipe.conditioner.match_lengths(cond, pipe.conditioner.null(cond, negative, prompt_syntax))
    ts = grid(pipe, steps, spacing, denoising_start, denoising_end, strength if image is not None else None)
    denoiser = guided(pipe.denoiser(cache, cache_depth), pipe, null, cfg_stop(ts, cfg_until), cfg, task,
                      upsample_guidance, ug_eta, (H, W), wrap)
    if classifier is not None:
        if "class_labels" not in cond:
            raise ValueError("classifier guidance needs class labels (a class-conditional model)")
        denoiser = ClassifierGuidance(denoiser, pipe.schedule, classifier, classifier_scale)
    x = initial_state(pipe, (n, *shape), ts, latents, task.known if image is not None else None, strength, generator)
    if interpolate_positions and not hasattr(pipe.net, "interpolate_positions"):
        raise ValueError(f"interpolate_positions is an option of DiT models, not of a {type(pipe.net).__name__}")
    if interpolate_positions:
        pipe.net.interpolate_positions = True
    try:
        z = sample(sampler, denoiser, x, ts, pipe, cond, generator, callback, progress, sampler_options)
    finally:
        if interpolate_positions:
            pipe.net.interpolate_positions = False
    return z if output == "latent" else finish(pipe, z, task, image, vae_tile)


def check_settings(n: int, steps: int, cfg: float, upsample_guidance: float | None, ug_eta: float,
                   denoising_start: float, denoising_end: float, output: str, cfg_until: float) -> None:
    """Refuse settings no model could run (ValueError naming them)."""
    if n < 1 or steps < 1:
        raise ValueError(f"n and steps must be positive, got n={n}, steps={steps}")
    if not 0 < cfg_until <= 1:
        raise ValueError(f"cfg_until must be in (0, 1], got {cfg_until}")
    if not math.isfinite(cfg) or (upsample_guidance is not None and not math.isfinite(upsample_guidance)):
        raise ValueError(f"guidance weights must be finite, got {cfg=}, {upsample_guidance=}")
    if not 0 <= ug_eta <= 1:
        raise ValueError(f"ug_eta must be in [0, 1], got {ug_eta}")
    if not 0 <= denoising_start < denoising_end <= 1:
        raise ValueError(f"need 0 <= denoising_start < denoising_end <= 1, got {denoising_start}, {denoising_end}")
    if output not in OUTPUTS:
        raise ValueError(f"output must be 'image' or 'latent', got {output!r}")


def conditions(pipe: Pipeline, n: int, labels: Tensor | None, prompts: Sequence[str] | None, size: tuple[int, int],
               original_size: tuple[int, int] | None, crop_top_left: tuple[int, int],
               target_size: tuple[int, int] | None, layout: Tensor | None = None,
               prompt_syntax: str = defaults.PROMPT_SYNTAX) -> dict[str, Tensor]:
    """The network's conditions for n samples: labels, prompts (in `prompt_syntax`) or layouts (1 or n), and
    SDXL's micro-conditioning."""
    original = tuple(original_size or target_size or size)
    if layout is not None:
        layout = layout.expand(n, -1, -1) if layout.ndim == 3 and len(layout) == 1 else layout
    return pipe.conditioner(n, labels, prompts, size=tuple(target_size or size), device=pipe.device,
                            original_size=torch.tensor([original]).expand(n, 2),
                            crop_top_left=torch.tensor([crop_top_left]).expand(n, 2), layout=layout,
                            syntax=prompt_syntax)


def cfg_stop(ts: Tensor, cfg_until: float) -> float:
    """The time below which CFG stops for guidance over the first fraction `cfg_until` of the grid's steps: the
    time of step round(cfg_until * steps) (-inf for the whole grid)."""
    k = round(cfg_until * (len(ts) - 1))
    return -math.inf if k == len(ts) - 1 else ts[k].item()


def guided(denoiser: Denoiser, pipe: Pipeline, null: dict[str, Tensor] | None, t_stop: float, cfg: float,
           task: TaskInputs, upsample_guidance: float | None, ug_eta: float, size: tuple[int, int],
           wrap: Callable[[Denoiser], Denoiser] | None) -> Denoiser:
    """The network's `denoiser` wrapped in CFG against the `null` condition (None: no CFG; only at times above
    t_stop), inpainting's blending, Upsample Guidance, and `wrap`, in that order."""
    if null is not None:
        denoiser = CFG(denoiser, cfg, null, t_stop)
    if task.keep is not None:
        denoiser = Inpaint(denoiser, pipe.schedule, task.known, task.keep)
    if upsample_guidance is not None:
        denoiser = UpsampleGuidance(denoiser, pipe.schedule, upsample_factor(pipe, *size), upsample_guidance, ug_eta)
    return wrap(denoiser) if wrap is not None else denoiser


def grid(pipe: Pipeline, steps: int, spacing: str | None, denoising_start: float, denoising_end: float,
         strength: float | None) -> Tensor:
    """The sampling grid: the model's (or `spacing`'s) grid of `steps`, the part of it between denoising_start
    and denoising_end, and for image-to-image (`strength` given) its last strength * steps steps."""
    ts = pipe.settings.grid(pipe.schedule, steps, spacing)
    ts = ts[round(steps * denoising_start):round(steps * denoising_end) + 1]
    return img2img_grid(ts, strength) if strength is not None else ts


def initial_state(pipe: Pipeline, shape: tuple[int, ...], ts: Tensor, latents: Tensor | None, known: Tensor | None,
                  strength: float, generator: torch.Generator | None) -> Tensor:
    """The state at ts[0]: a refiner's `latents` as they are (no noise drawn: a hand-off continues the generator's
    stream), else noise, which image-to-image below strength 1 mixes with the known image at ts[0]'s level."""
    if latents is not None:
        if latents.shape != shape:
            raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
        return latents.to(pipe.device)
    x = randn(shape, generator, pipe.device)
    if known is not None and strength < 1:
        a, b = (c.item() for c in pipe.schedule.alpha_sigma(ts[0]))
        x = a * known + b * x
    return x


def sample(sampler: str, denoiser: Denoiser, x: Tensor, ts: Tensor, pipe: Pipeline, cond: dict[str, Tensor],
           generator: torch.Generator | None, callback: Callback | None, progress: bool,
           options: dict[str, Any]) -> Tensor:
    """The sampler run over the grid, without gradients, raising FloatingPointError that names the first step
    whose state is NaN / inf. The per-step flags stay on the device: one host sync, at the end."""
    finite: list[Tensor] = []

    def watch(i: int, t: float, x: Tensor, p: Prediction) -> None:
        finite.append(torch.isfinite(x).all())
        if callback is not None:
            callback(i, t, x, p)

    with torch.no_grad():
        z = get_sampler(sampler)(denoiser, x, ts, pipe.schedule, cond, generator=generator, callback=watch,
                                 progress=progress, **options)
    if not bool(torch.isfinite(z).all()):
        bad = torch.stack(finite).logical_not().nonzero().flatten().tolist() if finite else []
        steps = len(ts) - 1
        at = f"step {bad[0] + 1} of {steps}" if bad else f"the end of {steps} steps"
        raise FloatingPointError(f"sampling produced NaN/inf at {at} (sampler {sampler})")
    return z


def finish(pipe: Pipeline, z: Tensor, task: TaskInputs, image: Tensor | None, vae_tile: int | None) -> Tensor:
    """Decode the state to images in [-1, 1]; pixel-space inpainting pastes the known pixels back exactly, and
    with a mask blur every model's result is pasted onto the input by its soft weight."""
    with torch.no_grad():
        out = pipe.decode(z, vae_tile).float().clamp(-1, 1)
    if task.keep is not None and pipe.autoencoder is None:
        out = torch.where(task.keep.bool(), image.to(pipe.device), out)
    if task.paste is not None:
        out = task.paste * out + (1 - task.paste) * image.to(pipe.device)
    return out
