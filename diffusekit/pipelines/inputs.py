"""The task inputs of a generation, checked against the pipeline before any work (so that a front-end can check
a request before queueing it), and what they become for the sampler: the known region of img2img and
inpainting, and the concatenated conditions of inpainting models, super-resolution and semantic maps."""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

if TYPE_CHECKING:
    from .pipeline import Pipeline


def upsample_factor(pipe: Pipeline, height: int, width: int) -> int:
    """s = height / training height for Upsample Guidance (an integer >= 2, dividing the width too); the
    low-resolution call then runs at (height / s) x (width / s), which may be non-square."""
    h = pipe.resolution[0]
    s = height // h
    if height % h or s < 2 or width % s:
        raise ValueError(f"Upsample Guidance needs the height {height} to be an integer multiple s >= 2 of the "
                         f"training height {h}, and the width {width} divisible by that s")
    pipe.latent_shape(height // s, width // s)  # the low-resolution call must fit the network too
    return s


def check_inputs(pipe: Pipeline, n: int, height: int, width: int, image: Tensor | None = None,
                 mask: Tensor | None = None, low_res: Tensor | None = None,
                 upsample_guidance: float | str | None = None,
                 semantic_map: Tensor | None = None) -> tuple[tuple[int, int, int], Tensor | None, Tensor | None,
                                                              Tensor | None, Tensor | None]:
    """generate's checks of its inputs against the model, cheap enough to run before queueing the work: the
    diffusion state's shape (C, h, w), and the image, mask, low-resolution input and semantic map as n each (or
    None). Raises ValueError naming the problem (size not divisible, wrong channels, mask size, UG size, ...)."""
    shape = pipe.latent_shape(height, width)
    if image is not None:
        image = check_image(image, n, pipe.channels, (height, width), "image")
    if mask is not None:
        if image is None:
            raise ValueError("inpainting needs the image as well as the mask")
        mask = check_mask(mask, n, (height, width))
    elif pipe.is_inpainting:
        raise ValueError(f"this is an inpainting model ({pipe.net.config.in_channels} input channels): pass image and mask")
    if (low_res is not None) != bool(pipe.low_res_factor):
        raise ValueError("low_res is for super-resolution models, and they need it" if pipe.low_res_factor
                         else "this model is not a super-resolution model: it takes no low_res")
    if low_res is not None:
        f = pipe.low_res_factor
        low_res = check_image(low_res, n, pipe.channels, (height // f, width // f), "low_res")
    if (semantic_map is not None) != bool(pipe.map_classes):
        raise ValueError("this is a semantic-map model: pass a map of its classes" if pipe.map_classes
                         else "this model is not a semantic-map model: it takes no map")
    if semantic_map is not None:
        semantic_map = check_map(semantic_map, n, (height, width), len(pipe.map_classes))
    if upsample_guidance is not None:
        upsample_factor(pipe, height, width)
    return shape, image, mask, low_res, semantic_map


def check_image(image: Tensor, n: int, channels: int, size: tuple[int, int], what: str,
                value_range: tuple[float, float] = (-1.0, 1.0)) -> Tensor:
    """An input batch [1 or n, channels, H, W] of values in `value_range`, as n images (never modified in place)."""
    if not torch.is_tensor(image) or image.ndim != 4:
        raise ValueError(f"{what} must be a tensor [N, C, H, W], got {getattr(image, 'shape', type(image).__name__)}")
    if image.shape[0] not in (1, n):
        raise ValueError(f"{what} holds {image.shape[0]} images; pass 1 or {n}")
    if image.shape[1] != channels:
        raise ValueError(f"{what} has {image.shape[1]} channels; this model takes {channels}")
    if tuple(image.shape[-2:]) != tuple(size):
        raise ValueError(f"{what} is {image.shape[-2]}x{image.shape[-1]}; it must be {size[0]}x{size[1]}")
    lo, hi = value_range
    if not bool(torch.isfinite(image).all()) or image.min() < lo - 1e-3 or image.max() > hi + 1e-3:
        raise ValueError(f"{what} values must be finite and in [{lo:g}, {hi:g}] "
                         f"(got [{image.min():.3g}, {image.max():.3g}])")
    return image.float().expand(n, -1, -1, -1)


def check_mask(mask: Tensor, n: int, size: tuple[int, int]) -> Tensor:
    """A binary(-ish) inpainting mask [1 or n, 1, H, W] in [0, 1] (1 = generate), thresholded at 0.5."""
    mask = check_image(mask, n, 1, size, "mask", (0.0, 1.0))
    undecided = ((mask > 0.1) & (mask < 0.9)).float().mean().item()
    if undecided > 0.05:
        raise ValueError(f"mask is not binary: {undecided:.0%} of its values lie between 0.1 and 0.9")
    return (mask > 0.5).float()


def check_map(semantic_map: Tensor, n: int, size: tuple[int, int], classes: int) -> Tensor:
    """A semantic map [1 or n, H, W] of class indices in [0, classes), as n maps."""
    if not torch.is_tensor(semantic_map) or semantic_map.ndim != 3 or semantic_map.is_floating_point():
        raise ValueError(f"the map must be an integer tensor [N, H, W] of class indices, got "
                         f"{getattr(semantic_map, 'dtype', type(semantic_map).__name__)} "
                         f"{tuple(getattr(semantic_map, 'shape', ()))}")
    if semantic_map.shape[0] not in (1, n):
        raise ValueError(f"the map batch holds {semantic_map.shape[0]} maps; pass 1 or {n}")
    if tuple(semantic_map.shape[-2:]) != tuple(size):
        raise ValueError(f"the map is {semantic_map.shape[-2]}x{semantic_map.shape[-1]}; it must be "
                         f"{size[0]}x{size[1]}, the image's size")
    if semantic_map.min() < 0 or semantic_map.max() >= classes:
        raise ValueError(f"map classes must be in 0-{classes - 1}, got {semantic_map.min()}-{semantic_map.max()}")
    return semantic_map.long().expand(n, -1, -1)


def map_condition(semantic_map: Tensor, classes: int, size: Sequence[int]) -> Tensor:
    """A semantic map's concatenated condition: one-hot [n, classes, h, w], averaged over each state pixel's
    pixels (a latent pixel holds the shares of its classes)."""
    one_hot = F.one_hot(semantic_map, classes).permute(0, 3, 1, 2).float()
    return F.adaptive_avg_pool2d(one_hot, tuple(size)) if tuple(size) != one_hot.shape[-2:] else one_hot


def randn(shape: Sequence[int], generator: torch.Generator | None, device: torch.device) -> Tensor:
    """N(0, I) noise drawn on the generator's device (the CPU without one), so that a seed gives the same
    noise wherever the model runs; then moved to `device`."""
    return torch.randn(tuple(shape), generator=generator, device=generator.device if generator else "cpu").to(device)


def low_res_condition(low_res: Tensor, size: Sequence[int], z: Tensor, noise: float) -> Tensor:
    """Super-resolution's concatenated condition: the low-resolution image plus noise * z (noise
    augmentation), resized (bilinear) to the diffusion state's size."""
    return F.interpolate(low_res + noise * z, size=tuple(size), mode="bilinear", align_corners=False)


def soft_mask(mask: Tensor, blur: int) -> tuple[Tensor, Tensor]:
    """A binary mask [N, 1, H, W] (1 = generate) for a soft seam of `blur` pixels -> (the mask dilated by blur,
    what is sampled; its box blur over 2 blur + 1 pixels, the weight of the generated image when pasting): 1 on
    the mask, falling to 0 over 2 blur pixels into the kept region, so that beyond them the input stays exact."""
    if blur <= 0:
        return mask, mask
    k = 2 * blur + 1
    grown = F.max_pool2d(mask, k, stride=1, padding=blur)
    return grown, F.avg_pool2d(grown, k, stride=1, padding=blur, count_include_pad=False)


def outpaint_canvas(image: Tensor, left: int = 0, right: int = 0, top: int = 0, bottom: int = 0) -> tuple[Tensor, Tensor]:
    """Outpainting's inputs: the image [N, C, H, W] on a canvas extended by the given pixels on each side, the new
    area filled by repeating the edge pixels (what latent models encode there; it is regenerated), and the mask
    [N, 1, H', W'] that is 1 on the new area."""
    if min(left, right, top, bottom) < 0 or not left + right + top + bottom:
        raise ValueError(f"outpaint by non-negative pixels, at least one side: got left={left}, right={right}, "
                         f"top={top}, bottom={bottom}")
    canvas = F.pad(image, (left, right, top, bottom), mode="replicate")
    mask = F.pad(torch.zeros_like(image[:, :1]), (left, right, top, bottom), value=1.0)
    return canvas, mask


class TaskInputs(NamedTuple):
    """What the checked task inputs become in the diffusion state's terms."""

    known: Tensor | None  # the encoded input image (img2img's start, inpainting's known region)
    keep: Tensor | None  # inpainting: 1 where the state is known (a latent pixel is known if all its pixels are)
    concat: Tensor | None  # concatenated to the network's input (inpainting models, super-resolution, maps)
    paste: Tensor | None = None  # inpainting with a mask blur: the generated image's weight in the result


def encode_inputs(pipe: Pipeline, shape: tuple[int, int, int], image: Tensor | None, mask: Tensor | None,
                  low_res: Tensor | None, generator: torch.Generator | None,
                  semantic_map: Tensor | None = None, mask_blur: int = 0) -> TaskInputs:
    """Encode the checked inputs: the image, the mask (grown by `mask_blur`, `soft_mask`) pooled to the state's
    resolution, and the concatenated condition (mask + masked-image latent for inpainting models; the
    noise-augmented low-resolution image, whose noise is drawn from `generator`, for super-resolution; the one-hot
    map for semantic-map models)."""
    known = keep = concat = paste = None
    if image is not None:
        known = pipe.encode(image.to(pipe.device))
    if mask is not None:
        mask, paste = soft_mask(mask.to(pipe.device), mask_blur)
        paste = paste if mask_blur > 0 else None
        keep = 1 - F.max_pool2d(mask, pipe.factor)
        if pipe.is_inpainting:
            masked = pipe.encode(image.to(pipe.device) * (1 - mask))
            concat = torch.cat([F.interpolate(mask, size=shape[1:]), masked], dim=1)
    if low_res is not None:
        low_res = low_res.to(pipe.device)
        z = randn(low_res.shape, generator, pipe.device)
        concat = low_res_condition(low_res, shape[1:], z, pipe.low_res_noise)
    if semantic_map is not None:
        concat = map_condition(semantic_map.to(pipe.device), len(pipe.map_classes), shape[1:])
    return TaskInputs(known, keep, concat, paste)
