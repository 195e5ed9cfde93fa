"""A synthetic fine-detail multiple-choice benchmark: the project's offline stand-in for V*.

Each item is a cluttered canvas with one small target centred in an evidence box, a question about a
fine attribute of that target (its colour or its shape), four options and the box. The world is tuned
so that a tiny VLM answers well from the crop (the box upscaled 2x, which holds only the target) and
much worse from the full image (a small target among same-sized distractors of the same colours): a
real regional-to-global gap, which is what Vision-OPD distils away.

Everything is deterministic per ``(seed, index)``: each item draws from its own numpy Generator, so
item ``i`` is the same whether the dataset has 5 items or 5000, and PNGs are byte-identical across runs.
"""

from __future__ import annotations

import json
import os
import shlex
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image, ImageDraw, ImageOps
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

# The options are always listed in this order: with shuffled options the tiny model stayed at chance,
# so the benchmark measures seeing the detail, not decoding a permutation.
COLOR_OPTIONS: tuple[str, ...] = ("red", "green", "blue", "yellow")
SHAPE_OPTIONS: tuple[str, ...] = ("circle", "square", "triangle", "diamond")

# Seven saturated colours, all far from the light background. Distractors use all of them (answer colours
# included) so that colour alone is no giveaway at full resolution.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (40, 160, 60),
    "blue": (40, 80, 215),
    "yellow": (235, 200, 30),
    "purple": (140, 60, 170),
    "orange": (240, 130, 30),
    "cyan": (30, 180, 200),
}

COLOR_QUESTION = "What color is the small shape inside the box?"
SHAPE_QUESTION = "What shape is the small object inside the box?"
# The no-box world (``no_box``): the question names the target by its colour, black, which no distractor has (they
# take the seven palette colours), and asks its shape, the fine detail: nothing but the question says where to look.
# Finding the black object is easy at any scale; reading its shape is not, for the smaller targets: the target's
# radius spans NO_BOX_TARGET_SIZE, so the larger ones can be read in the full image and the smaller ones only in a
# crop. (A first version named the target by one of the palette colours: the tiny model never learned to bind the
# colour word to the image, and neither the full image nor the evidence search ever left chance; docs/reproduction.md.)
NO_BOX_QUESTION = "What shape is the {color} object?"
NO_BOX_TARGET_COLOR = "black"
NO_BOX_TARGET_SIZE = (5, 10)
# The box-free world's evidence search (vopd.evidence settings, used by ``vopd reproduce --box-free`` and named in
# tiny-nobox's BUILD.md): coarse windows of half the image, then windows of 0.35 of it inside the best one,
# overlapping by two thirds so that one of them holds a whole 21 px target wherever it sits. (On the base, the generic
# default, 0.25 windows overlapping by half, often cut the larger targets: centre found on 51% of fresh items.)
NO_BOX_SEARCH: dict[str, Any] = {"search_windows": [0.5, 0.35], "search_overlap": 0.67, "search_strategy": "zoom"}
# Every colour a shape may be drawn in: the palette and the box-free world's target colour.
INK: dict[str, tuple[int, int, int]] = {**PALETTE, NO_BOX_TARGET_COLOR: (25, 25, 25)}

# Empty pixels kept between the evidence box and any distractor: the student's view draws a box outline
# (3 px by default) and the teacher's crop may be resampled, neither of which may pick up a distractor.
BOX_CLEARANCE = 3

# Photos are mixed this much toward white so that they stay a light, busy texture behind the shapes
# instead of swallowing a 5 px target.
PHOTO_WHITEN = 0.5

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"})

# Tags mixed into the seeds so the per-item stream and the per-block answer stream never coincide.
_ITEM_STREAM = 0x5EED1
_ANSWER_STREAM = 0x5EED2

QuestionKind = Literal["color", "shape"]


def _parse_range(value: Any) -> Any:
    """Accept ``"12,20"`` (CLI, forms) as well as ``[12, 20]`` (JSON) for a (min, max) pair."""
    if isinstance(value, str):
        parts = [part.strip() for part in value.split(",")]
        if len(parts) != 2 or not all(parts):
            raise ValueError(f"expected MIN,MAX such as 12,20, got {value!r}")
        return tuple(parts)
    return value


class SynthConfig(BaseModel):
    """How to draw the benchmark. Defaults are the world measured to show a clear crop-vs-full gap."""

    model_config = ConfigDict(extra="forbid")

    n: int = Field(..., ge=1, description="Number of items.")
    seed: int = Field(0, ge=0, description="Seed: the same seed gives byte-identical images and records.")
    size: int = Field(112, ge=16, le=4096, description="Side of the square canvas in pixels.")
    box_size: int = Field(24, ge=4, description="Side of the square evidence box in pixels, placed at random.")
    distractors: tuple[int, int] = Field(
        (12, 20), description="Inclusive (min, max) number of distractor shapes, all outside the evidence box."
    )
    target_size: tuple[int, int] = Field(
        (5, 7), description="Inclusive (min, max) radius in pixels of the target (and of the distractors)."
    )
    question: Literal["color", "shape", "both"] = Field(
        "color", description="Ask the target's colour, its shape, or alternate between the two in blocks of four."
    )
    backgrounds: str | None = Field(
        None,
        description="Folder of photos: items are drawn on random crops of them (resized, whitened) instead of noise.",
    )
    id_prefix: str = Field(
        "syn", min_length=1, pattern=r"^[A-Za-z0-9_-]+$", description="Item ids are PREFIX-00001, PREFIX-00002..."
    )
    no_box: bool = Field(
        False,
        description=(
            "The box-free world: the question names the target by its colour ('What shape is the black object?'), "
            "the only black object on the canvas, and asks its shape; the box is written as `hidden_bbox` "
            "(evaluation only), not `bbox`."
        ),
    )
    no_box_target_size: tuple[int, int] = Field(
        NO_BOX_TARGET_SIZE,
        description="Box-free world: inclusive (min, max) radius in pixels of the black target (distractors keep "
        "target_size).",
    )

    @field_validator("distractors", "target_size", "no_box_target_size", mode="before")
    @classmethod
    def _split_range(cls, value: Any) -> Any:
        return _parse_range(value)

    @field_validator("distractors")
    @classmethod
    def _distractor_range(cls, value: tuple[int, int]) -> tuple[int, int]:
        low, high = value
        if low < 0:
            raise ValueError(f"the minimum number of distractors must be >= 0, got {low}")
        if low > high:
            raise ValueError(f"MIN must not exceed MAX, got {low},{high}")
        return value

    @field_validator("target_size", "no_box_target_size")
    @classmethod
    def _radius_range(cls, value: tuple[int, int]) -> tuple[int, int]:
        low, high = value
        if low < 1:
            raise ValueError(f"the smallest radius must be >= 1 px, got {low}")
        if low > high:
            raise ValueError(f"MIN must not exceed MAX, got {low},{high}")
        return value

    @field_validator("backgrounds")
    @classmethod
    def _backgrounds_folder(cls, value: str | None) -> str | None:
        if value is None:
            return None
        folder = Path(value)
        if not folder.is_dir():
            raise ValueError(f"{value} is not a folder")
        if not _background_files(str(folder.resolve()), folder.stat().st_mtime_ns):
            raise ValueError(f"{value} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
        return value

    @model_validator(mode="after")
    def _geometry(self) -> SynthConfig:
        if self.no_box and self.question != "color":
            raise ValueError("no_box always asks the shape of the object its colour names: leave question unset")
        if self.box_size > self.size:
            raise ValueError(f"box_size ({self.box_size}) must not exceed the canvas size ({self.size})")
        largest_radius = max(self.target_size[1], self.no_box_target_size[1] if self.no_box else 0)
        if 2 * largest_radius + 2 > self.box_size:
            raise ValueError(
                f"a target of radius {largest_radius} px does not fit inside a {self.box_size} px box with a 1 px "
                f"margin: use a target radius of at most {(self.box_size - 2) // 2} or a larger box"
            )
        # On the roomier side of the box there is always (size - box_size) / 2 px: one distractor must fit there.
        needed = self.box_size + 2 * BOX_CLEARANCE + 4 * largest_radius + 2
        if self.distractors[1] > 0 and self.size < needed:
            raise ValueError(
                f"a {self.size} px canvas leaves no room for distractors around a {self.box_size} px box: "
                f"use a canvas of at least {needed} px, a smaller box, or --distractors 0,0"
            )
        return self


def format_validation_error(error: ValidationError) -> str:
    """One line for the CLI: ``field: message; field: message``."""
    parts = []
    for item in error.errors():
        where = ".".join(str(part) for part in item["loc"])
        message = item["msg"].removeprefix("Value error, ")
        parts.append(f"{where}: {message}" if where else message)
    return "; ".join(parts)


@dataclass(frozen=True)
class Shape:
    """One drawn shape; every pixel of it lies within ``radius`` of ``center`` on both axes."""

    kind: str  # one of SHAPE_OPTIONS
    color: str  # a key of INK (the palette, or the box-free target colour)
    center: tuple[int, int]  # (x, y) pixel
    radius: int

    @property
    def extent(self) -> tuple[int, int, int, int]:
        """Inclusive pixel bounds (x0, y0, x1, y1)."""
        x, y = self.center
        return x - self.radius, y - self.radius, x + self.radius, y + self.radius


@dataclass(frozen=True)
class Scene:
    """Everything about one item before pixels exist: tests check the geometry here, exactly."""

    index: int
    kind: QuestionKind
    answer_index: int
    bbox: tuple[int, int, int, int]  # [x0, y0, x1, y1), x1 and y1 exclusive as in PIL's crop
    target: Shape
    distractors: tuple[Shape, ...]
    background_file: str | None  # photo used for the background, None for the noise texture

    @property
    def options(self) -> tuple[str, ...]:
        return COLOR_OPTIONS if self.kind == "color" else SHAPE_OPTIONS


def item_id(config: SynthConfig, index: int) -> str:
    """1-based, zero-padded ids so files sort in item order."""
    return f"{config.id_prefix}-{index + 1:05d}"


def _answer_index(seed: int, index: int) -> int:
    """Answers are a fresh random permutation of A-D in every block of four items.

    That balances the letters within +-1 of n/4 for ANY n while keeping item i independent of n.
    """
    block, position = divmod(index, len(COLOR_OPTIONS))
    permutation = np.random.default_rng([seed, block, _ANSWER_STREAM]).permutation(len(COLOR_OPTIONS))
    return int(permutation[position])


def _question_kind(config: SynthConfig, index: int) -> QuestionKind:
    """``both`` alternates blocks of four, so each kind also gets balanced answers and half the items."""
    if config.no_box:
        return "shape"
    if config.question != "both":
        return config.question
    return "color" if (index // len(COLOR_OPTIONS)) % 2 == 0 else "shape"


def _overlaps_box(extent: tuple[int, int, int, int], bbox: tuple[int, int, int, int], clearance: int) -> bool:
    x0, y0, x1, y1 = extent
    bx0, by0, bx1, by1 = bbox
    return not (x1 < bx0 - clearance or x0 > bx1 - 1 + clearance or y1 < by0 - clearance or y0 > by1 - 1 + clearance)


def _place_distractor(
    rng: np.random.Generator, size: int, radius: int, bbox: tuple[int, int, int, int], placed: list[Shape]
) -> tuple[int, int]:
    """A centre outside the box (plus clearance), preferably not touching earlier distractors.

    Rejection sampling is fast in the default world; the exhaustive fallback keeps crowded settings correct.
    """
    for _ in range(40):
        x, y = (int(v) for v in rng.integers(radius, size - radius, size=2))
        shape_extent = (x - radius, y - radius, x + radius, y + radius)
        if _overlaps_box(shape_extent, bbox, BOX_CLEARANCE):
            continue
        if all(max(abs(x - s.center[0]), abs(y - s.center[1])) > radius + s.radius for s in placed):
            return x, y
    # Every centre whose square extent stays clear of the box; prefer those not touching other shapes.
    coords = np.arange(radius, size - radius)
    xs, ys = (grid.ravel() for grid in np.meshgrid(coords, coords))
    bx0, by0, bx1, by1 = bbox
    clear = (
        (xs + radius < bx0 - BOX_CLEARANCE)
        | (xs - radius > bx1 - 1 + BOX_CLEARANCE)
        | (ys + radius < by0 - BOX_CLEARANCE)
        | (ys - radius > by1 - 1 + BOX_CLEARANCE)
    )
    free = clear.copy()
    for s in placed:
        free &= np.maximum(np.abs(xs - s.center[0]), np.abs(ys - s.center[1])) > radius + s.radius
    candidates = np.flatnonzero(free if free.any() else clear)
    chosen = int(candidates[rng.integers(len(candidates))])
    return int(xs[chosen]), int(ys[chosen])


def plan_item(config: SynthConfig, index: int) -> Scene:
    """The scene of item ``index``: pure geometry, deterministic per (seed, index)."""
    if index < 0:
        raise ValueError(f"item index must be >= 0, got {index}")
    rng = np.random.default_rng([config.seed, index, _ITEM_STREAM])
    kind = _question_kind(config, index)
    answer_index = _answer_index(config.seed, index)
    size, box = config.size, config.box_size
    shape_names, color_names = list(SHAPE_OPTIONS), list(PALETTE)

    x0, y0 = (int(v) for v in rng.integers(0, size - box + 1, size=2))
    bbox = (x0, y0, x0 + box, y0 + box)
    radius = int(rng.integers(config.target_size[0], config.target_size[1] + 1))
    if kind == "color":
        target_color, target_kind = COLOR_OPTIONS[answer_index], shape_names[rng.integers(len(shape_names))]
    else:
        target_color, target_kind = color_names[rng.integers(len(color_names))], SHAPE_OPTIONS[answer_index]
    if config.no_box:  # the only black object, of its own size range: the question names it, no box needed
        target_color = NO_BOX_TARGET_COLOR
        radius = int(rng.integers(config.no_box_target_size[0], config.no_box_target_size[1] + 1))
    target = Shape(target_kind, target_color, (x0 + box // 2, y0 + box // 2), radius)

    count = int(rng.integers(config.distractors[0], config.distractors[1] + 1))
    distractors: list[Shape] = []
    for _ in range(count):
        d_radius = int(rng.integers(config.target_size[0], config.target_size[1] + 1))
        d_kind = shape_names[rng.integers(len(shape_names))]
        d_color = color_names[rng.integers(len(color_names))]
        center = _place_distractor(rng, size, d_radius, bbox, distractors)
        distractors.append(Shape(d_kind, d_color, center, d_radius))

    background_file = None
    if config.backgrounds is not None:
        files = _background_files_of(config.backgrounds)
        background_file = str(files[rng.integers(len(files))])
    return Scene(index, kind, answer_index, bbox, target, tuple(distractors), background_file)


# --------------------------------------------------------------------------- pixels
def _noise_background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A light, slightly tinted texture: smooth blotches plus fine grain, never near a palette colour."""
    base = rng.uniform(218, 240) + rng.uniform(-6, 6, size=3)  # (3,)
    blotches = Image.fromarray((128 + rng.normal(0, 10, size=(4, 4))).clip(0, 255).astype(np.uint8))
    smooth = np.asarray(blotches.resize((size, size), Image.Resampling.BILINEAR), dtype=np.float32) - 128  # (H, W)
    grain = rng.normal(0, 5, size=(size, size, 3))  # (H, W, 3)
    return (base + smooth[..., None] + grain).clip(185, 255).astype(np.uint8)  # (H, W, 3)


@lru_cache(maxsize=16)
def _background_files(folder: str, mtime_ns: int) -> tuple[Path, ...]:
    """Sorted image files of a folder; the folder's mtime in the key notices added or removed files."""
    del mtime_ns
    return tuple(sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()))


def _background_files_of(folder: str) -> tuple[Path, ...]:
    path = Path(folder).resolve()
    files = _background_files(str(path), path.stat().st_mtime_ns)
    if not files:
        raise ValueError(f"{folder} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return files


@lru_cache(maxsize=64)
def _load_photo(path: str, mtime_ns: int, size: int) -> Image.Image:
    """A photo upright and in RGB, shrunk so its short side is at most 2x the canvas (crops are >= half of it)."""
    del mtime_ns
    with Image.open(path) as opened:
        photo = ImageOps.exif_transpose(opened).convert("RGB")
    scale = 2 * size / min(photo.size)
    if scale < 1:
        photo = photo.resize(
            (max(1, round(photo.width * scale)), max(1, round(photo.height * scale))), Image.Resampling.LANCZOS
        )
    return photo


def _photo_background(rng: np.random.Generator, path: str, size: int) -> np.ndarray:
    """A random square crop (half to all of the short side) of a photo, resized and whitened."""
    photo = _load_photo(path, Path(path).stat().st_mtime_ns, size)
    short = min(photo.size)
    side = max(1, int(round(short * rng.uniform(0.5, 1.0))))
    left = int(rng.integers(0, photo.width - side + 1))
    top = int(rng.integers(0, photo.height - side + 1))
    crop = photo.crop((left, top, left + side, top + side)).resize((size, size), Image.Resampling.BILINEAR)
    pixels = np.asarray(crop, dtype=np.float32)  # (H, W, 3)
    return (pixels * (1 - PHOTO_WHITEN) + 255 * PHOTO_WHITEN).round().astype(np.uint8)


def _draw_shape(draw: ImageDraw.ImageDraw, shape: Shape) -> None:
    """Solid, aliased fill: every shape covers its centre pixel and stays inside its extent."""
    x, y = shape.center
    r = shape.radius
    fill = INK[shape.color]
    if shape.kind == "circle":
        draw.ellipse((x - r, y - r, x + r, y + r), fill=fill)
    elif shape.kind == "square":
        half = max(1, round(0.8 * r))  # a square inscribed in the radius would look tiny next to the circle
        draw.rectangle((x - half, y - half, x + half, y + half), fill=fill)
    elif shape.kind == "triangle":
        # Equilateral, pointing up, circumcentre (= centroid) on the centre pixel.
        offset_x, offset_y = 0.866 * r, 0.5 * r
        draw.polygon([(x, y - r), (x + offset_x, y + offset_y), (x - offset_x, y + offset_y)], fill=fill)
    elif shape.kind == "diamond":
        draw.polygon([(x, y - r), (x + r, y), (x, y + r), (x - r, y)], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape.kind!r}")


def render_scene(config: SynthConfig, scene: Scene) -> Image.Image:
    """Pixels of a planned scene; the background draws from its own stream so geometry never depends on it."""
    rng = np.random.default_rng([config.seed, scene.index, _ITEM_STREAM, 1])
    if scene.background_file is None:
        pixels = _noise_background(rng, config.size)
    else:
        pixels = _photo_background(rng, scene.background_file, config.size)
    image = Image.fromarray(pixels)  # (H, W, 3) uint8 -> RGB
    draw = ImageDraw.Draw(image)
    for shape in scene.distractors:
        _draw_shape(draw, shape)
    _draw_shape(draw, scene.target)
    return image


def scene_record(config: SynthConfig, scene: Scene) -> dict[str, Any]:
    """The JSONL record (the format ``vopd.data.load_dataset`` reads); ``image`` is relative to data.jsonl."""
    identifier = item_id(config, scene.index)
    if config.no_box:
        question = NO_BOX_QUESTION.format(color=scene.target.color)
    else:
        question = COLOR_QUESTION if scene.kind == "color" else SHAPE_QUESTION
    record = {
        "id": identifier,
        "image": f"images/{identifier}.png",
        "question": question,
        "options": list(scene.options),
        "answer": scene.options[scene.answer_index],
    }
    # Box-free items keep their box for evaluation only (oracle crop, whether the search found the target): the
    # trainer in search mode never reads `hidden_bbox`.
    record["hidden_bbox" if config.no_box else "bbox"] = list(scene.bbox)
    return record


def generate_item(config: SynthConfig, index: int) -> tuple[Image.Image, dict[str, Any]]:
    """Item ``index`` (0-based) as (image, record); identical for any ``n`` and any generation order."""
    scene = plan_item(config, index)
    return render_scene(config, scene), scene_record(config, scene)


def generate_items(config: SynthConfig) -> Iterator[tuple[Image.Image, dict[str, Any]]]:
    """All ``config.n`` items in memory, for pretraining loops that never touch the disk."""
    for index in range(config.n):
        yield generate_item(config, index)


# --------------------------------------------------------------------------- files
def synth_command(config: SynthConfig, output_dir: str | Path) -> str:
    """The ``vopd synth`` command line that regenerates this dataset (non-default knobs only)."""
    defaults = SynthConfig(n=config.n)
    parts = ["vopd", "synth", "--output", str(output_dir), "--n", str(config.n), "--seed", str(config.seed)]
    for field in (
        "size",
        "box_size",
        "distractors",
        "target_size",
        "question",
        "backgrounds",
        "id_prefix",
        "no_box",
        "no_box_target_size",
    ):
        value = getattr(config, field)
        if value == getattr(defaults, field):
            continue
        if isinstance(value, bool):
            parts.append(f"--{field.replace('_', '-')}")
            continue
        rendered = f"{value[0]},{value[1]}" if isinstance(value, tuple) else str(value)
        parts += [f"--{field.replace('_', '-')}", rendered]
    return " ".join(shlex.quote(part) for part in parts)


def answer_summary(records: Iterable[dict[str, Any]]) -> str:
    """One line: item count, answers by letter and by text, e.g. for the CLI and the README."""
    letters: Counter[str] = Counter()
    answers: Counter[str] = Counter()
    total = 0
    for record in records:
        total += 1
        letters["ABCD"[record["options"].index(record["answer"])]] += 1
        answers[record["answer"]] += 1
    by_letter = " ".join(f"{letter}={letters[letter]}" for letter in "ABCD")
    by_answer = " ".join(f"{name}={count}" for name, count in sorted(answers.items()))
    return f"{total} items; answers by letter: {by_letter}; by option: {by_answer}"


def _readme(config: SynthConfig, output_dir: Path, summary: str) -> str:
    rows = "\n".join(f"| {name} | {json.dumps(value)} |" for name, value in config.model_dump(mode="json").items())
    return (
        "# Synthetic fine-detail benchmark\n\n"
        "Generated by `vopd.synth`: a small target centred in the evidence box among same-sized distractors "
        "(none inside the box), a question about the target's colour or shape, four options in a fixed order.\n\n"
        f"{summary}\n\n## Parameters\n\n| parameter | value |\n|---|---|\n{rows}\n\n"
        "## Regenerate (byte-identical)\n\n"
        f"```\n{synth_command(config, output_dir)}\n```\n\n"
        "## Format\n\n`data.jsonl`: one object per line with `id`, `image` (relative to this folder), "
        "`question`, `options`, `answer` (the option text) and `bbox` `[x0, y0, x1, y1]` in pixels "
        "(x1, y1 exclusive).\n"
        + (
            "\nBox-free world (`--no-box`): the question names the target by its colour, the only object of that "
            "colour on the canvas, and asks its shape; the box is stored as `hidden_bbox` for evaluation only and "
            "training never reads it.\n"
            if config.no_box
            else ""
        )
    )


def generate_dataset(output_dir: str | Path, config: SynthConfig, *, progress: bool = False) -> Path:
    """Write DIR/images/*.png, DIR/README.md and, last, DIR/data.jsonl; return the data.jsonl path.

    data.jsonl appears only once every image exists (temp file + rename), so a reader never sees a
    record whose image is missing, and an interrupted run leaves no dataset behind to be mistaken for one.
    """
    output = Path(output_dir)
    images_dir = output / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    indices: Iterable[int] = range(config.n)
    if progress:
        from tqdm import tqdm

        indices = tqdm(indices, total=config.n, desc="synth", unit="item")
    records = []
    for index in indices:
        image, record = generate_item(config, index)
        image.save(output / record["image"], format="PNG")
        records.append(record)

    summary = answer_summary(records)
    (output / "README.md").write_text(_readme(config, output, summary), encoding="utf-8")
    data_path = output / "data.jsonl"
    temp_path = output / f".data.jsonl.{os.getpid()}.tmp"  # same folder, so the rename is atomic
    try:
        with temp_path.open("w", encoding="utf-8") as temp_file:
            for record in records:
                temp_file.write(json.dumps(record) + "\n")
        os.replace(temp_path, data_path)
    except BaseException:
        temp_path.unlink(missing_ok=True)
        raise
    return data_path
