"""One generation as a user asks for it, checked once and resolved once: the command line and the web API each
build a `Request`, and this module turns it into the `generate` call that runs it.

    Request (checked on creation) -> load_model -> plan(request, pipe): checked against the model, resolved into
    generate's inputs and keywords (Plan) -> run(plan, pipe) -> images -> outputs.write

The field names are the vocabulary of every front-end: the command line's options, the web API's JSON fields
and the generation parameters recorded in each PNG.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from . import defaults
from .acceleration import DTYPES, accelerate, resolve_dtype
from .bundled import model_folder
from .conditioning import layout_tensor, parse_layout
from .images import load_image, load_map
from .guidance import NoisyClassifier
from .pipelines import Pipeline, generate, load_pipeline
from .pipelines.inputs import check_inputs, outpaint_canvas
from .pipelines.embeddings import Embeddings
from .pipelines.lora import LoRAs
from .prompts import SYNTAXES
from .samplers import DDPM_VARIANCES, SAMPLERS, Callback, taking
from .schedules import SPACINGS, img2img_grid
from .validation import Check, at_least, available_device, did_you_mean, finite, within

TASKS = ("sample", "img2img", "inpaint", "outpaint", "upscale")
SAMPLER_OPTIONS = ("eta", "variance")  # the sampler options a request may set (samplers declare which they take)


def ug_weight(w: float | str) -> str | None:
    """A check for Upsample Guidance weights: 'auto', -1 (off) or in [0, UG_MAX]."""
    if w == defaults.UG_AUTO or (not isinstance(w, str) and (w == -1 or 0 <= w <= defaults.UG_MAX)):
        return None
    return f"must be {defaults.UG_AUTO!r}, -1 (off) or in [0, {defaults.UG_MAX:g}], got {w!r}"


def parse_lora(spec: str) -> tuple[str, float]:
    """A LoRA given as FILE or FILE:SCALE -> (file, scale); the scale is 1 when no number follows the last ':'."""
    path, colon, scale = spec.rpartition(":")
    try:
        return (path, float(scale)) if colon else (spec, 1.0)
    except ValueError:
        return spec, 1.0


def lora_file(spec: str) -> str | None:
    """A check for one LoRA spec: an existing file, a finite scale."""
    path, scale = parse_lora(spec)
    if not Path(path).is_file():
        return f"{spec!r}: no LoRA file at {path}"
    return finite(scale) and f"{spec!r}: the scale {finite(scale)}"


def parse_embedding(spec: str) -> tuple[str, str | None]:
    """A textual-inversion embedding given as FILE or FILE:TOKEN -> (file, token; None: the file's own token, else
    its name)."""
    path, colon, token = spec.rpartition(":")
    return (path, token) if colon and path and token and not Path(spec).is_file() else (spec, None)


def embedding_file(spec: str) -> str | None:
    """A check for one embedding spec: an existing file."""
    path, _ = parse_embedding(spec)
    return None if Path(path).is_file() else f"{spec!r}: no embedding file at {path}"


LORA_FILES = (".safetensors", ".pt", ".ckpt", ".bin")
EMBEDDING_FILES = (".safetensors", ".pt", ".bin")


def named_files(folder: str | Path | None, suffixes: tuple[str, ...]) -> dict[str, Path]:
    """The files in `folder` (not below it) with one of `suffixes`, by name without the suffix (what the web UI
    chooses LoRAs and embeddings by, A1111's folders' way); {} without a folder."""
    if folder is None:
        return {}
    return {f.stem: f for f in sorted(Path(folder).iterdir()) if f.suffix.lower() in suffixes and f.is_file()}


def resolve_loras(specs: typing.Sequence[str], files: dict[str, Path]) -> list[str]:
    """LoRAs chosen by name, NAME or NAME:SCALE, among `files` (`named_files`) -> FILE:SCALE specs; a ValueError
    names one that is not among them."""
    out = []
    for spec in specs:
        name, scale = parse_lora(spec)
        if name not in files:
            raise ValueError(f"unknown LoRA {name[:64]!r}{did_you_mean(name, files)}; available: "
                             f"{', '.join(files) or 'none (serve --lora-dir DIR)'}")
        out.append(f"{files[name]}:{scale:g}")
    return out


def mentioned_embeddings(texts: typing.Sequence[str], files: dict[str, Path]) -> list[str]:
    """FILE:NAME specs of the embedding files among `files` whose name the texts contain, ignoring case: A1111's
    embeddings folder, where a prompt uses an embedding by writing its file's name (the token)."""
    text = " ".join(texts).lower()
    return [f"{path}:{name}" for name, path in files.items() if name.lower() in text]


def parse_outpaint(spec: str) -> dict[str, int]:
    """'left=128,right=64' -> {'left': 128, 'right': 64} (sides not named extend by 0); ValueError otherwise."""
    out = {}
    for part in filter(None, spec.replace(" ", "").split(",")):
        side, eq, px = part.partition("=")
        if side not in SIDES or not eq or not px.isdecimal() or side in out:
            raise ValueError(f"outpaint {spec!r}: expected SIDE=PIXELS[,...] with SIDE in {', '.join(SIDES)}, each "
                             "once, e.g. left=128,right=128")
        out[side] = int(px)
    if not any(out.values()):
        raise ValueError(f"outpaint {spec!r}: extend at least one side by at least one pixel")
    return out


def outpaint_spec(spec: str) -> str | None:
    """A check for an outpaint spec (`parse_outpaint`)."""
    try:
        parse_outpaint(spec)
    except ValueError as e:
        return str(e).removeprefix("outpaint ")
    return None


def fraction(v: float) -> str | None:
    """A check for a fraction in (0, 1] (img2img's strength, CFG-until's share of the steps)."""
    return None if 0 < v <= 1 else f"must be in (0, 1], got {v!r}"


def named(what: str, names: typing.Collection[str]) -> Check:
    """A check for a name in `names`; others are refused naming the closest one, or all."""
    def check(v: str) -> str | None:
        return None if v in names else f"unknown {what} {v!r}{did_you_mean(v, names) or '; valid: ' + ', '.join(names)}"

    return check


CHECKS: dict[str, Check] = {  # each field's check of a given (not None) value; the command line's types use them too
    "task": named("task", TASKS),
    "n": at_least(1),
    "sampler": named("sampler", SAMPLERS),
    "prompt_syntax": named("prompt syntax", SYNTAXES),
    "steps": at_least(1),
    "cfg": finite,
    "classifier_scale": finite,
    "spacing": named("spacing", SPACINGS),
    "eta": within(0, 1),
    "variance": named("variance", DDPM_VARIANCES),
    "cfg_until": fraction,
    "cache": at_least(1),
    "cache_depth": at_least(0),
    "vae_tile": at_least(0),
    "upsample_guidance": ug_weight,
    "lora": lambda specs: next(filter(None, map(lora_file, specs)), None),
    "embedding": lambda specs: next(filter(None, map(embedding_file, specs)), None),
    "ug_eta": within(0, 1),
    "height": at_least(1),
    "width": at_least(1),
    "scale": at_least(1),
    "strength": fraction,
    "outpaint": outpaint_spec,
    "mask_blur": at_least(0),
    "refiner_start": within(0, 1),
    "dtype": named("dtype", ("auto", *DTYPES)),
    "device": available_device,
}
NEEDS = {"sample": (), "img2img": ("input_image",), "inpaint": ("input_image", "mask"), "outpaint": ("input_image",),
         "upscale": ("input_image",)}
SIDES = ("left", "right", "top", "bottom")


@dataclass(frozen=True)
class Request:
    """One generation: what to sample (model, task, labels or prompts, inputs), how (sampler and its options,
    steps, guidance, size, seed) and where it runs (device, dtype). None is the model's own value (size,
    spacing), every class (labels), or the sampler's default (eta, variance)."""

    model: str = "mnist"  # a bundled model's name or a model folder / SD single file
    task: str = "sample"  # sample, img2img, inpaint, upscale
    labels: list[int] | None = None  # class labels, one grid row each (class-conditional models)
    prompt: list[str] | None = None  # prompts, one grid row each (text-conditional models)
    negative: list[str] | None = None  # one negative prompt, or one per prompt
    prompt_syntax: str = defaults.PROMPT_SYNTAX  # a1111: attention weights and prompts beyond 77 tokens; plain
    n: int = defaults.N  # images per label / prompt
    seed: int = defaults.SEED
    sampler: str = defaults.SAMPLER
    steps: int = defaults.STEPS
    cfg: float = defaults.CFG
    classifier: str | None = None  # a noise-aware classifier (bundled name or folder) for classifier guidance
    classifier_scale: float = defaults.CLASSIFIER_SCALE
    spacing: str | None = None
    eta: float | None = None
    variance: str | None = None
    cfg_until: float = defaults.CFG_UNTIL  # CFG over this first fraction of the steps
    cache: int = defaults.CACHE  # recompute the UNet's deep features every this many steps (1: exact)
    cache_depth: int = defaults.CACHE_DEPTH  # the skips above which the UNet's blocks run every step
    upsample_guidance: float | str | None = None  # w or 'auto'; -1 or None is off
    ug_eta: float = defaults.UG_ETA
    interpolate_positions: bool = False  # DiT above its trained size: positions span the trained grid
    height: int | None = None
    width: int | None = None
    vae_tile: int | None = None  # latent models: decode in tiles of this many pixels (0: whole; None: where needed)
    scale: int = defaults.GRID_SCALE  # pixel magnification in the grid
    input_image: str | None = None  # img2img / inpaint / upscale input (a file)
    mask: str | None = None  # inpainting mask (a file, white = regenerate)
    map: str | None = None  # semantic map (a file: class indices, or painted in images.MAP_PALETTE) of map models
    layout: str | None = None  # layout models' boxes: "red circle 0.1 0.1 0.4 0.4; ..." or JSON (parse_layout)
    strength: float | None = None  # img2img / inpaint / outpaint; None: the task's default
    outpaint: str | None = None  # outpaint: the pixels added on each side, "left=128,right=128,top=0,bottom=0"
    mask_blur: int | None = None  # inpaint / outpaint: pixels of soft seam; None: the task's default
    text_encoder: str | None = None  # text encoder folder for an SD single file
    lora: list[str] | None = None  # LoRA files, each FILE or FILE:SCALE (scale 1 if not given), on the model
    embedding: list[str] | None = None  # textual-inversion files, each FILE or FILE:TOKEN, on its text encoders
    refiner: str | None = None  # a second model that finishes the schedule
    refiner_start: float = defaults.REFINER_START
    dtype: str = defaults.DTYPE  # auto, fp32, bf16, fp16
    device: str = defaults.DEVICE
    compile: bool = False

    def __post_init__(self):
        if self.upsample_guidance == -1:  # (-1 is UG's identity: off)
            object.__setattr__(self, "upsample_guidance", None)
        if self.strength is None and self.task in defaults.STRENGTH:
            object.__setattr__(self, "strength", defaults.STRENGTH[self.task])
        if self.mask_blur is None and self.task in defaults.MASK_BLUR:
            object.__setattr__(self, "mask_blur", defaults.MASK_BLUR[self.task])
        self.check_values()
        self.check_inputs()

    def check_values(self) -> None:
        """Refuse a field's value that its check (CHECKS) refuses, and sampler options the sampler lacks."""
        for name, check in CHECKS.items():
            if (value := getattr(self, name)) is not None and (problem := check(value)):
                raise ValueError(f"{name} {problem}")
        for key in SAMPLER_OPTIONS:
            if getattr(self, key) is not None and self.sampler not in (names := taking(key)):
                raise ValueError(f"--{key} is an option of sampler {' and '.join(names)}, not of {self.sampler}")

    def check_inputs(self) -> None:
        """Refuse inputs the task does not take or lacks, and conditions that cannot be meant."""
        for what in ("input_image", "mask"):
            needed = what in NEEDS[self.task]
            if needed != (getattr(self, what) is not None):
                raise ValueError(f"{self.task} {'needs' if needed else 'takes no'} input {what.removeprefix('input_')}")
        if self.strength is not None and self.task not in defaults.STRENGTH:
            raise ValueError(f"strength is an option of img2img, inpaint and outpaint, not of {self.task}")
        if (self.outpaint is None) == (self.task == "outpaint"):
            raise ValueError("outpaint needs --outpaint SIDE=PIXELS,..." if self.outpaint is None
                             else f"--outpaint is an option of outpaint, not of {self.task}")
        if self.mask_blur is not None and self.task not in defaults.MASK_BLUR:
            raise ValueError(f"mask_blur is an option of inpaint and outpaint, not of {self.task}")
        if self.labels is not None and (not self.labels or min(self.labels) < 0):
            raise ValueError(f"labels must be non-negative class numbers, got {self.labels}")
        if self.negative and not self.prompt:
            raise ValueError("a negative prompt needs a prompt")
        if self.classifier is not None and self.prompt:
            raise ValueError("classifier guidance guides class labels, not prompts")
        if self.lora and self.compile:
            raise ValueError("lora and compile do not combine: compiling freezes the weights a LoRA changes")
        if self.cache > 1 and self.compile:
            raise ValueError("cache and compile do not combine: the cache's choice of blocks changes every step, "
                             "which would recompile the network")

    @property
    def sampler_options(self) -> dict[str, Any]:
        """The sampler options given (eta, variance), as the sampler's keywords."""
        return {k: v for k in SAMPLER_OPTIONS if (v := getattr(self, k)) is not None}


FIELDS: dict[str, Any] = typing.get_type_hints(Request)  # every field's type, for values read from JSON / PNGs


SWEEPABLE = ("cfg", "steps", "sampler", "spacing", "seed", "eta", "variance", "upsample_guidance", "ug_eta",
             "interpolate_positions", "cfg_until", "cache", "cache_depth", "strength", "mask_blur", "height", "width",
             "prompt_syntax", "classifier_scale", "refiner_start",  # what a sweep varies: the model and inputs stay
             "prompt")  # A1111's Prompt S/R: the first value is searched for and replaced by each value in turn
MAX_AXES = 3  # X, Y and Z


def sweep_value(name: str, text: str) -> Any:
    """A sweep's value text as field `name`'s type (int, float, bool or str, tried in that order), checked; a
    prompt S/R value as it is (it names its cell's folder: no / or \\)."""
    if name == "prompt":
        if any(c in text for c in "/\\\0"):
            raise ValueError(f"sweep prompt={text}: a prompt S/R value names its cell's folder: no / or \\")
        return text
    kinds = typing.get_args(FIELDS[name]) or (FIELDS[name],)
    for kind in (bool, int, float, str):
        if kind in kinds:
            try:
                value = {"true": True, "false": False}[text.lower()] if kind is bool else kind(text)
            except (KeyError, ValueError):
                continue
            if problem := (CHECKS[name](value) if name in CHECKS else None):
                raise ValueError(f"sweep {name}={text}: {name} {problem}")
            return value
    kinds_named = {bool: "true or false", int: "an integer", float: "a number", str: "text"}
    raise ValueError(f"sweep {name}: {text!r} is not {' or '.join(kinds_named[k] for k in kinds if k in kinds_named)}")


def parse_sweep(spec: str) -> tuple[str, list[Any]]:
    """'cfg=3,5,7.5' -> ('cfg', [3.0, 5.0, 7.5]): a field of SWEEPABLE (dashes or underscores) and its distinct
    values, each converted to the field's type and checked; ValueError otherwise."""
    name, eq, values = spec.partition("=")
    name = name.strip().removeprefix("--").replace("-", "_")
    if name not in SWEEPABLE or not eq:
        raise ValueError(f"sweep {spec!r}: expected OPTION=V1,V2,... with OPTION one of {', '.join(SWEEPABLE)}"
                         f"{did_you_mean(name, SWEEPABLE)}")
    out = [sweep_value(name, v.strip()) for v in values.split(",") if v.strip()]
    if not out or len(set(map(repr, out))) != len(out):
        raise ValueError(f"sweep {spec!r}: give {name} distinct values, e.g. {name}=a,b,c")
    return name, out


def sweep_spec(spec: str) -> str | None:
    """A check for one sweep axis (`parse_sweep`)."""
    try:
        parse_sweep(spec)
    except ValueError as e:
        return str(e)
    return None


def cells(axes: typing.Sequence[tuple[str, list[Any]]]) -> list[dict[str, Any]]:
    """Each cell's values, {X: x, Y: y, Z: z}, the first axis (X) varying fastest."""
    names = [name for name, _ in axes]
    return [dict(zip(names, reversed(combo))) for combo in itertools.product(*(v for _, v in reversed(axes)))]


def sweep(request: Request, axes: typing.Sequence[tuple[str, list[Any]]]) -> list[Request]:
    """The cells of an X/Y/Z sweep (`cells`): the request with each combination of the axes' values, every other
    field (the seed too, unless swept) the same; a prompt axis replaces its first value, in the prompts and negative
    prompts, by each value (A1111's Prompt S/R). Each cell is checked as a request, so a combination that cannot run
    is refused, named, before any work."""
    names = [name for name, _ in axes]
    if len(axes) > MAX_AXES or len(set(names)) != len(names):
        raise ValueError(f"a sweep has at most {MAX_AXES} axes, each option once; got {', '.join(names)}")
    search = dict(axes).get("prompt", [None])[0]
    if search is not None and not any(search in p for p in request.prompt or ()):
        raise ValueError(f"sweep prompt: {search!r}, the text its values replace, is in no prompt")
    out = []
    for values in cells(axes):
        fields = dict(values)
        if search is not None:
            new = fields.pop("prompt")
            fields |= {k: [p.replace(search, new) for p in v] for k in ("prompt", "negative")
                       if (v := getattr(request, k))}
        try:
            out.append(dataclasses.replace(request, **fields))
        except ValueError as e:
            raise ValueError(f"sweep cell {cell_label(values)}: {e}") from e
    return out


def cell_label(values: dict[str, Any]) -> str:
    """'cfg=5,steps=20': a sweep cell's values (its folder's name)."""
    return ",".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())


def cell_labels(axes: typing.Sequence[tuple[str, list[Any]]]) -> list[str]:
    """The `cell_label` of each cell, in the order of `cells` (and `sweep`)."""
    return [cell_label(values) for values in cells(axes)]


def axis_specs(axes: typing.Sequence[tuple[str, list[Any]]]) -> list[str]:
    """Sweep axes as the OPTION=V1,V2,... specs that `parse_sweep` reads back (what PNGs record)."""
    return [f"{name}={','.join(map(str, values))}" for name, values in axes]


def task_of(fields: dict[str, Any]) -> str:
    """The task of request fields recorded without one (PNGs record their inputs, not the task): outpaint with
    its sides, inpaint with a mask, img2img with an input image and a strength, upscale with an input image
    alone, else sample."""
    if fields.get("outpaint") is not None:
        return "outpaint"
    if fields.get("mask") is not None:
        return "inpaint"
    if fields.get("input_image") is not None:
        return "img2img" if fields.get("strength") is not None else "upscale"
    return "sample"


def load_model(source: str, device: str = defaults.DEVICE, dtype: str = defaults.DTYPE,
               text_encoder: str | None = None, compile: bool = False) -> tuple[Pipeline, str]:
    """A model by bundled name or path on `device`, read in `dtype` (auto resolved: bf16 where the device
    computes it natively, else fp32; no float32 copy of the weights on the way) and `accelerate`d, its network
    torch.compiled with `compile`; and the dtype name used."""
    dtype = resolve_dtype(dtype, device)
    pipe = load_pipeline(model_folder(source), device, DTYPES[dtype] or torch.float32, text_encoder=text_encoder)
    return accelerate(pipe, dtype=DTYPES[dtype], compile=compile), dtype


@dataclass(frozen=True)
class Plan:
    """A request resolved against its model: the request with every None the model decides filled in (size,
    labels) and input paths made absolute, generate's task inputs and keywords, the grid's row labels and each
    image's own condition."""

    request: Request
    inputs: dict[str, Tensor]  # image (+ strength), mask, low_res, semantic_map
    conditions: dict[str, Any]  # labels, prompts, negative: one per image
    rows: list[str] | None
    own: list[dict[str, Any]]
    options: dict[str, Any] = field(default_factory=dict)  # the sampler's

    @property
    def images(self) -> int:
        return len(self.own)

    @property
    def total_steps(self) -> int:
        """The sampling steps the run takes (image-to-image runs the tail of the grid)."""
        r = self.request
        return len(img2img_grid(torch.arange(r.steps + 1), r.strength)) - 1 if "image" in self.inputs else r.steps

    def generate_kwargs(self) -> dict[str, Any]:
        """generate's keywords for the request, but the generator, callback and progress."""
        r = self.request
        return dict(**self.conditions, prompt_syntax=r.prompt_syntax, height=r.height, width=r.width, sampler=r.sampler, steps=r.steps, cfg=r.cfg,
                    spacing=r.spacing, cfg_until=r.cfg_until, cache=r.cache, cache_depth=r.cache_depth,
                    upsample_guidance=r.upsample_guidance, ug_eta=r.ug_eta,
                    interpolate_positions=r.interpolate_positions, vae_tile=r.vae_tile,
                    classifier_scale=r.classifier_scale, **self.options)


def plan(request: Request, pipe: Pipeline) -> Plan:
    """Check a request against its loaded model and resolve it (ValueError naming what the model cannot do,
    before any sampling): conditions, inputs (whose size sets the output's), size, and generate's own checks."""
    r = request
    check_task(r.task, pipe, r.model)
    check_conditions(r, pipe)
    inputs, size = task_inputs(r, pipe)
    r = dataclasses.replace(r, height=r.height or size[0], width=r.width or size[1],
                            labels=r.labels or (list(range(pipe.num_classes)) if pipe.num_classes else None),
                            input_image=r.input_image and str(Path(r.input_image).resolve()),
                            mask=r.mask and str(Path(r.mask).resolve()), map=r.map and str(Path(r.map).resolve()),
                            lora=r.lora and [f"{Path(f).resolve()}:{s:g}" for f, s in map(parse_lora, r.lora)],
                            embedding=r.embedding and [":".join([str(Path(f).resolve()), *filter(None, [t])])
                                                       for f, t in map(parse_embedding, r.embedding)])
    if r.vae_tile and (pipe.autoencoder is None or r.vae_tile % pipe.factor):
        why = "has no autoencoder" if pipe.autoencoder is None else f"has factor {pipe.factor}"
        raise ValueError(f"vae_tile is an option of latent models, in multiples of their autoencoder's factor; "
                         f"{r.model} {why}")
    if r.cache > 1:
        pipe.denoiser(r.cache, r.cache_depth)  # refuses a network DeepCache cannot cache, and a depth it lacks
    conditions, rows, own = batch(r, pipe)
    check_inputs(pipe, len(own), r.height, r.width, inputs.get("image"), inputs.get("mask"), inputs.get("low_res"),
                 r.upsample_guidance, inputs.get("semantic_map"))
    return Plan(r, inputs, conditions, rows, own, r.sampler_options)


def check_task(task: str, pipe: Pipeline, model: str) -> None:
    """Refuse a task the model does not do (`Pipeline.tasks`)."""
    if task not in pipe.tasks:
        why = (": it is not a super-resolution model; for larger images of a model use sample --height/--width "
               "with --upsample-guidance") if task == "upscale" else f"; it does {', '.join(pipe.tasks)}"
        raise ValueError(f"model {model} does not do {task}{why}")


def check_conditions(r: Request, pipe: Pipeline) -> None:
    """Refuse labels / prompts that the model would silently ignore, and labels it lacks."""
    kind = {"class": "class-conditional (use --labels)", "text": "text-conditional (use --prompt)",
            "layout": "a layout model (use --layout)", "unconditional": "unconditional"}[pipe.conditioning]
    if (r.prompt or r.negative) and pipe.conditioning != "text":
        raise ValueError(f"--prompt / --negative need a text-conditional model; {r.model} is {kind}")
    if r.labels and pipe.conditioning != "class":
        raise ValueError(f"--labels needs a class-conditional model; {r.model} is {kind}")
    if r.labels and max(r.labels) >= pipe.num_classes:
        raise ValueError(f"--labels {max(r.labels)} is out of range: {r.model} has {pipe.num_classes} classes "
                         f"(0-{pipe.num_classes - 1})")
    if pipe.conditioning == "text" and not r.prompt:
        raise ValueError("this model is text-conditional: pass --prompt (several allowed)")
    if r.layout is not None and pipe.conditioning != "layout":
        raise ValueError(f"--layout needs a layout model; {r.model} is {kind}")
    if pipe.conditioning == "layout" and r.layout is None:
        raise ValueError(f"{r.model} is a layout model: pass --layout \"CLASS x0 y0 x1 y1; ...\" (coordinates in "
                         f"[0, 1]; classes: {', '.join(pipe.layout_classes)})")


def task_inputs(r: Request, pipe: Pipeline) -> tuple[dict[str, Tensor], tuple[int, int]]:
    """generate's inputs from the request's files, and the output size they imply: the input image's (times
    the model's factor when upscaling), else the map's, or the model's training size without either."""
    if r.map is not None and not pipe.map_classes:
        raise ValueError(f"--map needs a semantic-map model; {r.model} takes no map")
    if r.map is None and pipe.map_classes:
        raise ValueError(f"{r.model} is a semantic-map model: pass a map (--map FILE: a PNG whose pixels are class "
                         f"indices 0-{len(pipe.map_classes) - 1}: {', '.join(pipe.map_classes)})")
    maps = {"semantic_map": load_map(r.map, len(pipe.map_classes))} if r.map is not None else {}
    if r.input_image is None:
        return maps, tuple(maps["semantic_map"].shape[-2:]) if maps else pipe.resolution
    image, f = load_image(r.input_image, pipe.channels), pipe.low_res_factor or 1
    size = (image.shape[-2] * f, image.shape[-1] * f)
    if r.task == "upscale":
        return {"low_res": image}, size
    if r.task == "outpaint":
        image, mask = outpaint_canvas(image, **parse_outpaint(r.outpaint))
        return {"image": image, "mask": mask, "strength": r.strength, "mask_blur": r.mask_blur, **maps}, \
            tuple(image.shape[-2:])
    inputs = {"image": image, "strength": r.strength, **maps}
    if r.mask is not None:
        inputs |= {"mask": (load_image(r.mask, 1) + 1) / 2, "mask_blur": r.mask_blur}
    return inputs, size


def batch(r: Request, pipe: Pipeline) -> tuple[dict[str, Any], list[str] | None, list[dict[str, Any]]]:
    """generate's conditions for n images per label / prompt, the grid's row labels, and each image's own
    condition (labels already resolved: every class if none were given)."""
    if pipe.conditioning == "class":
        own = [{"label": c} for c in r.labels for _ in range(r.n)]
        return {"labels": torch.tensor([o["label"] for o in own])}, [str(c) for c in r.labels], own
    if pipe.conditioning == "unconditional":
        return {}, None, [{}] * r.n
    if pipe.conditioning == "layout":
        layout = layout_tensor(parse_layout(r.layout), pipe.layout_classes, pipe.net.config.layout_boxes)
        return {"layout": layout.expand(r.n, -1, -1)}, None, [{}] * r.n
    negative = r.negative or [None]
    if len(negative) not in (1, len(r.prompt)):
        raise ValueError(f"pass one --negative, or one per --prompt ({len(r.prompt)}), got {len(negative)}")
    own = [{"prompt": p, "negative": q} for p, q in zip(r.prompt, negative * (len(r.prompt) // len(negative)))
           for _ in range(r.n)]
    return ({"prompts": [o["prompt"] for o in own], "negative": r.negative and [o["negative"] for o in own]},
            r.prompt, own)


def run(p: Plan, pipe: Pipeline, refiner: Pipeline | None = None, callback: Callback | None = None,
        progress: bool = False, classifier: NoisyClassifier | None = None, restore: bool = True) -> Tensor:
    """Sample a plan's images (seeded by its request), the refiner, if given, finishing the schedule from
    refiner_start on, with the request's classifier (loaded: `load_classifier`) guiding and its LoRAs merged into
    and its embeddings added to the first model for the run (restore=False: the LoRAs stay merged, keeping no
    originals, for a process that ends after the run)."""
    return list(run_all([p], pipe, refiner, callback, progress, classifier, restore))[0]


def run_all(plans: typing.Sequence[Plan], pipe: Pipeline, refiner: Pipeline | None = None,
            callback: Callback | None = None, progress: bool = False, classifier: NoisyClassifier | None = None,
            restore: bool = True) -> typing.Iterator[Tensor]:
    """Each plan's images in turn, as `run` samples them, with the LoRAs and embeddings of the first plan (which
    all must share) applied once and each distinct prompt list encoded once (a sweep's cells)."""
    r = plans[0].request
    if any((q.request.lora, q.request.embedding) != (r.lora, r.embedding) for q in plans):
        raise ValueError("the plans of one run_all must share their LoRAs and embeddings")
    with (LoRAs(pipe, [parse_lora(spec) for spec in r.lora or ()], restore=restore),  # then taken off
          Embeddings(pipe, [parse_embedding(spec) for spec in r.embedding or ()]), pipe.conditioner.remembering()):
        for p in plans:
            kw = dict(p.generate_kwargs(), generator=torch.Generator().manual_seed(p.request.seed), callback=callback,
                      progress=progress, classifier=classifier)
            if refiner is None:
                yield generate(pipe, p.images, **p.inputs, **kw)
                continue
            z = generate(pipe, p.images, **p.inputs, **kw, denoising_end=p.request.refiner_start, output="latent")
            yield generate(refiner, p.images, **kw, denoising_start=p.request.refiner_start, latents=z)


def sweep_runs(request: Request, axes: typing.Sequence[tuple[str, list[Any]]], pipe: Pipeline,
               refiner: Pipeline | None = None, classifier: NoisyClassifier | None = None,
               progress: bool = False, restore: bool = True) -> typing.Iterator[tuple[Plan, Tensor]]:
    """An X/Y/Z sweep run (`sweep`): every cell planned first (a cell the model cannot run is refused before any
    work), then each cell's plan and images in turn, sharing one model, its LoRAs and embeddings, and the
    prompts' encodings (`run_all`); with `progress`, a bar over the cells."""
    plans = [plan(cell, pipe) for cell in sweep(request, axes)]
    bar = tqdm(list(zip(plans, cell_labels(axes))), desc="sweep", unit="cell", disable=not progress)
    with contextlib.closing(run_all(plans, pipe, refiner, classifier=classifier, restore=restore)) as runs:
        for p, label in bar:
            bar.set_postfix_str(label)
            yield p, next(runs)


@dataclass(frozen=True)
class Limits:
    """What one request may ask of a server; max_side 0 is 8x the largest training side of the served models."""

    max_steps: int = 100
    max_images: int = 64
    max_side: int = 0
    max_queue: int = 32
    max_upload: int = 4 << 20  # bytes of an uploaded image or mask
    keep_jobs: int = 500  # finished jobs listed in the gallery (their files stay on disk)

    def check(self, r: Request) -> None:
        """Refuse a request over the step or image limits (before its uploads are read)."""
        if r.steps > self.max_steps:
            raise ValueError(f"steps {r.steps} is over this server's limit of {self.max_steps}")
        if r.n > self.max_images:
            raise ValueError(f"n {r.n} is over this server's limit of {self.max_images} images per job")

    def check_plan(self, p: Plan) -> None:
        """Refuse a resolved request over the size or image limits (every class: n images each)."""
        r = p.request
        if max(r.height, r.width) > self.max_side:
            raise ValueError(f"size {r.height}x{r.width} is over this server's limit of {self.max_side} a side")
        if p.images > self.max_images:
            raise ValueError(f"{p.images} images is over this server's limit of {self.max_images} per job")


def above_training_size(p: Plan, pipe: Pipeline) -> bool:
    """Whether the plan samples above the model's training size without Upsample Guidance (worth a hint)."""
    r = p.request
    return r.upsample_guidance is None and (r.height > pipe.resolution[0] or r.width > pipe.resolution[1])

