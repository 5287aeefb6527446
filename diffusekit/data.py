"""Datasets: bundled MNIST, folders of images with labels or captions, procedural captioned shapes and shape
scenes with their semantic maps.

Every dataset returns samples as dicts: `image` [C, H, W] float in [-1, 1] and, where present,
`label` (int), `caption` (str), `map` [H, W] (int64 class per pixel), `original_size` (h, w) and
`crop_top_left` (top, left) for SDXL-style micro-conditioning. Randomness (crops, flips, shapes) is a pure
function of (seed, epoch, index), so a resumed run sees exactly the data it would have seen.
"""

from __future__ import annotations

import json
import random
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch import Tensor
from torch.utils.data import Dataset

from .bundled import MNIST_DIGITS
from .images import from_pil, standard_mode

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


def to_tensor(img: Image.Image, channels: int) -> Tensor:
    """PIL image (16-bit and float ones scaled to 8 bits) -> [C, H, W] float in [-1, 1]."""
    return from_pil([img], channels)[0]


class MNIST(Dataset):
    """The bundled 10,000 MNIST digits (MIT), as 1-channel images at `resolution` (resized) with
    `pad` pixels of background added around each digit first (28 + 2*2 = 32 for power-of-two models)."""

    num_classes = 10

    def __init__(self, resolution: int = 28, pad: int = 0, indices: slice | None = None, path: Path = MNIST_DIGITS):
        data = np.load(path)
        x = torch.from_numpy(data["images"]).float().div(127.5).sub(1)[:, None]  # (N, 1, 28, 28) in [-1, 1]
        x = F.pad(x, (pad,) * 4, value=-1.0)
        if x.shape[-1] != resolution:
            x = F.interpolate(x, size=(resolution, resolution), mode="area" if x.shape[-1] > resolution else "bilinear")
        sl = indices or slice(None)
        self.images, self.labels = x[sl].contiguous(), torch.from_numpy(data["labels"]).long()[sl]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"image": self.images[i], "label": int(self.labels[i])}

    def get_batch(self, indices: list[int]) -> dict[str, Tensor]:
        """Fast path for in-memory data: a whole batch by fancy indexing."""
        idx = torch.as_tensor(indices)
        return {"image": self.images[idx], "label": self.labels[idx]}


@dataclass
class Crop:
    """Resize the shorter side to `resolution`, crop a square (centre or random), optional random flip."""

    resolution: int
    random_crop: bool = False
    random_flip: bool = False

    def __call__(self, img: Image.Image, rng: random.Random) -> tuple[Image.Image, tuple[int, int], tuple[int, int]]:
        original = (img.height, img.width)
        s = self.resolution / min(img.size)
        w, h = max(self.resolution, round(img.width * s)), max(self.resolution, round(img.height * s))
        img = img.resize((w, h), Image.Resampling.BICUBIC)
        top = rng.randint(0, h - self.resolution) if self.random_crop else (h - self.resolution) // 2
        left = rng.randint(0, w - self.resolution) if self.random_crop else (w - self.resolution) // 2
        img = img.crop((left, top, left + self.resolution, top + self.resolution))
        if self.random_flip and rng.random() < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return img, original, (top, left)


class ImageFolder(Dataset):
    """A folder of images, optionally with `metadata.jsonl` lines {"file_name", "text"|"caption", "label"}
    (the diffusers / Hugging Face ImageFolder layout) or a caption in a .txt beside each image (kohya).
    Unreadable files (corrupt, truncated, or over PIL's decompression-bomb limit Image.MAX_IMAGE_PIXELS) are
    reported (path and reason) and replaced by the next readable one."""

    def __init__(self, root: str | Path, resolution: int, channels: int = 3, random_crop: bool = False,
                 random_flip: bool = False, seed: int = 0):
        self.root, self.channels, self.seed, self.epoch = Path(root), channels, seed, 0
        if not self.root.is_dir():
            raise ValueError(f"image folder {self.root} does not exist")
        self.crop = Crop(resolution, random_crop, random_flip)
        meta = self._metadata()
        files = sorted(p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        self.items = [(p, meta.get(p.relative_to(self.root).as_posix(), {})) for p in files]
        for p, m in self.items:
            if "caption" not in m and p.with_suffix(".txt").is_file():
                m["caption"] = p.with_suffix(".txt").read_text().strip()
        if not self.items:
            raise ValueError(f"no images found in {self.root} (looked for {sorted(IMAGE_SUFFIXES)})")
        self.bad: dict[str, str] = {}

    def _metadata(self) -> dict[str, dict[str, Any]]:
        path, out = self.root / "metadata.jsonl", {}
        if path.is_file():
            for n, line in enumerate(path.read_text().splitlines(), 1):
                if line.strip():
                    try:
                        rec = json.loads(line)
                        name = rec.pop("file_name")
                    except (json.JSONDecodeError, KeyError) as e:
                        raise ValueError(f"{path}:{n}: expected a JSON object with file_name ({e})") from e
                    if "text" in rec:
                        rec["caption"] = rec.pop("text")
                    out[name] = rec
        return out

    @property
    def num_classes(self) -> int | None:
        labels = [m["label"] for _, m in self.items if "label" in m]
        return max(labels) + 1 if labels else None

    def __len__(self) -> int:
        return len(self.items)

    def _load(self, path: Path, rng: random.Random) -> dict[str, Any]:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)  # refuse, rather than decode, a bomb
            with Image.open(path) as img:
                img.load()
                img, original, crop = self.crop(standard_mode(img), rng)
        return {"image": to_tensor(img, self.channels), "original_size": original, "crop_top_left": crop}

    def __getitem__(self, i: int) -> dict[str, Any]:
        for k in range(len(self.items)):
            path, meta = self.items[(i + k) % len(self.items)]
            try:
                sample = self._load(path, random.Random(hash((self.seed, self.epoch, i))))
                return {**sample, **{k_: v for k_, v in meta.items() if k_ in ("label", "caption")}}
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
                if str(path) not in self.bad:
                    self.bad[str(path)] = str(e)
                    warnings.warn(f"skipping unreadable image {path}: {e}")
        raise ValueError(f"no readable image in {self.root}")


SHAPES, COLOURS = ("circle", "square", "triangle"), {"red": (220, 40, 40), "green": (40, 180, 60),
                                                      "blue": (50, 80, 220), "yellow": (230, 200, 40)}
RELATIONS = {"above": (0, -1), "below": (0, 1), "left of": (-1, 0), "right of": (1, 0)}


BACKGROUND = (245, 245, 245)


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill: Any) -> None:
    """A circle, square or triangle of half-size r centred at (cx, cy), filled with `fill` (no antialiasing)."""
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "square":
        draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=fill)
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)


class Shapes(Dataset):
    """Procedural captioned images for testing text conditioning: one or two coloured shapes with a
    compositional caption such as "a small red circle above a blue square". Sample i is a pure function
    of (seed, i)."""

    def __init__(self, resolution: int = 32, size: int = 10_000, seed: int = 0):
        self.resolution, self.size, self.seed = resolution, size, seed

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> dict[str, Any]:
        rng, R = random.Random(hash((self.seed, i))), self.resolution
        img = Image.new("RGB", (R, R), BACKGROUND)
        draw = ImageDraw.Draw(img)
        shape, colour = rng.choice(SHAPES), rng.choice(list(COLOURS))
        if rng.random() < 0.5:  # two small shapes in a spatial relation
            shape2, colour2, relation = rng.choice(SHAPES), rng.choice(list(COLOURS)), rng.choice(list(RELATIONS))
            dx, dy = RELATIONS[relation]
            draw_shape(draw, shape, R / 2 + dx * R / 4, R / 2 + dy * R / 4, R / 8, COLOURS[colour])
            draw_shape(draw, shape2, R / 2 - dx * R / 4, R / 2 - dy * R / 4, R / 8, COLOURS[colour2])
            caption = f"a small {colour} {shape} {relation} a {colour2} {shape2}"
        else:
            size = rng.choice(["small", "large"])
            draw_shape(draw, shape, R / 2, R / 2, R / 8 if size == "small" else R / 3.2, COLOURS[colour])
            caption = f"a {size} {colour} {shape}"
        return {"image": to_tensor(img, 3), "caption": caption}


MAP_CLASSES = ("background", *(f"{c} {s}" for s in SHAPES for c in COLOURS))  # a shape map's class per index


class ShapeMaps(Dataset):
    """Scenes of coloured shapes with their semantic maps, for map-to-image models: `image` and `map` [H, W], whose
    pixels hold the index in MAP_CLASSES of the shape (type x colour) drawn there, 0 for background. The map
    fixes the image but for nothing: colour and type are both in it (a type-only map would leave colour free,
    and no pixel could be checked against it).

    A scene at `resolution` spans `tiles` x `tiles` canvases, each holding 1-3 shapes of half-size 1/8 to 1/4 of
    a canvas side (on average), never touching one another (2 pixels apart at least). Trained at tiles 1, tiles k
    at k times the resolution gives a k x k wider scene of the trained shape size (convolutional sampling beyond
    the trained size), tiles 1 the same kind of scene zoomed in k times. Sample i is a pure
    function of (seed, i)."""

    map_classes = MAP_CLASSES

    def __init__(self, resolution: int = 32, size: int = 10_000, seed: int = 0, tiles: int = 1):
        self.resolution, self.size, self.seed, self.tiles = resolution, size, seed, tiles

    def __len__(self) -> int:
        return self.size

    def scene(self, i: int) -> list[tuple[str, str, float, float, float]]:
        """Sample i's shapes: (type, colour, cx, cy, r) in pixels."""
        rng, R, k = random.Random(f"maps {self.seed} {i}"), self.resolution, self.tiles
        canvas = R / k
        shapes: list[tuple[str, str, float, float, float]] = []
        for _ in range(sum(rng.randint(1, 3) for _ in range(k * k))):
            for _try in range(20):
                r = rng.uniform(canvas / 8, canvas / 4)
                cx, cy = rng.uniform(r, R - 1 - r), rng.uniform(r, R - 1 - r)
                if all(max(abs(cx - x), abs(cy - y)) > r + q + 2 for _, _, x, y, q in shapes):
                    shapes.append((rng.choice(SHAPES), rng.choice(list(COLOURS)), cx, cy, r))
                    break
        return shapes

    def __getitem__(self, i: int) -> dict[str, Any]:
        R = self.resolution
        img, classes = Image.new("RGB", (R, R), BACKGROUND), Image.new("L", (R, R), 0)
        for shape, colour, cx, cy, r in self.scene(i):
            draw_shape(ImageDraw.Draw(img), shape, cx, cy, r, COLOURS[colour])
            draw_shape(ImageDraw.Draw(classes), shape, cx, cy, r, MAP_CLASSES.index(f"{colour} {shape}"))
        return {"image": to_tensor(img, 3), "map": torch.from_numpy(np.asarray(classes, dtype=np.int64).copy())}


LAYOUT_CLASSES = MAP_CLASSES[1:]  # a layout box's class per index: shape type x colour


class ShapeLayouts(ShapeMaps):
    """ShapeMaps scenes with their layouts, for layout-to-image models: `image` and `layout` [max_boxes, 5], one
    row (class index in LAYOUT_CLASSES, x0, y0, x1, y1 as fractions of the image) per shape's bounding box, the
    rest -1 (no box). At tiles 1 a scene holds at most 3 shapes."""

    layout_classes, map_classes = LAYOUT_CLASSES, ()

    def __init__(self, resolution: int = 32, size: int = 10_000, seed: int = 0, tiles: int = 1,
                 max_boxes: int = 3):
        super().__init__(resolution, size, seed, tiles)
        self.max_boxes = max_boxes

    def layout(self, i: int) -> Tensor:
        """Sample i's layout [max_boxes, 5]."""
        R, layout = self.resolution, torch.tensor([[-1.0, 0, 0, 0, 0]] * self.max_boxes)
        for k, (shape, colour, cx, cy, r) in enumerate(self.scene(i)[:self.max_boxes]):
            box = [(cx - r) / R, (cy - r) / R, (cx + r + 1) / R, (cy + r + 1) / R]  # the pixels drawn, inclusive
            layout[k] = torch.tensor([LAYOUT_CLASSES.index(f"{colour} {shape}"), *[min(max(v, 0), 1) for v in box]])
        return layout

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"image": super().__getitem__(i)["image"], "layout": self.layout(i)}


PLACES = ("at the top left", "at the top", "at the top right", "on the left", "in the centre", "on the right",
          "at the bottom left", "at the bottom", "at the bottom right")  # a 3 x 3 grid's cells, row by row


def place(x: float, y: float) -> int:
    """The index in PLACES of the cell holding the point (x, y) (fractions of the image, from the top left)."""
    return 3 * min(int(y * 3), 2) + min(int(x * 3), 2)


class ShapeCaptions(ShapeLayouts):
    """ShapeLayouts scenes with a caption in place of the layout, as close to it as words go: each shape's size
    ("small" or "large": half-size below or above the middle of the drawn range), colour, type and the cell
    of a 3 x 3 grid holding its centre, e.g. "a small red circle at the top left and a large blue square in the
    centre". The text model of these is the layout model's baseline (docs/layouts.md); `layout` stays in each
    sample for scoring."""

    def caption(self, i: int) -> str:
        """Sample i's caption (the places of its layout's box centres)."""
        middle = 3 * self.resolution / (16 * self.tiles)
        words = [f"a {'small' if r < middle else 'large'} {colour} {shape} {PLACES[place((x0 + x1) / 2, (y0 + y1) / 2)]}"
                 for (shape, colour, _, _, r), (_, x0, y0, x1, y1) in zip(self.scene(i), self.layout(i).tolist())]
        return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} and {words[-1]}"

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {**super().__getitem__(i), "caption": self.caption(i)}


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in samples[0]:
        values = [s[key] for s in samples]
        out[key] = values if isinstance(values[0], str) else torch.stack([torch.as_tensor(v) for v in values])
    return out


DATASETS: dict[str, Callable[..., Dataset]] = {  # a data config's `dataset` -> the dataset it opens
    "mnist": lambda d, seed: MNIST(d.resolution, d.pad, slice(0, 10_000 - d.holdout)),
    "folder": lambda d, seed: ImageFolder(d.path, d.resolution, d.channels, d.random_crop, d.random_flip, seed),
    "shapes": lambda d, seed: Shapes(d.resolution, d.size, seed),
    "shape_maps": lambda d, seed: ShapeMaps(d.resolution, d.size, seed),
    "shape_layouts": lambda d, seed: ShapeLayouts(d.resolution, d.size, seed),
    "shape_captions": lambda d, seed: ShapeCaptions(d.resolution, d.size, seed),
}


def open_dataset(d: Any, seed: int = 0) -> Dataset:
    """The dataset a data config `d` names (its dataset, resolution, ... fields: training.config.DataSection)."""
    if d.dataset not in DATASETS:
        raise ValueError(f"unknown dataset {d.dataset!r}; valid: {', '.join(DATASETS)}")
    return DATASETS[d.dataset](d, seed)
