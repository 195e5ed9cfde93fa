"""Samples (image, question, options, evidence box, answer) and the datasets that hold them.

Two file layouts are read:

* **JSONL**, one object per line (our own format, written by ``vopd synth`` and uploads)::

    {"id": "syn-00001", "image": "images/syn-00001.png", "question": "What color is the shape inside the box?",
     "options": ["red", "green", "blue", "yellow"], "answer": "green", "bbox": [40, 52, 64, 76]}

  ``image`` is relative to the dataset file's folder (or ``image_base64`` carries the bytes); ``crop_image`` /
  ``crop_image_base64`` optionally give a precomputed teacher crop; ``id``, ``options``, ``answer`` and ``bbox`` are
  optional: a sample with neither a box nor a crop is a plain VQA item whose teacher crop the model finds itself
  (``views.evidence: search``, see ``vopd.evidence``). ``hidden_bbox`` is a box kept for evaluation only (oracle
  crop, whether the search found the target; ``vopd synth --no-box`` writes it); training never reads it. Other keys
  are ignored.

* **Parquet**, our columns or the verl-style layout of Vision-OPD-6K training files. Column names, first present
  wins:

  ============  ==========================================================================
  image         ``image``, ``images``
  crop          ``crop_image``, ``bbox_images``, ``teacher_images``
  question      ``question``, ``problem``, ``extra_info.question``, ``prompt`` (last user turn)
  answer        ``answer``, ``reward_model.ground_truth``, ``extra_info.answer``
  options       ``options``
  bbox          ``bbox``, ``bbox_2d``
  id            ``id``, ``sample_id``
  ============  ==========================================================================

  An image cell is raw bytes, an HF-datasets struct ``{"bytes": ..., "path": ...}``, a relative path string, or a
  list of those (the first is taken); a path is relative to the Parquet file's folder, under the same rules as JSONL.
  The names ``images`` / ``bbox_images`` / ``prompt`` / ``reward_model`` / ``extra_info`` follow the Vision-OPD-6K
  parquets of public reproductions (not checked against the official release, which we could not read). Their
  problems embed the ``<image>`` placeholder and often the paper's hint sentence: both are removed here because the
  views add their own.
  Multiple-choice options embedded in a Parquet question's text are left in the text (no ``options`` column means a
  free-form question whose answer is compared as written).

Validation reports *every* problem with its 1-based line (Parquet: row index + 1) and field, so a user fixes a
file in one pass instead of one error per upload.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import math
import string
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, model_validator

from vopd.config import PAPER_HINT

DEFAULT_MAX_IMAGE_PIXELS = 50_000_000
_LETTERS = string.ascii_uppercase
_PARQUET_MAGIC = b"PAR1"
_IMAGE_PLACEHOLDER = "<image>"


# --------------------------------------------------------------------------- option letters
def option_letter(index: int) -> str:
    """The letter shown before option ``index`` (0 -> "A"); options beyond Z cannot be named by one letter."""
    if not 0 <= index < len(_LETTERS):
        raise ValueError(f"option index must be between 0 and {len(_LETTERS) - 1}, got {index}")
    return _LETTERS[index]


def letter_index(letter: str) -> int:
    """The option index named by a single letter ("B" or "b" -> 1)."""
    cleaned = letter.strip().upper() if isinstance(letter, str) else ""
    if len(cleaned) != 1 or cleaned not in _LETTERS:
        raise ValueError(f"expected a single option letter A-Z, got {letter!r}")
    return _LETTERS.index(cleaned)


# --------------------------------------------------------------------------- rules shared by Sample and the loader
def _options_problem(options: list[str] | None) -> str | None:
    if options is None:
        return None
    if len(options) < 2:
        return f"a multiple-choice question needs at least 2 options, got {len(options)}"
    if len(options) > len(_LETTERS):
        return f"at most {len(_LETTERS)} options can be lettered, got {len(options)}"
    if any(not option.strip() for option in options):
        return "options must be non-empty strings"
    if len(set(options)) != len(options):
        return "options must be distinct, otherwise the answer is ambiguous"
    return None


def _resolve_answer_option(answer: str | None, options: list[str] | None) -> tuple[str | None, str | None]:
    """Return (answer as option text, problem). Exact option text wins over a letter, so options such as
    ["A", "B"] keep their meaning."""
    if answer is None or not options:
        return answer, None
    if answer in options:
        return answer, None
    stripped = answer.strip()
    if stripped in options:
        return stripped, None
    if len(stripped) == 1 and stripped.upper() in _LETTERS:
        index = _LETTERS.index(stripped.upper())
        if index < len(options):
            return options[index], None
        last = option_letter(len(options) - 1)
        return None, f"answer letter {stripped!r} is beyond the {len(options)} options (A-{last})"
    return None, f"answer {answer!r} is neither one of the options {options} nor an option letter"


def _box_problem(bbox: Any) -> str | None:
    if not isinstance(bbox, list | tuple) or len(bbox) != 4:
        return f"bbox must be 4 numbers [x0, y0, x1, y1], got {bbox!r}"
    if any(isinstance(value, bool) or not isinstance(value, int | float) for value in bbox):
        return f"bbox must be 4 numbers [x0, y0, x1, y1], got {bbox!r}"
    if not all(math.isfinite(value) for value in bbox):
        return f"bbox values must be finite, got {bbox!r}"
    x0, y0, x1, y1 = bbox
    if x1 <= x0 or y1 <= y0:
        return f"bbox {list(bbox)} is inverted or has zero area: need x1 > x0 and y1 > y0"
    if x0 < 0 or y0 < 0:
        return f"bbox {list(bbox)} starts outside the image (negative coordinate)"
    return None


def _box_outside_problem(bbox: tuple[float, float, float, float], width: int, height: int) -> str | None:
    x0, y0, x1, y1 = bbox
    if x0 < 0 or y0 < 0 or x1 > width or y1 > height:
        return f"bbox {list(bbox)} lies outside the {width}x{height} image"
    return None


# --------------------------------------------------------------------------- image decoding
class ImageError(ValueError):
    """An image that cannot be used; the message says why, without naming the field (the caller knows it)."""


def decode_image(source: Path | bytes, *, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """Fully decode an image to RGB, refusing decompression bombs from the header *before* decoding.

    PIL's own guard (Image.MAX_IMAGE_PIXELS) is process-wide; reading the size from the lazily opened header keeps
    the limit per call. verify() catches corrupt chunks, load() catches truncation: each misses what the other sees.
    """

    def open_image() -> Image.Image:
        return Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)

    try:
        with warnings.catch_warnings():
            # Our own limit replaces PIL's warning; PIL still raises DecompressionBombError far beyond its limit.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with open_image() as probe:
                width, height = probe.size
                if width * height > max_pixels:
                    raise ImageError(
                        f"image is {width}x{height} = {width * height} pixels, over the limit of {max_pixels}"
                    )
                probe.verify()
            with open_image() as image:
                image.load()
                return _to_rgb(image)
    except ImageError:
        raise
    except Image.DecompressionBombError as error:
        raise ImageError(f"image is over the pixel limit ({error})") from error
    except FileNotFoundError as error:
        raise ImageError(f"image file not found: {error.filename}") from error
    except Exception as error:  # PIL plugins raise OSError, SyntaxError, ValueError, struct.error... on bad data
        raise ImageError(f"unreadable or truncated image ({type(error).__name__}: {error})") from error


def _to_rgb(image: Image.Image) -> Image.Image:
    """Composite transparency onto white: converting RGBA straight to RGB would turn clear pixels black."""
    has_alpha = image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info)
    if not has_alpha:
        return image.convert("RGB")
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


# --------------------------------------------------------------------------- records
class Sample(BaseModel):
    """One question about one image with the evidence box the answer depends on.

    Images are kept as a path or encoded bytes and decoded on demand, so a dataset of thousands of samples does not
    hold thousands of decoded bitmaps.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    id: str = Field(..., min_length=1)
    question: str
    options: list[str] | None = None
    answer: str | None = Field(None, description="The correct option's text (a letter given on input is resolved).")
    bbox: tuple[float, float, float, float] | None = Field(None, description="[x0, y0, x1, y1] in image pixels.")
    hidden_bbox: tuple[float, float, float, float] | None = Field(
        None, description="A box for evaluation only (the oracle crop of a box-free item); training never reads it."
    )
    search_box: tuple[float, float, float, float] | None = Field(
        None,
        description=(
            "The evidence box the model's own search chose (vopd.evidence), set at run time, never read from a file: "
            "the teacher's crop of a sample without a box."
        ),
    )
    image_path: Path | None = None
    image_bytes: bytes | None = Field(None, repr=False)
    crop_bytes: bytes | None = Field(None, repr=False)
    crop_path: Path | None = None

    @model_validator(mode="after")
    def _consistent(self) -> Sample:
        problems = _sample_problems(self)
        if problems:
            raise ValueError("; ".join(f"{field}: {message}" for field, message in problems))
        self.answer, _ = _resolve_answer_option(self.answer, self.options)
        return self

    @property
    def has_crop(self) -> bool:
        return self.crop_bytes is not None or self.crop_path is not None

    @property
    def answer_index(self) -> int | None:
        if self.answer is None or not self.options:
            return None
        return self.options.index(self.answer)

    @property
    def answer_letter(self) -> str | None:
        index = self.answer_index
        return None if index is None else option_letter(index)

    def load_image(self, *, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
        """The full image, decoded and verified, in RGB."""
        source = self.image_bytes if self.image_bytes is not None else self.image_path
        assert source is not None  # guaranteed by the validator
        try:
            return decode_image(source, max_pixels=max_pixels)
        except ImageError as error:
            raise ValueError(f"sample {self.id!r}: {error}") from error

    def load_crop(self, *, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image | None:
        """The precomputed teacher crop in RGB, or None when the crop is to be cut from the box."""
        source = self.crop_bytes if self.crop_bytes is not None else self.crop_path
        if source is None:
            return None
        try:
            return decode_image(source, max_pixels=max_pixels)
        except ImageError as error:
            raise ValueError(f"sample {self.id!r} crop: {error}") from error


def _sample_problems(sample: Sample) -> list[tuple[str, str]]:
    problems: list[tuple[str, str]] = []
    if not sample.question.strip():
        problems.append(("question", "question must not be empty"))
    if (problem := _options_problem(sample.options)) is not None:
        problems.append(("options", problem))
    elif (problem := _resolve_answer_option(sample.answer, sample.options)[1]) is not None:
        problems.append(("answer", problem))
    if (sample.image_path is None) == (sample.image_bytes is None):
        problems.append(("image", "give exactly one of image_path and image_bytes"))
    if sample.crop_path is not None and sample.crop_bytes is not None:
        problems.append(("crop_image", "give at most one of crop_path and crop_bytes"))
    # No box and no crop is a plain VQA item: the teacher's crop comes from the evidence search (vopd.evidence).
    for name in ("bbox", "hidden_bbox", "search_box"):
        box = getattr(sample, name)
        if box is not None and (problem := _box_problem(box)) is not None:
            problems.append((name, problem))
    return problems


class DatasetIssue(BaseModel):
    """One problem in a dataset file; ``line`` 0 means the file as a whole."""

    line: int
    field: str
    message: str

    def __str__(self) -> str:
        return f"line {self.line}, field {self.field}: {self.message}"


class DatasetError(ValueError):
    """A dataset that cannot be used, listing every problem found (not just the first)."""

    def __init__(self, issues: list[DatasetIssue], path: str | Path | None = None) -> None:
        self.issues = issues
        self.path = Path(path) if path is not None else None
        listing = "\n".join(f"  {issue}" for issue in issues)
        where = f"{path}: " if path is not None else ""
        super().__init__(f"{where}{len(issues)} problem(s) in the dataset:\n{listing}")

    def __reduce__(self) -> tuple[type[DatasetError], tuple[list[DatasetIssue], Path | None]]:
        # Celery pickles exceptions across processes; the default would call __init__ with the message alone.
        return type(self), (self.issues, self.path)


# --------------------------------------------------------------------------- loading
@dataclass
class _ImageRef:
    """Where one image of a record comes from, before it is resolved against the dataset folder."""

    kind: Literal["path", "bytes"]
    value: Any
    field: str


@dataclass
class _RawRecord:
    """One row in canonical names, whatever the file layout; ``fields`` maps canonical names to the file's names
    so every message points at what the user wrote."""

    line: int
    values: dict[str, Any]
    image: _ImageRef | None
    crop: _ImageRef | None
    fields: dict[str, str]


def load_dataset(
    path: str | Path,
    *,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    check_images: bool = True,
    strip_answers: bool = False,
    limit: int | None = None,
) -> list[Sample]:
    """Read and validate a JSONL or Parquet dataset.

    check_images decodes every image (and crop) to catch corrupt files and boxes outside the image; without it only
    paths are checked, which is fast but defers those errors to first use. strip_answers drops the answers, for
    inference on data whose labels must not be seen. limit reads only the first N records.
    """
    samples, issues = _load(path, max_image_pixels, check_images, strip_answers, limit)
    if issues:
        raise DatasetError(issues, path)
    return samples


def validate_dataset(
    path: str | Path,
    *,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    check_images: bool = True,
    strip_answers: bool = False,
    limit: int | None = None,
) -> list[DatasetIssue]:
    """Every problem of a dataset file, never raising for bad data; an empty list means it loads."""
    try:
        _, issues = _load(path, max_image_pixels, check_images, strip_answers, limit)
    except FileNotFoundError as error:
        return [DatasetIssue(line=0, field="file", message=str(error))]
    return issues


def _load(
    path: str | Path, max_image_pixels: int, check_images: bool, strip_answers: bool, limit: int | None
) -> tuple[list[Sample], list[DatasetIssue]]:
    if max_image_pixels < 1:
        raise ValueError(f"max_image_pixels must be positive, got {max_image_pixels}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be at least 1, got {limit}")
    dataset_path = Path(path)
    if not dataset_path.is_file():
        raise FileNotFoundError(f"dataset file not found: {dataset_path}")
    root = dataset_path.resolve().parent
    issues: list[DatasetIssue] = []
    with dataset_path.open("rb") as stream:
        is_parquet = stream.read(len(_PARQUET_MAGIC)) == _PARQUET_MAGIC
    records = _parquet_records(dataset_path, issues) if is_parquet else _jsonl_records(dataset_path, issues)

    samples: list[Sample] = []
    first_line_of_id: dict[str, int] = {}
    for index, record in enumerate(records):
        if limit is not None and index >= limit:
            break
        sample = _build_sample(record, root, max_image_pixels, check_images, issues)
        if sample is None:
            continue
        if sample.id in first_line_of_id:
            issues.append(
                DatasetIssue(
                    line=record.line,
                    field=record.fields["id"],
                    message=f"duplicate id {sample.id!r} (first used on line {first_line_of_id[sample.id]})",
                )
            )
            continue
        first_line_of_id[sample.id] = record.line
        if strip_answers:
            sample.answer = None
        samples.append(sample)
    if not samples and not issues:
        issues.append(DatasetIssue(line=0, field="file", message="the dataset holds no samples"))
    return samples, issues


def _build_sample(
    record: _RawRecord, root: Path, max_image_pixels: int, check_images: bool, issues: list[DatasetIssue]
) -> Sample | None:
    found: list[tuple[str, str]] = []  # (canonical field, message)
    fields = _checked_fields(record, found)
    image_path, image_bytes = _resolve_image(record.image, "image", root, found)
    crop_path, crop_bytes = _resolve_image(record.crop, "crop", root, found) if record.crop else (None, None)
    if check_images:
        size = _decoded_size(image_bytes if image_bytes is not None else image_path, "image", max_image_pixels, found)
        for name in ("bbox", "hidden_bbox"):
            box = fields[name]
            if size is not None and box is not None and (problem := _box_outside_problem(box, *size)) is not None:
                found.append((name, problem))
        _decoded_size(crop_bytes if crop_bytes is not None else crop_path, "crop", max_image_pixels, found)

    for field, message in found:
        source_field = record.fields.get(field, field)
        if field == "image" and record.image is not None:
            source_field = record.image.field
        elif field == "crop" and record.crop is not None:
            source_field = record.crop.field
        issues.append(DatasetIssue(line=record.line, field=source_field, message=message))
    if found:
        return None
    return Sample(**fields, image_path=image_path, image_bytes=image_bytes, crop_path=crop_path, crop_bytes=crop_bytes)


def _checked_fields(record: _RawRecord, found: list[tuple[str, str]]) -> dict[str, Any]:
    """The text and box fields of a record, type-checked; each problem is appended to ``found``."""
    values = record.values
    raw_id = values.get("id")
    if raw_id is None:
        sample_id = f"line-{record.line}"
    elif isinstance(raw_id, str) and raw_id.strip():
        sample_id = raw_id.strip()
    elif isinstance(raw_id, int) and not isinstance(raw_id, bool):
        sample_id = str(raw_id)
    else:
        sample_id = ""
        found.append(("id", f"id must be a non-empty string or an integer, got {raw_id!r}"))

    question = values.get("question")
    if question is None:
        found.append(("question", "question is missing"))
    elif not isinstance(question, str):
        found.append(("question", f"question must be a string, got {type(question).__name__}"))
    elif not question.strip():
        found.append(("question", "question must not be empty"))

    options = values.get("options")
    if options is not None and (
        not isinstance(options, list) or any(not isinstance(option, str) for option in options)
    ):
        found.append(("options", f"options must be a list of strings, got {options!r}"))
        options = None
    elif (problem := _options_problem(options)) is not None:
        found.append(("options", problem))
        options = None

    answer = values.get("answer")
    if isinstance(answer, int | float) and not isinstance(answer, bool):
        answer = str(answer)  # free-form numeric answers
    if answer is not None and not isinstance(answer, str):
        found.append(("answer", f"answer must be a string, got {type(answer).__name__}"))
    elif options is not None and (problem := _resolve_answer_option(answer, options)[1]) is not None:
        found.append(("answer", problem))

    boxes: dict[str, tuple[float, ...] | None] = {}
    for name in ("bbox", "hidden_bbox"):
        box = values.get(name)
        if isinstance(box, list) and len(box) == 1 and isinstance(box[0], list | tuple):
            box = list(box[0])  # Qwen-style bbox_2d: a list holding one box
        if box is not None and (problem := _box_problem(box)) is not None:
            found.append((name, problem.replace("bbox", name, 1) if name != "bbox" else problem))
            box = None
        boxes[name] = tuple(box) if box is not None else None
    # A record without a box or crop is a plain VQA item: the teacher's crop is searched for (vopd.evidence).
    return {
        "id": sample_id,
        "question": question,
        "options": options,
        "answer": answer,
        "bbox": boxes["bbox"],
        "hidden_bbox": boxes["hidden_bbox"],
    }


def _decoded_size(
    source: Path | bytes | None, canonical: str, max_pixels: int, found: list[tuple[str, str]]
) -> tuple[int, int] | None:
    """Decode an image only to prove it usable; nothing decoded is kept, so validation memory stays flat."""
    if source is None:
        return None
    try:
        with decode_image(source, max_pixels=max_pixels) as image:
            return image.size
    except ImageError as error:
        found.append((canonical, str(error)))
        return None


def _resolve_image(
    ref: _ImageRef | None, canonical: str, root: Path, found: list[tuple[str, str]]
) -> tuple[Path | None, bytes | None]:
    """A path inside the dataset folder or the decoded bytes; anything else becomes a problem."""
    if ref is None:
        found.append((canonical, "image is missing"))
        return None, None
    if ref.kind == "bytes":
        if not ref.value:
            found.append((canonical, "image bytes are empty"))
            return None, None
        return None, ref.value
    relative = ref.value
    if not isinstance(relative, str) or not relative.strip():
        found.append((canonical, f"image path must be a non-empty string, got {relative!r}"))
        return None, None
    candidate = Path(relative)
    if candidate.is_absolute():
        found.append((canonical, f"absolute paths are refused; give a path relative to the dataset folder: {relative}"))
        return None, None
    if ".." in candidate.parts:
        found.append((canonical, f"'..' is refused: image paths must stay inside the dataset folder: {relative}"))
        return None, None
    resolved = (root / candidate).resolve()
    if not resolved.is_relative_to(root):
        found.append((canonical, f"image path resolves outside the dataset folder (symlink?): {relative}"))
        return None, None
    if not resolved.is_file():
        found.append((canonical, f"image file not found: {relative}"))
        return None, None
    return resolved, None


# --------------------------------------------------------------------------- JSONL
def _jsonl_records(path: Path, issues: list[DatasetIssue]) -> Iterator[_RawRecord]:
    with path.open("rb") as stream:
        for line_number, raw_line in enumerate(stream, start=1):
            try:
                text = raw_line.decode("utf-8-sig" if line_number == 1 else "utf-8")
            except UnicodeDecodeError as error:
                issues.append(DatasetIssue(line=line_number, field="json", message=f"not valid UTF-8 ({error})"))
                continue
            if not text.strip():
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError as error:
                issues.append(DatasetIssue(line=line_number, field="json", message=f"invalid JSON: {error}"))
                continue
            if not isinstance(record, dict):
                issues.append(
                    DatasetIssue(
                        line=line_number, field="json", message=f"each line must be a JSON object, got {record!r:.60}"
                    )
                )
                continue
            image = _jsonl_image_ref(record, "image", "image_base64", line_number, issues)
            crop = _jsonl_image_ref(record, "crop_image", "crop_image_base64", line_number, issues)
            if image is False or crop is False:
                continue
            yield _RawRecord(
                line=line_number,
                values={key: record.get(key) for key in ("id", "question", "options", "answer", "bbox", "hidden_bbox")},
                image=image,
                crop=crop,
                fields={
                    "id": "id",
                    "question": "question",
                    "options": "options",
                    "answer": "answer",
                    "bbox": "bbox",
                    "hidden_bbox": "hidden_bbox",
                },
            )


def _jsonl_image_ref(
    record: dict[str, Any], path_key: str, base64_key: str, line: int, issues: list[DatasetIssue]
) -> _ImageRef | None | Literal[False]:
    """The image reference of a JSONL record; False when it is broken beyond reporting per field."""
    has_path = record.get(path_key) is not None
    has_base64 = record.get(base64_key) is not None
    if has_path and has_base64:
        issues.append(DatasetIssue(line=line, field=path_key, message=f"give {path_key} or {base64_key}, not both"))
        return False
    if has_path:
        return _ImageRef("path", record[path_key], path_key)
    if not has_base64:
        return None
    encoded = record[base64_key]
    if not isinstance(encoded, str):
        issues.append(DatasetIssue(line=line, field=base64_key, message="must be a base64 string"))
        return False
    if encoded.startswith("data:") and "," in encoded:  # tolerate data URLs from browsers
        encoded = encoded.split(",", 1)[1]
    try:
        return _ImageRef("bytes", base64.b64decode(encoded, validate=True), base64_key)
    except (binascii.Error, ValueError) as error:
        issues.append(DatasetIssue(line=line, field=base64_key, message=f"invalid base64 ({error})"))
        return False


# --------------------------------------------------------------------------- Parquet
_PARQUET_IMAGE_COLUMNS = ("image", "images")
_PARQUET_CROP_COLUMNS = ("crop_image", "bbox_images", "teacher_images")
_PARQUET_QUESTION_COLUMNS = ("question", "problem")
_PARQUET_ID_COLUMNS = ("id", "sample_id")
_PARQUET_BBOX_COLUMNS = ("bbox", "bbox_2d")


def _parquet_records(path: Path, issues: list[DatasetIssue]) -> Iterator[_RawRecord]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as error:  # pyarrow raises ArrowInvalid / OSError on a damaged file
        issues.append(DatasetIssue(line=0, field="file", message=f"unreadable Parquet file ({error})"))
        return
    columns = set(parquet.schema_arrow.names)

    def first(candidates: tuple[str, ...]) -> str | None:
        return next((name for name in candidates if name in columns), None)

    image_column = first(_PARQUET_IMAGE_COLUMNS)
    crop_column = first(_PARQUET_CROP_COLUMNS)
    if image_column is None:
        issues.append(
            DatasetIssue(
                line=0,
                field="image",
                message=f"no image column: expected one of {list(_PARQUET_IMAGE_COLUMNS)}, found {sorted(columns)}",
            )
        )
        return
    question_column = first(_PARQUET_QUESTION_COLUMNS)
    if question_column is None and not {"extra_info", "prompt"} & columns:
        issues.append(
            DatasetIssue(
                line=0,
                field="question",
                message=f"no question column: expected one of {[*_PARQUET_QUESTION_COLUMNS, 'prompt']}, "
                f"found {sorted(columns)}",
            )
        )
        return
    fields = {
        "id": first(_PARQUET_ID_COLUMNS) or "id",
        "options": "options",
        "bbox": first(_PARQUET_BBOX_COLUMNS) or "bbox",
    }
    line = 0
    for batch in parquet.iter_batches(batch_size=64):
        for row in batch.to_pylist():
            line += 1
            question, question_field = _parquet_question(row, question_column)
            answer, answer_field = _parquet_answer(row)
            image = _parquet_image_ref(row.get(image_column), image_column)
            crop = _parquet_image_ref(row.get(crop_column), crop_column) if crop_column else None
            if image is False or crop is False:
                issues.append(
                    DatasetIssue(
                        line=line,
                        field=crop_column if image is not False else image_column,
                        message="image cell must be bytes, a path, a {'bytes', 'path'} struct or a list of those",
                    )
                )
                continue
            yield _RawRecord(
                line=line,
                values={
                    "id": row.get(fields["id"]),
                    "question": question,
                    "options": row.get("options"),
                    "answer": answer,
                    "bbox": row.get(fields["bbox"]),
                },
                image=image,
                crop=crop,
                fields={**fields, "question": question_field, "answer": answer_field},
            )


def _parquet_question(row: dict[str, Any], column: str | None) -> tuple[Any, str]:
    if column is not None and row.get(column) is not None:
        value, field = row[column], column
    elif isinstance(row.get("extra_info"), dict) and row["extra_info"].get("question") is not None:
        value, field = row["extra_info"]["question"], "extra_info.question"
    elif isinstance(row.get("prompt"), list):
        value, field = _last_user_text(row["prompt"]), "prompt"
    else:
        return None, column or "question"
    if isinstance(value, str):
        value = value.replace(_IMAGE_PLACEHOLDER, "").replace(PAPER_HINT, "").strip()
    return value, field


def _last_user_text(messages: list[Any]) -> str | None:
    """The text of the last user turn of a chat-style prompt column (content as a string or a list of parts)."""
    for message in reversed(messages):
        if not isinstance(message, dict) or message.get("role") != "user":
            continue
        content = message.get("content")
        if isinstance(content, str):
            return content
        if isinstance(content, list):
            parts = [part.get("text") for part in content if isinstance(part, dict) and part.get("type") == "text"]
            return "\n".join(part for part in parts if part)
    return None


def _parquet_answer(row: dict[str, Any]) -> tuple[Any, str]:
    if row.get("answer") is not None:
        return row["answer"], "answer"
    reward = row.get("reward_model")
    if isinstance(reward, dict) and reward.get("ground_truth") is not None:
        return reward["ground_truth"], "reward_model.ground_truth"
    extra = row.get("extra_info")
    if isinstance(extra, dict) and extra.get("answer") is not None:
        return extra["answer"], "extra_info.answer"
    return None, "answer"


def _parquet_image_ref(cell: Any, column: str) -> _ImageRef | None | Literal[False]:
    if cell is None:
        return None
    if isinstance(cell, list):
        return _parquet_image_ref(cell[0], column) if cell else None
    if isinstance(cell, bytes | bytearray):
        return _ImageRef("bytes", bytes(cell), column)
    if isinstance(cell, str):
        return _ImageRef("path", cell, column)
    if isinstance(cell, dict):
        if cell.get("bytes"):
            return _ImageRef("bytes", bytes(cell["bytes"]), column)
        if cell.get("path"):
            return _ImageRef("path", cell["path"], column)
        return None
    return False
