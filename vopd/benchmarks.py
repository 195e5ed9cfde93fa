"""The paper's evaluation suites, read from a local copy in their *published* layouts.

Vision-OPD is judged on fine-detail, high-resolution benchmarks where a model sees only the full image and the plain
question: no evidence box, no crop, no hint (the ``plain`` full-image condition of ``vopd.evaluate``). Nothing is
downloaded; ``--data`` names the folder a user already holds. Each suite becomes ``vopd.data.Sample`` records (the
options as text, the answer as the correct option's text, the image as a path or bytes, ``bbox`` None) plus a
category, so one decoding path (``vopd.answering.generate_answers`` + ``parse_choice``) serves every suite.

Layouts supported (learned from the suites' own repositories and dataset cards, and VLMEvalKit's loaders):

* **V\\* Bench** (``vstar``; the ``craigwu/vstar_bench`` dataset folder). ``test_questions.jsonl``, one object per
  line: ``question_id``, ``image`` (relative path such as ``direct_attributes/sa_4690.jpg``), ``text`` (the
  question, then one ``(A) option`` line per option, then "Answer with the option's letter from the given choices
  directly."), ``category`` (``direct_attributes`` or ``relative_position``) and ``label`` (the correct letter).
  Without that file the per-subtask folders are read instead: ``direct_attributes/`` and ``relative_position/``
  hold image files paired by name with annotation JSONs (``target_object``, ``bbox``, ``question``, ``options`` with
  the correct option *first*); there the options are rotated by a hash of the file name, so the answer is not always
  (A) while every run still sees the same order.
  Counted as in the V\\* paper: accuracy on Attribute (``direct_attributes``) and Spatial (``relative_position``)
  and the overall accuracy over all questions (a micro average: 191 questions give 115 + 76).

* **HR-Bench 4K / 8K** (``hrbench-4k``, ``hrbench-8k``; the ``DreamMr/HR-Bench`` files). ``hr_bench_4k.tsv`` /
  ``hr_bench_8k.tsv`` (VLMEvalKit's ``HRBench4K.tsv`` / ``HRBench8K.tsv`` names, and the ``.parquet`` twins with the
  same columns, are accepted too): tab-separated with a header, columns ``index``, ``question``, ``answer`` (the
  letter), ``category`` (``single`` = FSP, fine-grained single-instance perception; ``cross`` = FCP, cross-instance),
  ``A``..``D``, ``cycle_category`` and ``image`` (the image as base64; as in every VLMEvalKit TSV, a short all-digit
  cell instead names the ``index`` of the row holding the image). Each question appears once per cycle with its
  options rotated. HR-Bench's evaluation (VLMEvalKit's ``report_acc_hrbench``) takes, within each cycle, the
  accuracy per category and over all rows, then averages each over the cycles: that is ``reported`` (FSP, FCP,
  Overall). The authors' own script asks an LLM judge whether a free-form answer matches; we parse the letter
  instead (exact matching, which VLMEvalKit also offers), so no judge model is needed.

* **MME-RealWorld** (``mme-realworld``, and ``mme-realworld-cn`` for the Chinese split; the
  ``yifanzhang114/MME-RealWorld`` files). ``MME_RealWorld.json`` (``MME_RealWorld_CN.json``): one JSON list of
  objects with ``Question_id``, ``Image`` (relative to the JSON file's folder, where the decompressed image folders
  are placed), ``Text`` (the question), ``Answer choices`` (``["(A) ...", ..., "(E) ..."]``), ``Ground truth`` (the
  letter), ``Task`` (Perception / Reasoning), ``Subtask`` (Monitoring, Autonomous_Driving, OCR with Complex Context,
  Diagram and Table, Remote Sensing) and ``Category``. ``--data`` may also name the JSON file itself (e.g. the Lite
  split's file, whose question format is the same). Counted as the authors' ``eval_your_results.py`` does: accuracy
  per Task/Subtask (the category here), per Task, per fine category (lower-cased, every ``.../attribute*`` folded
  into ``.../attribute``), and overall over all questions.

The rest of the paper's evaluation list (ZoomBench, MME-RealWorld-Lite and the Lmms-eval parquet copies of
MME-RealWorld, MMStar, POPE's splits, CV-Bench, MMVP, VisualProbe) is read by the loaders further down, each with its
layout in its docstring and its constant ``*_LAYOUT``; docs/benchmarks.md has one table of all suites (layout, prompt,
scoring, and what differs from the paper's own script). Every item carries the prompt the paper's script asks
(``EvalConfig.prompt`` = ``project`` asks in our own format instead) and the kind of rule that scores its reply
(``vopd.scoring``); ZoomBench's crops and V*'s annotation boxes add the crop condition and the gap.

Every suite's ``accuracy`` is the mean of the per-item ``full_correct`` records (an unparsable answer counts as
wrong, as in all three papers); ``categories`` splits it by category, ``breakdowns`` by the other levels, and
``reported`` holds the numbers in the shape the suite's paper prints them.
"""

from __future__ import annotations

import base64
import binascii
import csv
import hashlib
import json
import re
import sys
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vopd.answering import Answer, AnswerEngine, EvalResult, accuracy_by, generate_answers
from vopd.callbacks import CallbackList, ProgressCallback
from vopd.config import EvalConfig
from vopd.data import Sample, letter_index
from vopd.engines import answer_engine_for
from vopd.models import LoadedModel, load_model_and_processor
from vopd.scoring import JudgeClient, agreement, score_reply
from vopd.views import View, format_question, full_view, teacher_view

_OPTION_LINE = re.compile(r"^\(([A-Z])\)\s*(.*)$")
_INLINE_OPTION = re.compile(r"\(([A-Z])\)\s*")
_CHOICE_PREFIX = re.compile(r"^\s*\(?([A-Z])[).:]\s*")
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
_MAX_LISTED = 5  # problems listed in one error message before "... and N more"


class BenchmarkError(ValueError):
    """A suite that cannot be read: the message names the file, the field or the name that is wrong."""


@dataclass
class BenchmarkItem:
    """One question of a suite: the Sample asked on the full image, its category, and other levels it counts in.

    ``prompt`` is the question as the paper's evaluation asks it (None = our own format); ``scoring`` the kind of
    rule that grades the reply (``vopd.scoring``); ``reference`` the answer those rules and the judge compare with
    (the correct letter for multiple choice, 'yes'/'no' for POPE, the answer text for free-form suites). A crop
    (``sample.crop_bytes``/``crop_path``) or an evidence box (``sample.bbox``) adds the crop condition."""

    sample: Sample
    category: str
    groups: dict[str, str] = field(default_factory=dict)  # e.g. {"task": "Perception"}, {"cycle": "2"}
    prompt: str | None = None
    scoring: str = "choice"
    reference: str | None = None

    @property
    def expected(self) -> str:
        """What a reply is compared with: ``reference``, or the correct option's letter."""
        if self.reference is not None:
            return self.reference
        return self.sample.answer_letter or ""

    @property
    def has_crop(self) -> bool:
        return self.sample.has_crop or self.sample.bbox is not None


@dataclass(frozen=True)
class BenchmarkSpec:
    """A registered suite: how to read its folder and how its paper reports accuracy."""

    name: str
    title: str
    aliases: tuple[str, ...]
    layout: str  # one line naming the files expected, shown in errors
    load: Callable[[Path], list[BenchmarkItem]]
    report: Callable[[Sequence[dict[str, Any]]], dict[str, float]]


# --------------------------------------------------------------------------- shared helpers
def _sample(
    item_id: str,
    question: str,
    options: list[str],
    answer_letter: str,
    *,
    image_path: Path | None = None,
    image_bytes: bytes | None = None,
) -> Sample:
    """A Sample without an evidence box.

    Sample insists on a box because training and the crop condition need one; these suites have none and are asked
    only on the full image, so the record is validated with a placeholder box (every other rule still applies: the
    options, the answer letter, the image) and the placeholder is then removed. The crop view of such a sample
    fails with a clear message instead of cropping a made-up region.
    """
    try:
        index = letter_index(answer_letter)
    except ValueError as error:
        raise ValueError(f"answer: {error}") from error
    if index >= len(options):
        raise ValueError(f"answer: letter {answer_letter!r} is beyond the {len(options)} options")
    sample = Sample(
        id=item_id,
        question=question,
        options=options,
        answer=options[index],
        bbox=(0, 0, 1, 1),
        image_path=image_path,
        image_bytes=image_bytes,
    )
    return sample.model_copy(update={"bbox": None})


def _raise_problems(where: Path, problems: list[str]) -> None:
    if not problems:
        return
    listed = "\n".join(f"  {problem}" for problem in problems[:_MAX_LISTED])
    more = f"\n  ... and {len(problems) - _MAX_LISTED} more" if len(problems) > _MAX_LISTED else ""
    raise BenchmarkError(f"{where}: {len(problems)} problem(s):\n{listed}{more}")


def _pick_file(data: Path, names: Sequence[str], suite: str, layout: str) -> Path:
    """The suite's file: ``data`` itself when it is a file, else the first of ``names`` inside the folder."""
    if data.is_file():
        return data
    if not data.is_dir():
        raise BenchmarkError(f"{suite}: data folder not found: {data} (expected {layout})")
    for name in names:
        if (data / name).is_file():
            return data / name
    raise BenchmarkError(f"{suite}: expected {' or '.join(names)} in {data} (layout: {layout})")


# --------------------------------------------------------------------------- V* Bench
VSTAR_INSTRUCTION = "Answer with the option's letter from the given choices directly."


def _vstar_prompt(text: str) -> str:
    """V*'s own text, with the answer-format line appended when it lacks it (as the official script does)."""
    text = text.strip()
    return text if text.endswith(VSTAR_INSTRUCTION) else f"{text}\n{VSTAR_INSTRUCTION}"


def _lettered_prompt(question: str, options: Sequence[str]) -> str:
    lines = [question.strip(), *(f"({chr(ord('A') + i)}) {option}" for i, option in enumerate(options))]
    return "\n".join(lines)


def _vstar_box(record: dict[str, Any]) -> tuple[float, float, float, float] | None:
    """The union of V*'s target boxes (COCO-style ``[x, y, width, height]``, one per target object) as
    ``[x0, y0, x1, y1]``; None when the annotation has no usable box."""
    boxes = record.get("bbox")
    if not isinstance(boxes, list) or not boxes:
        return None
    if all(isinstance(value, int | float) for value in boxes):
        boxes = [boxes]
    corners = []
    for box in boxes:
        if not (isinstance(box, list | tuple) and len(box) == 4 and all(isinstance(v, int | float) for v in box)):
            return None
        x, y, width, height = (float(v) for v in box)
        if width <= 0 or height <= 0:
            return None
        corners.append((x, y, x + width, y + height))
    return (
        min(c[0] for c in corners),
        min(c[1] for c in corners),
        max(c[2] for c in corners),
        max(c[3] for c in corners),
    )


def _annotation_box(image: Path) -> tuple[float, float, float, float] | None:
    """The box of the annotation JSON beside a V* image (the dataset ships both), if there is one."""
    annotation = image.with_suffix(".json")
    if not annotation.is_file():
        return None
    try:
        record = json.loads(annotation.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return None
    return _vstar_box(record) if isinstance(record, dict) else None


def _split_vstar_text(text: str) -> tuple[str, list[tuple[str, str]]]:
    """The question and its lettered options from V*'s prompt text (instruction line dropped)."""
    question_lines: list[str] = []
    options: list[tuple[str, str]] = []
    for line in (raw.strip() for raw in text.splitlines()):
        if not line:
            continue
        if match := _OPTION_LINE.match(line):
            options.append((match.group(1), match.group(2).strip()))
        elif options or line.lower().startswith("answer with"):
            break  # the format instruction after the options; our prompt adds its own
        else:
            question_lines.append(line)
    question = " ".join(question_lines)
    if not options:  # "What color? (A) red (B) blue" on one line
        parts = _INLINE_OPTION.split(text)
        question = parts[0].strip()
        options = [(parts[i], parts[i + 1].strip()) for i in range(1, len(parts) - 1, 2)]
    return question, options


def _load_vstar_questions(path: Path) -> list[BenchmarkItem]:
    root = path.parent
    items: list[BenchmarkItem] = []
    problems: list[str] = []
    for line_number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            missing = [key for key in ("image", "text", "label") if key not in row]
            if missing:
                raise ValueError(f"missing field(s) {', '.join(missing)}")
            question, lettered = _split_vstar_text(str(row["text"]))
            letters = [letter for letter, _ in lettered]
            if letters != [chr(ord("A") + i) for i in range(len(letters))]:
                raise ValueError(f"text: options must be lettered (A), (B), ... in order, found {letters}")
            image = root / str(row["image"])
            if not image.is_file():
                raise ValueError(f"image: file not found: {image}")
            sample = _sample(
                str(row.get("question_id", line_number - 1)),
                question,
                [o for _, o in lettered],
                str(row["label"]),
                image_path=image,
            )
            sample = sample.model_copy(update={"bbox": _annotation_box(image)})
            category = str(row.get("category") or Path(str(row["image"])).parts[0])
            items.append(BenchmarkItem(sample, category, prompt=_vstar_prompt(str(row["text"]))))
        except ValueError as error:  # json.JSONDecodeError and pydantic's ValidationError are ValueErrors
            problems.append(f"line {line_number}: {error}")
    _raise_problems(path, problems)
    return items


def _load_vstar_annotations(folder: Path) -> list[BenchmarkItem]:
    """The per-subtask folders: ``<subtask>/<name>.json`` paired with ``<subtask>/<name>.<image suffix>``."""
    items: list[BenchmarkItem] = []
    problems: list[str] = []
    for subtask in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for annotation in sorted(subtask.glob("*.json")):
            where = annotation.relative_to(folder)
            try:
                record = json.loads(annotation.read_text(encoding="utf-8"))
                image = next(
                    (annotation.with_suffix(s) for s in _IMAGE_SUFFIXES if annotation.with_suffix(s).is_file()), None
                )
                if image is None:
                    raise ValueError(f"no image named {annotation.stem}.* beside it")
                options = [str(option) for option in record.get("options") or []]
                if len(options) < 2:
                    raise ValueError("options: need at least 2 (the correct one first)")
                # The annotation lists the correct option first; rotate so the answer letter varies (deterministic).
                shift = int(hashlib.sha256(str(where).encode()).hexdigest(), 16) % len(options)
                rotated = options[shift:] + options[:shift]
                answer_letter = chr(ord("A") + rotated.index(options[0]))
                sample = _sample(
                    f"{subtask.name}/{annotation.stem}",
                    str(record.get("question", "")),
                    rotated,
                    answer_letter,
                    image_path=image,
                )
                sample = sample.model_copy(update={"bbox": _vstar_box(record)})
                prompt = _vstar_prompt(_lettered_prompt(sample.question, rotated))
                items.append(BenchmarkItem(sample, subtask.name, prompt=prompt))
            except ValueError as error:
                problems.append(f"{where}: {error}")
    _raise_problems(folder, problems)
    return items


def load_vstar(data: Path) -> list[BenchmarkItem]:
    """V* Bench from ``test_questions.jsonl`` (preferred) or the per-subtask annotation folders."""
    data = Path(data)
    if data.is_file():
        return _load_vstar_questions(data)
    if not data.is_dir():
        raise BenchmarkError(f"vstar: data folder not found: {data} (expected {VSTAR_LAYOUT})")
    if (data / "test_questions.jsonl").is_file():
        return _load_vstar_questions(data / "test_questions.jsonl")
    if any(data.glob("*/*.json")):
        return _load_vstar_annotations(data)
    raise BenchmarkError(f"vstar: expected test_questions.jsonl in {data}, or {VSTAR_LAYOUT}")


VSTAR_LAYOUT = (
    "test_questions.jsonl (question_id, image, text, category, label) with the images it names, or folders "
    "direct_attributes/ and relative_position/ holding image + annotation JSON pairs"
)


def _report_vstar(records: Sequence[dict[str, Any]]) -> dict[str, float]:
    by_category = accuracy_by(records, "category")
    reported = {}
    for label, category in (("Attribute", "direct_attributes"), ("Spatial", "relative_position")):
        if category in by_category:
            reported[label] = by_category[category]["accuracy"]
    reported["Overall"] = _micro(records)
    return reported


# --------------------------------------------------------------------------- HR-Bench
_HRBENCH_CATEGORIES = {"single": "FSP", "cross": "FCP"}
_HRBENCH_COLUMNS = ("index", "question", "answer", "category", "image")


def _tsv_rows(path: Path) -> Iterator[dict[str, str]]:
    """Rows of a VLMEvalKit TSV, streamed: whole-image base64 cells are far over csv's default field limit."""
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    with path.open(encoding="utf-8", newline="") as stream:
        yield from csv.DictReader(stream, delimiter="\t")


def _parquet_records(path: Path, columns: Sequence[str] | None = None) -> Iterator[dict[str, Any]]:
    """Rows of a parquet file as Python values (image structs stay dicts of bytes), a few at a time."""
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as error:  # pyarrow raises its own ArrowInvalid for a file that is not parquet
        raise BenchmarkError(f"{path}: not a readable parquet file ({error})") from error
    if columns is not None:
        present = set(parquet.schema_arrow.names)
        columns = [column for column in columns if column in present]
    for batch in parquet.iter_batches(batch_size=16, columns=columns):
        yield from batch.to_pylist()


def _image_cell(value: Any) -> bytes | None:
    """Image bytes from a parquet cell in any of the published forms: Hugging Face's ``{"bytes", "path"}`` struct,
    raw bytes, or base64 text."""
    if isinstance(value, dict):
        value = value.get("bytes")
    if isinstance(value, bytes | bytearray):
        return bytes(value) or None
    if isinstance(value, str) and value.strip():
        try:
            return base64.b64decode(value.strip(), validate=True)
        except (binascii.Error, ValueError):
            return None
    return None


def _parquet_rows(path: Path) -> Iterator[dict[str, str]]:
    import pyarrow.parquet as pq

    for batch in pq.ParquetFile(path).iter_batches(batch_size=16):
        for row in batch.to_pylist():
            yield {key: "" if value is None else str(value) for key, value in row.items()}


def _load_hrbench(data: Path, resolution: str) -> list[BenchmarkItem]:
    suite = f"hrbench-{resolution}"
    names = (f"hr_bench_{resolution}.tsv", f"HRBench{resolution.upper()}.tsv", f"hr_bench_{resolution}.parquet")
    path = _pick_file(Path(data), names, suite, HRBENCH_LAYOUT)
    rows = _parquet_rows(path) if path.suffix == ".parquet" else _tsv_rows(path)
    pending: list[tuple[int, dict[str, str]]] = []
    images: dict[str, bytes] = {}  # index -> decoded bytes; the 4 cycles of a question share one image
    by_digest: dict[str, bytes] = {}
    problems: list[str] = []
    for row_number, row in enumerate(rows, start=2):  # line 1 is the header
        missing = [column for column in _HRBENCH_COLUMNS if column not in row]
        if missing:
            raise BenchmarkError(f"{path}: missing column(s) {', '.join(missing)}; expected {HRBENCH_LAYOUT}")
        cell = (row.get("image") or "").strip()
        row = {key: value for key, value in row.items() if key != "image"}
        if len(cell) > 64:
            digest = hashlib.sha256(cell.encode()).hexdigest()
            if digest not in by_digest:
                try:
                    by_digest[digest] = base64.b64decode(cell, validate=True)
                except (binascii.Error, ValueError) as error:
                    problems.append(f"line {row_number}, image: not base64 ({error})")
                    continue
            images[row["index"]] = by_digest[digest]
            row["_image"] = row["index"]
        else:
            row["_image"] = cell  # an index naming the row that holds the image
        pending.append((row_number, row))
    items: list[BenchmarkItem] = []
    for row_number, row in pending:
        try:
            image = images.get(row["_image"])
            if image is None:
                raise ValueError(f"image: no row with index {row['_image']!r} holds an image")
            options = []
            for letter in "ABCDEFGHIJKLMNOPQRSTUVWXYZ":
                value = (row.get(letter) or "").strip()
                if not value or value.lower() == "nan":
                    break
                options.append(value)
            sample = _sample(row["index"], row["question"].strip(), options, row["answer"], image_bytes=image)
            category = _HRBENCH_CATEGORIES.get(row["category"].strip().lower(), row["category"].strip())
            groups = {"cycle": str(row.get("cycle_category", "")).strip() or "0"}
            items.append(BenchmarkItem(sample, category, groups, prompt=_hrbench_prompt(sample.question, options)))
        except ValueError as error:
            problems.append(f"line {row_number}: {error}")
    _raise_problems(path, problems)
    return items


def _hrbench_prompt(question: str, options: Sequence[str]) -> str:
    """The official wording: the question, "Select from the following choices.", then one "(A) option" line each."""
    lines = "\n".join(f"({chr(ord('A') + i)}) {option}" for i, option in enumerate(options))
    return f"{question} Select from the following choices.\n{lines}"


HRBENCH_LAYOUT = (
    "hr_bench_4k.tsv / hr_bench_8k.tsv (or .parquet): index, question, answer, category, A-D, cycle_category, "
    "image (base64)"
)


def load_hrbench_4k(data: Path) -> list[BenchmarkItem]:
    return _load_hrbench(data, "4k")


def load_hrbench_8k(data: Path) -> list[BenchmarkItem]:
    return _load_hrbench(data, "8k")


def _report_hrbench(records: Sequence[dict[str, Any]]) -> dict[str, float]:
    """VLMEvalKit's report_acc_hrbench: per cycle, accuracy per category and over all; then the mean over cycles."""
    by_cycle: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for record in records:
        by_cycle[str(record.get("cycle", "0"))].append(record)
    sums: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    for cycle_records in by_cycle.values():
        for category, stats in accuracy_by(cycle_records, "category").items():
            sums[category] += stats["accuracy"]
            counts[category] += 1
        sums["Overall"] += _micro(cycle_records)
        counts["Overall"] += 1
    ordered = sorted(sums, key=lambda name: ({"FSP": 0, "FCP": 1, "Overall": 3}.get(name, 2), name))
    return {name: sums[name] / counts[name] for name in ordered}


# --------------------------------------------------------------------------- MME-RealWorld
def _mme_category(task: str, subtask: str, category: str) -> str:
    """The authors' fine category: lower-cased, every attribute question folded into '<object>/attribute'."""
    fine = category.lower()
    if "attribute" in fine:
        fine = fine.split("/")[0] + "/attribute"
    return f"{task}/{subtask}/{fine}"


# The official wording around MME-RealWorld's lettered choices, per language (the CN split is asked in Chinese).
_MME_WORDING = {
    "en": (
        " The choices are listed below:\n",
        "\nSelect the best answer to the above multiple-choice question based on the image. Respond with only the "
        "letter (A, B, C, D, or E) of the correct option.\nThe best answer is: ",
    ),
    "cn": (
        " 选项如下所示:\n",
        "\n根据图像选择上述多项选择题的最佳答案。只需回答正确选项的字母（A, B, C, D 或 E）。\n最佳答案为： ",
    ),
}


def _mme_prompt(question: str, choice_lines: Sequence[str], language: str) -> str:
    before, after = _MME_WORDING[language]
    return question + before + "\n".join(choice_lines) + after


def _mme_options(choices: Any) -> list[str]:
    """Option texts from ``["(A) ...", "(B) ..."]``, checking the letters run A, B, C... in order."""
    options = []
    for number, choice in enumerate(list(choices or [])):
        text = str(choice).replace("（", "(").replace("）", ")")  # the CN split uses full-width brackets at times
        match = _CHOICE_PREFIX.match(text)
        if match is None or match.group(1) != chr(ord("A") + number):
            raise ValueError(f"choices: expected '({chr(ord('A') + number)}) ...', got {choice!r}")
        options.append(text[match.end() :].strip())
    if len(options) < 2:
        raise ValueError("choices: need at least 2")
    return options


def _mme_parquet_files(data: Path) -> list[Path]:
    """The Lmms-eval copy's parquet shards: ``data/*.parquet`` under the folder (or the folder's own)."""
    if data.is_file() and data.suffix == ".parquet":
        return [data]
    for folder in (data / "data", data):
        files = sorted(folder.glob("*.parquet")) if folder.is_dir() else []
        if files:
            return files
    return []


def _load_mme_parquet(files: Sequence[Path], suite: str, language: str) -> list[BenchmarkItem]:
    """The ``yifanzhang114/MME-RealWorld*-Lmms-eval`` layout: ``index``, ``question``, ``bytes`` (the image as
    base64), ``multi-choice options``, ``answer`` (letter), ``category`` ("Perception/..." or "Reasoning/...") and
    ``l2-category`` (the task)."""
    items: list[BenchmarkItem] = []
    for path in files:
        problems: list[str] = []
        for position, row in enumerate(_parquet_records(path)):
            try:
                missing = [c for c in ("index", "question", "bytes", "multi-choice options", "answer") if c not in row]
                if missing:
                    raise BenchmarkError(f"{path}: missing column(s) {', '.join(missing)}; expected {MME_LAYOUT}")
                options = _mme_options(row["multi-choice options"])
                image = _image_cell(row["bytes"])
                if image is None:
                    raise ValueError("bytes: no image (expected base64 text or bytes)")
                question = str(row["question"]).strip()
                lines = [f"({chr(ord('A') + i)}) {option}" for i, option in enumerate(options)]
                sample = _sample(f"{row['index']}", question, options, str(row["answer"]).strip(), image_bytes=image)
                category = str(row.get("category") or "unknown")
                task = "Perception" if "perception" in category.lower() else "Reasoning"
                subtask = category.split("/")[-1]
                groups = {"task": task, "fine_category": f"{task}/{subtask}/{row.get('l2-category') or ''}".lower()}
                prompt = _mme_prompt(question, lines, language)
                items.append(BenchmarkItem(sample, f"{task}/{subtask}", groups, prompt=prompt))
            except ValueError as error:
                if isinstance(error, BenchmarkError):
                    raise
                problems.append(f"row {position}: {error}")
        _raise_problems(path, problems)
    return items


def _load_mme_realworld(data: Path, file_name: str, suite: str, language: str = "en") -> list[BenchmarkItem]:
    """The authors' JSON layout when its file is there, else the Lmms-eval parquet copy the paper's script reads."""
    data = Path(data)
    json_here = data.suffix == ".json" or (data.is_dir() and (data / file_name).is_file())
    files = [] if json_here or not data.exists() else _mme_parquet_files(data)
    if files:
        return _load_mme_parquet(files, suite, language)
    path = _pick_file(data, (file_name,), suite, MME_LAYOUT)
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise BenchmarkError(f"{path}: not valid JSON ({error})") from error
    if not isinstance(entries, list):
        raise BenchmarkError(f"{path}: expected a JSON list of questions, got {type(entries).__name__}")
    root = path.parent
    items: list[BenchmarkItem] = []
    problems: list[str] = []
    required = ("Question_id", "Image", "Text", "Answer choices", "Ground truth", "Task", "Subtask")
    for position, entry in enumerate(entries):
        where = f"question {position}" + (f" ({entry.get('Question_id')})" if isinstance(entry, dict) else "")
        try:
            if not isinstance(entry, dict):
                raise ValueError("expected an object")
            missing = [key for key in required if key not in entry]
            if missing:
                raise ValueError(f"missing field(s) {', '.join(missing)}")
            options = _mme_options(entry["Answer choices"])
            image = root / str(entry["Image"])
            if not image.is_file():
                raise ValueError(f"Image: file not found: {image}")
            task, subtask = str(entry["Task"]), str(entry["Subtask"])
            sample = _sample(
                str(entry["Question_id"]),
                str(entry["Text"]).strip(),
                options,
                str(entry["Ground truth"]).strip(),
                image_path=image,
            )
            groups = {"task": task, "fine_category": _mme_category(task, subtask, str(entry.get("Category", "")))}
            lines = [str(choice).strip() for choice in entry["Answer choices"]]
            prompt = _mme_prompt(sample.question, lines, language)
            items.append(BenchmarkItem(sample, f"{task}/{subtask}", groups, prompt=prompt))
        except ValueError as error:
            problems.append(f"{where}: {error}")
    _raise_problems(path, problems)
    return items


MME_LAYOUT = (
    "MME_RealWorld.json (Question_id, Image, Text, Answer choices, Ground truth, Task, Subtask, Category) with the "
    "image folders beside it, or the Lmms-eval copy's data/*.parquet (index, question, bytes, multi-choice options, "
    "answer, category, l2-category)"
)


def load_mme_realworld(data: Path) -> list[BenchmarkItem]:
    return _load_mme_realworld(data, "MME_RealWorld.json", "mme-realworld")


def load_mme_realworld_cn(data: Path) -> list[BenchmarkItem]:
    return _load_mme_realworld(data, "MME_RealWorld_CN.json", "mme-realworld-cn", "cn")


def load_mme_realworld_lite(data: Path) -> list[BenchmarkItem]:
    return _load_mme_realworld(data, "MME_RealWorld_Lite.json", "mme-realworld-lite")


def _report_mme(records: Sequence[dict[str, Any]]) -> dict[str, float]:
    reported = {task: stats["accuracy"] for task, stats in accuracy_by(records, "task").items()}
    reported["Overall"] = _micro(records)
    return reported


# --------------------------------------------------------------------------- ZoomBench
ZOOMBENCH_LAYOUT = "data/test.parquet (id, query, response, image, crop_image; images as {bytes} structs)"


def _find_parquet(data: Path, names: Sequence[str], suite: str, layout: str) -> Path:
    """``data`` itself when it is a parquet file, else the first of ``names`` (relative paths) inside it."""
    return _pick_file(Path(data), names, suite, layout)


def load_zoombench(data: Path) -> list[BenchmarkItem]:
    """ZoomBench (``inclusionAI/ZoomBench``): a free-form question on the full image, with the crop holding the
    answer's evidence beside it; the crop condition answers the same query on that crop."""
    path = _find_parquet(data, ("data/test.parquet", "test.parquet"), "zoombench", ZOOMBENCH_LAYOUT)
    items: list[BenchmarkItem] = []
    problems: list[str] = []
    for position, row in enumerate(_parquet_records(path)):
        missing = [column for column in ("query", "response", "image") if column not in row]
        if missing:
            raise BenchmarkError(f"{path}: missing column(s) {', '.join(missing)}; expected {ZOOMBENCH_LAYOUT}")
        try:
            query = str(row["query"] or "").strip()
            response = str(row["response"] or "").strip()
            if not query or not response:
                raise ValueError("query and response must not be empty")
            image = _image_cell(row["image"])
            if image is None:
                raise ValueError("image: no bytes")
            crop = _image_cell(row.get("crop_image"))
            item_id = str(row.get("id") or position)
            sample = Sample(id=item_id, question=query, image_bytes=image, crop_bytes=crop, answer=response)
            category = str(row.get("category") or row.get("task") or "all")
            items.append(BenchmarkItem(sample, category, prompt=query, scoring="open", reference=response))
        except ValueError as error:
            problems.append(f"row {position}: {error}")
    _raise_problems(path, problems)
    return items


# --------------------------------------------------------------------------- MMStar
MMSTAR_LAYOUT = "mmstar.parquet (index, question with its options, answer, category, l2_category, image bytes)"
_MMSTAR_OPTIONS = re.compile(r"Options:\s*(.*)$", re.DOTALL)
_MMSTAR_OPTION = re.compile(r"(?:^|,\s*|\n\s*)([A-F])\s*[:.]\s*")


def _mmstar_options(question: str) -> list[str]:
    """The options written into an MMStar question ("Options: A: ..., B: ..."); bare letters A-D when they cannot be
    read, so the letter the model names is still scored."""
    match = _MMSTAR_OPTIONS.search(question)
    if match is not None:
        parts = _MMSTAR_OPTION.split(match.group(1).strip())
        letters = parts[1::2]
        if letters and letters == [chr(ord("A") + i) for i in range(len(letters))] and len(letters) >= 2:
            texts = [text.strip().rstrip(",").strip() for text in parts[2::2]]
            if all(texts) and len(set(texts)) == len(texts):
                return texts
    return ["A", "B", "C", "D"]


def load_mmstar(data: Path) -> list[BenchmarkItem]:
    """MMStar (``Lin-Chen/MMStar``): the question already lists its options; asked as written."""
    path = _find_parquet(data, ("mmstar.parquet", "data/mmstar.parquet"), "mmstar", MMSTAR_LAYOUT)
    items: list[BenchmarkItem] = []
    problems: list[str] = []
    for position, row in enumerate(_parquet_records(path)):
        missing = [column for column in ("index", "question", "answer", "image") if column not in row]
        if missing:
            raise BenchmarkError(f"{path}: missing column(s) {', '.join(missing)}; expected {MMSTAR_LAYOUT}")
        try:
            question = str(row["question"] or "").strip()
            image = _image_cell(row["image"])
            if image is None:
                raise ValueError("image: no bytes")
            options = _mmstar_options(question)
            answer = str(row["answer"]).strip().upper()
            sample = _sample(str(row["index"]), question, options, answer, image_bytes=image)
            groups = {"l2_category": str(row.get("l2_category") or "unknown")}
            items.append(BenchmarkItem(sample, str(row.get("category") or "unknown"), groups, prompt=question))
        except ValueError as error:
            problems.append(f"row {position}: {error}")
    _raise_problems(path, problems)
    return items


# --------------------------------------------------------------------------- POPE
POPE_LAYOUT = (
    "the lmms-lab/POPE copy: Full/<split>-*.parquet (or Full/<split>/*.parquet), else data/test-*.parquet filtered by "
    "its category column; columns question_id, question, answer (yes/no), category, image_source, image"
)
POPE_INSTRUCTION = "Answer the question using a single word or phrase."


def _pope_files(data: Path, split: str | None) -> list[Path]:
    if data.is_file():
        return [data]
    if split is not None:
        for pattern in (f"Full/{split}-*.parquet", f"Full/{split}/*.parquet", f"{split}-*.parquet"):
            if files := sorted(data.glob(pattern)):
                return files
    return sorted(data.glob("data/test-*.parquet")) or sorted(data.glob("test-*.parquet"))


def _load_pope(data: Path, split: str | None) -> list[BenchmarkItem]:
    """POPE (``lmms-lab/POPE``): yes/no object-presence questions; ``split`` = adversarial, popular or random."""
    suite = f"pope-{split}" if split else "pope"
    data = Path(data)
    if not data.exists():
        raise BenchmarkError(f"{suite}: data folder not found: {data} (expected {POPE_LAYOUT})")
    files = _pope_files(data, split)
    if not files:
        raise BenchmarkError(f"{suite}: no POPE parquet files in {data} (expected {POPE_LAYOUT})")
    items: list[BenchmarkItem] = []
    for path in files:
        problems: list[str] = []
        for position, row in enumerate(_parquet_records(path)):
            missing = [column for column in ("question", "answer", "image") if column not in row]
            if missing:
                raise BenchmarkError(f"{path}: missing column(s) {', '.join(missing)}; expected {POPE_LAYOUT}")
            category = str(row.get("category") or split or "test")
            if split is not None and category != split:
                continue  # the default config holds all three splits, told apart by this column
            try:
                answer = str(row["answer"] or "").strip().lower()
                if answer not in ("yes", "no"):
                    raise ValueError(f"answer: expected yes or no, got {row['answer']!r}")
                image = _image_cell(row["image"])
                if image is None:
                    raise ValueError("image: no bytes")
                question = str(row["question"] or "").strip()
                prompt = question if question.endswith(POPE_INSTRUCTION) else f"{question}\n{POPE_INSTRUCTION}"
                item_id = str(row.get("question_id") or row.get("id") or f"{path.stem}:{position}")
                sample = Sample(id=item_id, question=question, answer=answer, image_bytes=image)
                groups = {"image_source": str(row.get("image_source") or "")}
                items.append(BenchmarkItem(sample, category, groups, prompt=prompt, scoring="yesno", reference=answer))
            except ValueError as error:
                problems.append(f"row {position}: {error}")
        _raise_problems(path, problems)
    return items


def load_pope(data: Path) -> list[BenchmarkItem]:
    """All three splits together (the default config's test split), each item's split as its category."""
    return _load_pope(data, None)


def load_pope_adversarial(data: Path) -> list[BenchmarkItem]:
    return _load_pope(data, "adversarial")


def load_pope_popular(data: Path) -> list[BenchmarkItem]:
    return _load_pope(data, "popular")


def load_pope_random(data: Path) -> list[BenchmarkItem]:
    return _load_pope(data, "random")


def _report_pope(records: Sequence[dict[str, Any]]) -> dict[str, float]:
    """POPE's numbers, with "yes" the positive class: accuracy, precision, recall, F1 and the share of "yes" replies.

    As the paper's script does, a reply is a true positive when the reference is yes and it is judged correct, a false
    positive when the reference is no and it is judged wrong (an unreadable reply counts as the wrong answer)."""
    tp = sum(1 for r in records if r["reference"] == "yes" and r["full_correct"])
    fn = sum(1 for r in records if r["reference"] == "yes" and not r["full_correct"])
    fp = sum(1 for r in records if r["reference"] == "no" and not r["full_correct"])
    tn = sum(1 for r in records if r["reference"] == "no" and r["full_correct"])
    total = tp + fn + fp + tn
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    return {
        "Accuracy": (tp + tn) / total if total else float("nan"),
        "Precision": precision,
        "Recall": recall,
        "F1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
        "Yes ratio": sum(r["full_choice"] == "yes" for r in records) / total if total else float("nan"),
    }


# --------------------------------------------------------------------------- CV-Bench
CVBENCH_LAYOUT = "test_2d.parquet and test_3d.parquet (idx, type, task, image, prompt, choices, answer '(A)', source)"
_PROMPT_OPTION = re.compile(r"\(([A-Z])\)\s*")


def _options_from_prompt(prompt: str) -> list[str]:
    parts = _PROMPT_OPTION.split(prompt)
    letters, texts = parts[1::2], [text.strip() for text in parts[2::2]]
    if len(letters) >= 2 and letters == [chr(ord("A") + i) for i in range(len(letters))]:
        texts[-1] = texts[-1].splitlines()[0].strip() if texts[-1] else texts[-1]
        if all(texts):
            return texts
    raise ValueError("prompt: cannot read its (A), (B), ... options and there is no choices column")


def load_cvbench(data: Path) -> list[BenchmarkItem]:
    """CV-Bench (``nyu-visionx/CV-Bench``): 2D (count, relation) and 3D (depth, distance) questions, asked with the
    suite's own prompt; the answer is a letter in brackets."""
    data = Path(data)
    if not data.is_dir():
        raise BenchmarkError(f"cv-bench: data folder not found: {data} (expected {CVBENCH_LAYOUT})")
    files = [data / name for name in ("test_2d.parquet", "test_3d.parquet") if (data / name).is_file()]
    if not files:
        raise BenchmarkError(f"cv-bench: expected test_2d.parquet and test_3d.parquet in {data}")
    items: list[BenchmarkItem] = []
    for path in files:
        dimension = "2D" if "2d" in path.stem else "3D"
        problems: list[str] = []
        for position, row in enumerate(_parquet_records(path)):
            missing = [column for column in ("prompt", "answer", "image") if column not in row]
            if missing:
                raise BenchmarkError(f"{path}: missing column(s) {', '.join(missing)}; expected {CVBENCH_LAYOUT}")
            try:
                prompt = str(row["prompt"] or "").strip()
                choices = [str(c).strip() for c in row.get("choices") or []]
                options = choices if len(choices) >= 2 else _options_from_prompt(prompt)
                image = _image_cell(row["image"])
                if image is None:
                    raise ValueError("image: no bytes")
                letter = str(row["answer"] or "").strip().strip("()").strip()
                question = str(row.get("question") or prompt).strip()
                item_id = f"{dimension}:{row.get('idx', position)}"
                sample = _sample(item_id, question, options, letter, image_bytes=image)
                kind = str(row.get("type") or dimension)
                groups = {"type": kind, "source": str(row.get("source") or "")}
                items.append(BenchmarkItem(sample, f"{kind}/{row.get('task') or ''}", groups, prompt=prompt))
            except ValueError as error:
                problems.append(f"row {position}: {error}")
        _raise_problems(path, problems)
    return items


def _report_cvbench(records: Sequence[dict[str, Any]]) -> dict[str, float]:
    """CV-Bench's score: the accuracy on 2D and on 3D, and their mean (not the mean over all questions)."""
    by_type = accuracy_by(records, "type")
    reported = {name: by_type[name]["accuracy"] for name in ("2D", "3D") if name in by_type}
    if reported:
        reported["Overall"] = sum(reported.values()) / len(reported)
    return reported


# --------------------------------------------------------------------------- MMVP
MMVP_LAYOUT = (
    "Questions.csv (Index, Question, Options '(a) ... (b) ...', Correct Answer '(a)') and 'MMVP Images/<Index>.jpg'"
)
_AB_SPLIT = re.compile(r"\(([ab])\)\s*")


def load_mmvp(data: Path) -> list[BenchmarkItem]:
    """MMVP (``MMVP/MMVP``): 150 pairs of images that CLIP sees alike, one two-option question per image."""
    path = _pick_file(Path(data), ("Questions.csv",), "mmvp", MMVP_LAYOUT)
    images = path.parent / "MMVP Images"
    items: list[BenchmarkItem] = []
    problems: list[str] = []
    with path.open(encoding="utf-8", newline="") as stream:
        reader = csv.DictReader(stream)
        missing = [c for c in ("Index", "Question", "Options", "Correct Answer") if c not in (reader.fieldnames or [])]
        if missing:
            raise BenchmarkError(f"{path}: missing column(s) {', '.join(missing)}; expected {MMVP_LAYOUT}")
        for line_number, row in enumerate(reader, start=2):
            try:
                index = int(row["Index"])
                parts = _AB_SPLIT.split(row["Options"].strip())
                options = [text.strip() for text in parts[2::2]]
                if parts[1::2] != ["a", "b"] or not all(options):
                    raise ValueError(f"Options: expected '(a) ... (b) ...', got {row['Options']!r}")
                answer = row["Correct Answer"].strip().lower()
                if answer not in ("(a)", "(b)"):
                    raise ValueError(f"Correct Answer: expected (a) or (b), got {row['Correct Answer']!r}")
                image = images / f"{index}.jpg"
                if not image.is_file():
                    raise ValueError(f"image: file not found: {image}")
                question = row["Question"].strip()
                sample = _sample(str(index), question, options, answer.strip("()").upper(), image_path=image)
                groups = {"pair": str((index - 1) // 2)}
                prompt = f"{question} {row['Options'].strip()}"
                items.append(BenchmarkItem(sample, "all", groups, prompt=prompt, scoring="ab"))
            except ValueError as error:
                problems.append(f"line {line_number}: {error}")
    _raise_problems(path, problems)
    return items


def _report_mmvp(records: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Per question (the paper's script) and per pair (MMVP's own score: both questions of a pair right)."""
    pairs: dict[str, list[bool]] = defaultdict(list)
    for record in records:
        pairs[str(record.get("pair"))].append(bool(record["full_correct"]))
    return {
        "Questions": _micro(records),
        "Pairs": sum(all(hits) for hits in pairs.values()) / len(pairs) if pairs else float("nan"),
    }


# --------------------------------------------------------------------------- VisualProbe
VISUALPROBE_LAYOUT = "VisualProbe_Easy/, VisualProbe_Medium/, VisualProbe_Hard/ (or Easy/ ...), each val.json + images"
VISUALPROBE_LEVELS = ("Easy", "Medium", "Hard")


def load_visualprobe(data: Path) -> list[BenchmarkItem]:
    """VisualProbe (``Mini-o3/VisualProbe_{Easy,Medium,Hard}``): free-form questions on large images, per level."""
    data = Path(data)
    if not data.is_dir():
        raise BenchmarkError(f"visualprobe: data folder not found: {data} (expected {VISUALPROBE_LAYOUT})")
    items: list[BenchmarkItem] = []
    found = False
    for level in VISUALPROBE_LEVELS:
        folder = next((f for f in (data / f"VisualProbe_{level}", data / level) if (f / "val.json").is_file()), None)
        if folder is None:
            continue
        found = True
        path = folder / "val.json"
        try:
            records = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise BenchmarkError(f"{path}: not valid JSON ({error})") from error
        if not isinstance(records, list):
            raise BenchmarkError(f"{path}: expected a JSON list of questions")
        problems: list[str] = []
        for position, record in enumerate(records):
            try:
                if not isinstance(record, dict):
                    raise ValueError("expected an object")
                images = record.get("images") or []
                if not images:
                    raise ValueError("images: empty")
                relative = str(images[0]).removeprefix(f"VisualProbe_{level}/")
                image = next((p for p in (folder / relative, data / str(images[0])) if p.is_file()), None)
                if image is None:
                    raise ValueError(f"images: file not found: {folder / relative}")
                query = str(record.get("problem") or "").replace("<image>\n", "").replace("<image>", "").strip()
                solution = str(record.get("solution") or "").strip()
                if not query or not solution:
                    raise ValueError("problem and solution must not be empty")
                sample = Sample(id=f"{level}:{position}", question=query, answer=solution, image_path=image)
                items.append(BenchmarkItem(sample, level, prompt=query, scoring="open", reference=solution))
            except ValueError as error:
                problems.append(f"question {position}: {error}")
        _raise_problems(path, problems)
    if not found:
        raise BenchmarkError(f"visualprobe: no <level>/val.json in {data} (expected {VISUALPROBE_LAYOUT})")
    return items


def _report_visualprobe(records: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Accuracy per level and their mean (the paper's VisualProbe number), not the mean over all questions."""
    by_level = accuracy_by(records, "category")
    reported = {level: by_level[level]["accuracy"] for level in VISUALPROBE_LEVELS if level in by_level}
    if reported:
        reported["Average"] = sum(reported.values()) / len(reported)
    return reported


def _report_by_category(records: Sequence[dict[str, Any]]) -> dict[str, float]:
    reported = {name: stats["accuracy"] for name, stats in accuracy_by(records, "category").items()}
    reported["Overall"] = _micro(records)
    return reported


# --------------------------------------------------------------------------- registry
BENCHMARKS: dict[str, BenchmarkSpec] = {
    spec.name: spec
    for spec in (
        BenchmarkSpec(
            "vstar",
            "V* Bench",
            ("v*", "vstar-bench", "v*bench", "v-star", "v*-bench"),
            VSTAR_LAYOUT,
            load_vstar,
            _report_vstar,
        ),
        BenchmarkSpec("zoombench", "ZoomBench", ("zoom-bench",), ZOOMBENCH_LAYOUT, load_zoombench, _report_by_category),
        BenchmarkSpec(
            "hrbench-4k",
            "HR-Bench 4K",
            ("hrbench4k", "hr-bench-4k", "hr-bench4k", "hrbench-4k"),
            HRBENCH_LAYOUT,
            load_hrbench_4k,
            _report_hrbench,
        ),
        BenchmarkSpec(
            "hrbench-8k",
            "HR-Bench 8K",
            ("hrbench8k", "hr-bench-8k", "hr-bench8k", "hrbench-8k"),
            HRBENCH_LAYOUT,
            load_hrbench_8k,
            _report_hrbench,
        ),
        BenchmarkSpec(
            "mme-realworld",
            "MME-RealWorld",
            ("mmerealworld", "mme-rw", "mme-real-world"),
            MME_LAYOUT,
            load_mme_realworld,
            _report_mme,
        ),
        BenchmarkSpec(
            "mme-realworld-cn",
            "MME-RealWorld-CN",
            ("mmerealworld-cn", "mme-rw-cn"),
            MME_LAYOUT.replace("MME_RealWorld.json", "MME_RealWorld_CN.json"),
            load_mme_realworld_cn,
            _report_mme,
        ),
        BenchmarkSpec(
            "mme-realworld-lite",
            "MME-RealWorld-Lite",
            ("mmerealworld-lite", "mme-rw-lite"),
            MME_LAYOUT.replace("MME_RealWorld.json", "MME_RealWorld_Lite.json"),
            load_mme_realworld_lite,
            _report_mme,
        ),
        BenchmarkSpec("mmstar", "MMStar", ("mm-star",), MMSTAR_LAYOUT, load_mmstar, _report_by_category),
        BenchmarkSpec("pope", "POPE (all splits)", (), POPE_LAYOUT, load_pope, _report_pope),
        BenchmarkSpec(
            "pope-adversarial", "POPE (adversarial)", ("pope-adv",), POPE_LAYOUT, load_pope_adversarial, _report_pope
        ),
        BenchmarkSpec("pope-popular", "POPE (popular)", ("pope-pop",), POPE_LAYOUT, load_pope_popular, _report_pope),
        BenchmarkSpec("pope-random", "POPE (random)", ("pope-rand",), POPE_LAYOUT, load_pope_random, _report_pope),
        BenchmarkSpec("cv-bench", "CV-Bench", ("cvbench",), CVBENCH_LAYOUT, load_cvbench, _report_cvbench),
        BenchmarkSpec("mmvp", "MMVP", (), MMVP_LAYOUT, load_mmvp, _report_mmvp),
        BenchmarkSpec(
            "visualprobe",
            "VisualProbe",
            ("visual-probe",),
            VISUALPROBE_LAYOUT,
            load_visualprobe,
            _report_visualprobe,
        ),
    )
}


def _normalize_name(name: str) -> str:
    return re.sub(r"[\s_]+", "-", name.strip().lower())


def get_benchmark(name: str) -> BenchmarkSpec:
    """The suite registered under ``name`` or one of its aliases (case, '_' and '-' do not matter)."""
    wanted = _normalize_name(name)
    for spec in BENCHMARKS.values():
        if wanted == spec.name or wanted in spec.aliases:
            return spec
    raise BenchmarkError(f"unknown benchmark {name!r}; known benchmarks: {', '.join(BENCHMARKS)}")


def load_benchmark(name: str, data: str | Path) -> list[BenchmarkItem]:
    """Read a suite from its folder (or its question file); raises BenchmarkError naming what is missing where."""
    spec = get_benchmark(name)
    items = spec.load(Path(data))
    if not items:
        raise BenchmarkError(f"{spec.name}: {data} holds no questions (expected {spec.layout})")
    return items


# --------------------------------------------------------------------------- evaluation
def _micro(records: Sequence[dict[str, Any]]) -> float:
    return sum(bool(r["full_correct"]) for r in records) / len(records) if records else float("nan")


def _share(values: Sequence[Any]) -> float | None:
    """The share of true values (None when there are none): summaries stay valid JSON, which has no NaN."""
    return sum(bool(v) for v in values) / len(values) if values else None


def summarize_benchmark(spec: BenchmarkSpec, records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Overall accuracy (mean of the records), per category, per other level, and the paper's own numbers; where
    items have crops, the crop condition and the gap; where a judge ran, its numbers and its agreement with the rules.
    """
    levels = sorted({key for record in records for key in record.get("groups", {})})
    flat = [{**record, **record.get("groups", {})} for record in records]
    accuracy = _micro(flat)
    p_values = [r["full_p_correct"] for r in flat if r.get("full_p_correct") is not None]
    summary: dict[str, Any] = {
        "benchmark": spec.name,
        "title": spec.title,
        "accuracy": accuracy,
        "full_accuracy": accuracy,  # the key the rest of the project reads for the full-image condition
        "n": len(flat),
        "n_items": len(flat),
        "correct": sum(bool(r["full_correct"]) for r in flat),
        "unanswered": sum(r["full_choice"] is None for r in flat),
        "full_p_correct": sum(p_values) / len(p_values) if p_values else None,
        "full_letters": dict(sorted(Counter(str(r["full_choice"]) for r in flat).items())),
        "categories": accuracy_by(flat, "category"),
        "breakdowns": {level: accuracy_by(flat, level) for level in levels},
        "reported": spec.report(flat) if flat else {},
        "scorer": "rule",
        **_crop_summary(flat),
    }
    if any("full_judge" in r for r in flat):
        summary["scorer"] = "rule+judge"
        summary["judge"] = _judge_summary(spec, flat)
    return summary


def _crop_summary(flat: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The regional-to-global gap on the items that ship a crop or a box: accuracy on the full image and on the crop
    over the *same* items, and crop - full (positive = the model answers better when shown where to look)."""
    cropped = [r for r in flat if r.get("crop_correct") is not None]
    if not cropped:
        return {"crop_accuracy": None, "gap": None}
    full = _share([r["full_correct"] for r in cropped])
    crop = _share([r["crop_correct"] for r in cropped])
    gap = None if full is None or crop is None else crop - full
    return {
        "crop_accuracy": crop,
        "gap": gap,
        "crop": {
            "n": len(cropped),
            "full_accuracy": full,
            "crop_accuracy": crop,
            "gap": gap,
            "categories": accuracy_by(cropped, "category", "crop_correct"),
        },
    }


def _judge_summary(spec: BenchmarkSpec, flat: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The judge's numbers as the paper's script forms them (an item is right when the rules accept it, else when the
    judge says Yes), the judge's own verdicts alone, and how often the judge and the rules agree."""
    judged = [{**r, "full_correct": bool(r["full_judge_correct"])} for r in flat]
    verdicts = [r.get("full_judge") for r in flat]
    return {
        "accuracy": _micro(judged),
        "judge_alone_accuracy": _share([v for v in verdicts if v is not None]),
        "agreement": agreement([bool(r["full_correct"]) for r in flat], verdicts),
        "errors": sum(v is None for v in verdicts),
        "categories": accuracy_by(judged, "category"),
        "reported": spec.report(judged) if judged else {},
    }


def _item_view(item: BenchmarkItem, condition: str, config: EvalConfig) -> View:
    """What the model is shown: the full image (fit to views.max_pixels) or the item's crop (the shipped crop image,
    fit the same way, or the padded, enlarged box as the teacher sees it), with the official prompt or ours."""
    sample = item.sample
    if condition == "full":
        view = full_view(sample, config.views)
    elif sample.has_crop:  # ask on the shipped crop exactly as on a full image
        crop_source = {"image_bytes": sample.crop_bytes, "image_path": sample.crop_path}
        view = full_view(sample.model_copy(update=crop_source), config.views)
    else:
        view = teacher_view(sample, config.views.model_copy(update={"evidence": "box"}))
    text = item.prompt if config.prompt == "official" and item.prompt else format_question(sample, "")
    return View(image=view.image, text=text)


def _scored(item: BenchmarkItem, condition: str, answer: Answer) -> dict[str, Any]:
    """One condition's fields of a record: the reply, what the rules read from it, the verdict, p(correct letter)."""
    sample = item.sample
    verdict = score_reply(item.scoring, answer.text, options=sample.options, reference=item.expected)
    p_correct = None
    if sample.options and sample.answer_index is not None:
        probs = answer.option_probs
        p_correct = probs[sample.answer_index] if probs is not None and sample.answer_index < len(probs) else 0.0
    return {
        f"{condition}_text": answer.text,
        f"{condition}_choice": verdict.prediction,
        f"{condition}_correct": verdict.correct,
        f"{condition}_p_correct": p_correct,
    }


def _answer(
    loaded: LoadedModel,
    items: Sequence[BenchmarkItem],
    condition: str,
    config: EvalConfig,
    engine: AnswerEngine | None = None,
) -> list[Answer]:
    if not items:
        return []
    return generate_answers(
        loaded,
        [_item_view(item, condition, config) for item in items],
        [item.sample.options if item.scoring in ("choice", "ab") else None for item in items],
        max_new_tokens=config.max_new_tokens,
        engine=engine,
    )


def evaluate_benchmark(
    config: EvalConfig,
    *,
    callbacks: Sequence[ProgressCallback] = (),
    loaded: LoadedModel | None = None,
    engine: AnswerEngine | None = None,
) -> EvalResult:
    """Greedy answers on a suite: the full image (fit to views.max_pixels) with the official prompt, scored by rules
    (``vopd.scoring``); the shipped crop too where a suite has one (``config.crops``); an LLM judge when configured.

    ``summary`` carries the per-category accuracy, the paper-style numbers, the crop condition and gap where there is
    one, and the judge's numbers where it ran; ``records`` one row per question."""
    if config.benchmark is None or config.data is None:
        raise ValueError("evaluate_benchmark needs config.benchmark and config.data")
    events = CallbackList(callbacks)
    spec = get_benchmark(config.benchmark)
    items = load_benchmark(spec.name, config.data)
    if config.limit is not None:
        items = items[: config.limit]
    loaded = loaded or load_model_and_processor(config.model, config.runtime)
    with answer_engine_for(loaded, config, engine, log=events.on_log) as answers_by:
        return _evaluate_items(config, spec, items, events, loaded, answers_by)


def _evaluate_items(
    config: EvalConfig,
    spec: BenchmarkSpec,
    items: Sequence[BenchmarkItem],
    events: CallbackList,
    loaded: LoadedModel,
    engine: AnswerEngine | None,
) -> EvalResult:
    events.on_start(total=len(items), start=0, unit="sample")
    records: list[dict[str, Any]] = []
    for start in range(0, len(items), config.batch_size):
        if events.should_stop():
            events.on_end(status="stopped", result=None)
            raise InterruptedError("evaluation cancelled")
        batch = items[start : start + config.batch_size]
        full = _answer(loaded, batch, "full", config, engine)
        cropped = [i for i, item in enumerate(batch) if config.crops and item.has_crop]
        crop_batch = [batch[i] for i in cropped]
        crop_answers = dict(zip(cropped, _answer(loaded, crop_batch, "crop", config, engine), strict=True))
        for position, (item, answer) in enumerate(zip(batch, full, strict=True)):
            record = {
                "id": item.sample.id,
                "benchmark": spec.name,
                "category": item.category,
                "groups": dict(item.groups),
                "question": item.sample.question,
                "prompt": item.prompt,
                "options": item.sample.options,
                "answer": item.sample.answer,
                "reference": item.expected,
                "scoring": item.scoring,
                **_scored(item, "full", answer),
            }
            if position in crop_answers:
                record.update(_scored(item, "crop", crop_answers[position]))
            records.append(record)
        events.on_progress(done=len(records), total=len(items), metrics=None)

    if config.judge is not None:
        _judge_records(config, items, records)
    summary = {**summarize_benchmark(spec, records), "engine": engine.name if engine is not None else "hf"}
    records_path = None
    if config.output:
        records_path = Path(config.output)
        records_path.parent.mkdir(parents=True, exist_ok=True)
        records_path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    crop_accuracy, gap = summary["crop_accuracy"], summary["gap"]
    result = EvalResult(
        full_accuracy=summary["accuracy"],
        crop_accuracy=float("nan") if crop_accuracy is None else crop_accuracy,
        gap=float("nan") if gap is None else gap,
        n=summary["n"],
        records_path=records_path,
        summary=summary,
        records=records,
    )
    events.on_end(status="succeeded", result=summary)
    return result


def _judge_records(config: EvalConfig, items: Sequence[BenchmarkItem], records: list[dict[str, Any]]) -> None:
    """Ask the judge about every full-image reply (not only those the rules reject, so that the agreement between the
    two scorers is measured on all items); store its verdict and the paper-style combined verdict per record."""
    assert config.judge is not None
    client = JudgeClient(
        url=config.judge.url,
        model=config.judge.model,
        max_tokens=config.judge.max_tokens,
        timeout_s=config.judge.timeout_s,
        workers=config.judge.workers,
    )
    verdicts = client.judge(
        [item.prompt or item.sample.question for item in items],
        [item.expected for item in items],
        [record["full_text"] for record in records],
    )
    for record, verdict in zip(records, verdicts, strict=True):
        record["full_judge"] = verdict
        record["full_judge_correct"] = bool(record["full_correct"]) or verdict is True


def format_summary_table(summary: dict[str, Any]) -> str:
    """A terminal table (category, n, accuracy): categories, the other levels, then overall."""
    rows: list[tuple[str, int, float]] = [(name, s["n"], s["accuracy"]) for name, s in summary["categories"].items()]
    for level, groups in summary.get("breakdowns", {}).items():
        rows.extend((f"{level}={name}", s["n"], s["accuracy"]) for name, s in groups.items())
    rows.append(("overall", summary["n"], summary["accuracy"]))
    width = max(len("category"), *(len(name) for name, _, _ in rows))
    lines = [f"{summary.get('title', summary.get('benchmark', ''))}", f"{'category':<{width}}  {'n':>6}  accuracy"]
    lines.extend(f"{name:<{width}}  {n:>6}  {accuracy:8.4f}" for name, n, accuracy in rows)
    crop = summary.get("crop")
    if crop:
        lines.append(
            f"crop (items with a crop or box, n={crop['n']}): full {crop['full_accuracy']:.4f}, "
            f"crop {crop['crop_accuracy']:.4f}, gap {crop['gap']:+.4f}"
        )
    reported = summary.get("reported") or {}
    if reported:
        lines.append("as reported: " + ", ".join(f"{name} {value:.4f}" for name, value in reported.items()))
    judge = summary.get("judge")
    if judge:
        lines.append(
            f"judge: accuracy {judge['accuracy']:.4f} (rules {summary['accuracy']:.4f}), agreement with the rules "
            f"{judge['agreement']:.4f}, errors {judge['errors']}"
        )
    return "\n".join(lines)
