"""Image tensors <-> PIL images, labelled PNG grids, and generation parameters in PNG text chunks."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw
from PIL.PngImagePlugin import PngInfo
from torch import Tensor

OUTPUT_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def to_uint8(x: Tensor) -> np.ndarray:
    """[N, C, H, W] in [-1, 1] -> uint8 [N, H, W, C]."""
    return ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()


def to_pil(x: Tensor) -> list[Image.Image]:
    """[N, C, H, W] in [-1, 1] -> PIL images (L for 1 channel, RGB for 3)."""
    arr = to_uint8(x)
    return [Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a) for a in arr]


def to_8bit(img: Image.Image) -> Image.Image:
    """16-bit ('I;16*', and 'I' up to 65535) and float ('F': [0, 1], or [0, 255] if larger) greyscale images
    scaled to 8-bit 'L'; other modes unchanged. PIL's convert('L') clips them instead (16-bit grey -> white)."""
    if not (img.mode.startswith("I;16") or img.mode in ("I", "F")):
        return img
    a = np.asarray(img, dtype=np.float64)
    top = a.max(initial=0)
    if img.mode == "F":
        scale = 255.0 if top <= 1 else 1.0
    elif top <= 65535:
        scale = 1 / 257  # 65535 -> 255
    else:
        raise ValueError(f"32-bit integer image with values up to {top:.0f}: unknown range; save it with 8 or 16 bits")
    return Image.fromarray(np.clip(np.nan_to_num(a * scale), 0, 255).round().astype(np.uint8))


GREY_MODES = ("1", "L", "LA", "I", "F")  # (and I;16*) -> L
COLOUR_MODES = ("P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr")  # -> RGB


def standard_mode(img: Image.Image) -> Image.Image:
    """Any image Pillow opens as 8-bit greyscale (L) or RGB: 16-bit, 32-bit and float greyscale scaled to 8 bits
    (`to_8bit`), alpha dropped, palettes, CMYK and YCbCr converted; other modes (LAB, HSV, ...) are a ValueError
    naming the mode. The command line, the web server and the training data all read images through it."""
    if img.mode in GREY_MODES or img.mode.startswith("I;16"):
        return to_8bit(img).convert("L")
    if img.mode in COLOUR_MODES:
        return img.convert("RGB")
    raise ValueError(f"image mode {img.mode} is not supported: save it as RGB or greyscale (8 or 16 bits)")


def from_pil(images: Sequence[Image.Image], channels: int = 3) -> Tensor:
    """PIL images of one size (any mode `standard_mode` takes) -> [N, C, H, W] in [-1, 1]."""
    mode = "L" if channels == 1 else "RGB"
    arr = np.stack([np.asarray(standard_mode(im).convert(mode), dtype=np.uint8) for im in images])
    x = torch.from_numpy(arr).float().div(127.5).sub(1)
    return x[:, None] if channels == 1 else x.permute(0, 3, 1, 2)


def read_image_file(path: str | Path, what: str, read: Callable[[Image.Image], Tensor]) -> Tensor:
    """read(the image at `path`, loaded), or a ValueError naming a missing or unreadable `what` file."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"no {what} file at {path}")
    try:
        with Image.open(path) as img:
            img.load()
            return read(img)
    except (OSError, Image.DecompressionBombError) as e:
        raise ValueError(f"{path} is not a readable {what}: {e}") from e


def load_image(path: str | Path, channels: int) -> Tensor:
    """An image file as [1, channels, H, W] in [-1, 1] (greyscale, colour and 16-bit files converted)."""
    return read_image_file(path, "image", lambda img: from_pil([img], channels))


MAP_PALETTE = ((0, 0, 0), (230, 25, 75), (60, 180, 75), (0, 130, 200), (255, 225, 25), (245, 130, 48),
               (70, 240, 240), (145, 30, 180), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128),
               (170, 110, 40), (255, 250, 200), (128, 0, 0), (170, 255, 195), (128, 128, 0), (255, 215, 180),
               (0, 0, 128), (128, 128, 128))  # the colour of each class index in map PNGs (indices beyond repeat)


def map_colours(classes: int) -> Tensor:
    """The colours [classes, 3] (uint8 values) of map classes 0..classes-1 in a painted map."""
    return torch.tensor([MAP_PALETTE[i % len(MAP_PALETTE)] for i in range(classes)], dtype=torch.float32)


def load_map(path: str | Path, classes: int) -> Tensor:
    """A semantic map file as class indices [1, H, W] (int64): a palette ('P') or grey PNG holds the indices
    themselves; a colour image (a map painted in MAP_PALETTE's colours, antialiased or not) gives each pixel the
    class of the nearest palette colour, transparent pixels class 0."""
    def read(img: Image.Image) -> Tensor:
        if img.mode in ("P", "L", "I", "I;16"):
            return torch.from_numpy(np.asarray(img, dtype=np.int64).copy())
        rgba = torch.from_numpy(np.asarray(img.convert("RGBA"), dtype=np.float32).copy())
        nearest = torch.cdist(rgba[..., :3].reshape(-1, 3), map_colours(classes)).argmin(1).view(rgba.shape[:2])
        return torch.where(rgba[..., 3] < 128, 0, nearest)

    indices = read_image_file(path, "map", read)
    if int(indices.max()) >= classes:
        raise ValueError(f"map {path} holds class {int(indices.max())}; the model has {classes} classes "
                         f"(0-{classes - 1})")
    return indices[None]


def save_map(semantic_map: Tensor, path: str | Path) -> Path:
    """Write a map [H, W] of class indices as a palette PNG (its pixels the indices, shown in MAP_PALETTE)."""
    img = Image.fromarray(semantic_map.to(torch.uint8).numpy(), mode="P")
    img.putpalette([v for c in MAP_PALETTE for v in c])
    return _save(img, path, None)


def check_output_path(path: str | Path) -> Path:
    """Raise ValueError unless `path` names an image file (OUTPUT_SUFFIXES) that can be written, so that a
    mistyped output is caught before the work that would fill it."""
    path = Path(path)
    if path.suffix.lower() not in OUTPUT_SUFFIXES:
        raise ValueError(f"output {path} must end in one of {', '.join(OUTPUT_SUFFIXES)}")
    if path.is_dir():
        raise ValueError(f"output {path} is a folder")
    check_writable(path.parent)
    return path


def check_writable(folder: str | Path) -> None:
    """Raise ValueError unless `folder` is, or can be created as, a writable folder."""
    folder = Path(folder)
    near = next(p for p in (folder.absolute(), *folder.absolute().parents) if p.exists())
    if not near.is_dir() or not os.access(near, os.W_OK):
        raise ValueError(f"cannot write in {folder}: {near} is not a writable folder")


def next_numbered(folder: str | Path, tag: str) -> Path:
    """folder/NNNNN-tag.png for the next number after every NNNNN-* in `folder`, claimed by creating the folder
    folder/NNNNN-tag/ for its single images (so that runs in parallel never share a number)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    k = max((int(m[1]) for p in folder.iterdir() if (m := re.match(r"(\d+)-", p.name))), default=0) + 1
    while True:
        try:
            (folder / f"{k:05d}-{tag}").mkdir()
            return folder / f"{k:05d}-{tag}.png"
        except FileExistsError:
            k += 1


PARAMETERS = "diffusekit"  # the PNG text chunk of our parameters (JSON); A1111's text goes in 'parameters'


def _save(img: Image.Image, path: str | Path, parameters: dict[str, Any] | None, text: str | None = None) -> Path:
    """Write `img`, with `parameters` as JSON in the PNG text chunk PARAMETERS and `text` (A1111's parameters
    text, which other tools show) in the chunk 'parameters' (PNG only), atomically: to a temporary file renamed
    into place, so that an interrupted write never leaves a partial image."""
    info = None
    if parameters is not None or text is not None:
        info = PngInfo()
        if parameters is not None:
            info.add_text(PARAMETERS, json.dumps(parameters))
        if text is not None:
            info.add_itxt("parameters", text)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        img.save(tmp, format=Image.registered_extensions()[path.suffix.lower()], pnginfo=info)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def save_image(x: Tensor, path: str | Path, parameters: dict[str, Any] | None = None, text: str | None = None) -> Path:
    """Write one image [C, H, W] in [-1, 1], optionally with its generation parameters (and A1111's text)."""
    return _save(to_pil(x[None])[0], path, parameters, text)


def png_text(path: str | Path) -> dict[str, str]:
    """A PNG's text chunks."""
    with Image.open(path) as img:
        return dict(getattr(img, "text", {}))


def read_parameters(path: str | Path) -> dict[str, Any]:
    """The generation parameters that `save_image` / `save_grid` stored in a PNG (in the PARAMETERS chunk, or as
    JSON in 'parameters', where earlier versions kept them)."""
    chunks = png_text(path)
    text = chunks.get(PARAMETERS, chunks.get("parameters"))
    if text is None:
        raise ValueError(f"{path} holds no generation parameters (no {PARAMETERS!r} or 'parameters' PNG text chunk)")
    try:
        parameters = json.loads(text)
    except ValueError:
        parameters = None
    if not isinstance(parameters, dict):
        raise ValueError(f"{path}: its parameters are not diffusekit's JSON object")
    return parameters


def save_grid(x: Tensor, path: str | Path, nrow: int, row_labels: Sequence[str] | None = None,
              scale: int = 1, pad: int = 2, parameters: dict[str, Any] | None = None, text: str | None = None) -> Path:
    """Write images [N, C, H, W] in [-1, 1] as a grid of rows of `nrow`, optionally labelled on the left and
    with their generation parameters (and A1111's text) (PNG)."""
    return _save(grid_image(x, nrow, row_labels, scale, pad), path, parameters, text)


def save_plot(cells: Sequence[Image.Image], path: str | Path, columns: Sequence[str], rows: Sequence[str] = ("",),
              panels: Sequence[str] = ("",), parameters: dict[str, Any] | None = None, text: str | None = None) -> Path:
    """Write an X/Y/Z plot as A1111 draws one (`plot_image`), with its parameters (PNG)."""
    return _save(plot_image(cells, columns, rows, panels), path, parameters, text)


def plot_image(cells: Sequence[Image.Image], columns: Sequence[str], rows: Sequence[str] = ("",),
               panels: Sequence[str] = ("",), pad: int = 6) -> Image.Image:
    """Images in a labelled table per panel: `columns` (X) labelled above, `rows` (Y) on the left, one panel per
    `panels` (Z) value, titled, below the last; cells in X-fastest order, each centred in a slot of the largest's
    size."""
    if len(cells) != len(columns) * len(rows) * len(panels):
        raise ValueError(f"{len(cells)} cells for {len(columns)} x {len(rows)} x {len(panels)} values")
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))

    def width(label: str) -> int:
        return int(measure.textlength(label)) if label else 0

    line = 14
    w, h = max(c.width for c in cells), max(c.height for c in cells)
    w = max(w, *(width(s) + pad for s in columns))
    left = max(map(width, rows)) + 2 * pad if any(rows) else 0
    top = line + pad if any(columns) else 0
    title = line + pad if any(panels) else 0
    panel_h = title + top + len(rows) * (h + pad)
    plot = Image.new("RGB", (left + len(columns) * (w + pad) + pad, len(panels) * panel_h + pad), "white")
    draw = ImageDraw.Draw(plot)
    for k, cell in enumerate(cells):
        c, r, z = k % len(columns), k // len(columns) % len(rows), k // (len(columns) * len(rows))
        x0, y0 = left + pad + c * (w + pad), z * panel_h + title + top + pad + r * (h + pad)
        plot.paste(cell.convert("RGB"), (x0 + (w - cell.width) // 2, y0 + (h - cell.height) // 2))
        if r == 0:
            draw.text((x0 + (w - width(columns[c])) // 2, y0 - line - 2), columns[c], fill="black")
        if c == 0:
            draw.text((pad, y0 + h // 2 - line // 2), rows[r], fill="black")
        if c == r == 0 and panels[z]:
            draw.text((pad, z * panel_h + pad), panels[z], fill="black")
    return plot


def grid_image(x: Tensor, nrow: int, row_labels: Sequence[str] | None = None, scale: int = 1,
               pad: int = 2) -> Image.Image:
    """Images [N, C, H, W] in [-1, 1] as one RGB image: rows of `nrow`, optionally labelled on the left."""
    tiles = [im.convert("RGB") for im in to_pil(x)]
    if scale != 1:
        tiles = [im.resize((im.width * scale, im.height * scale), Image.Resampling.NEAREST) for im in tiles]
    w, h = tiles[0].size
    rows = (len(tiles) + nrow - 1) // nrow
    margin = 8 + 7 * max((len(s) for s in row_labels), default=0) if row_labels else 0
    grid = Image.new("RGB", (margin + nrow * (w + pad) + pad, rows * (h + pad) + pad), "white")
    draw = ImageDraw.Draw(grid)
    for i, tile in enumerate(tiles):
        r, c = divmod(i, nrow)
        grid.paste(tile, (margin + pad + c * (w + pad), pad + r * (h + pad)))
    for r, label in enumerate(row_labels or []):
        draw.text((4, pad + r * (h + pad) + h // 2 - 5), label, fill="black")
    return grid
