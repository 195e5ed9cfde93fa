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

from vopd.answering import EvalResult, accuracy_by, answer_record, generate_answers
from vopd.callbacks import CallbackList, ProgressCallback
from vopd.config import EvalConfig
from vopd.data import Sample, letter_index
from vopd.models import LoadedModel, load_model_and_processor
from vopd.views import full_view

_OPTION_LINE = re.compile(r"^\(([A-Z])\)\s*(.*)$")
_INLINE_OPTION = re.compile(r"\(([A-Z])\)\s*")
_CHOICE_PREFIX = re.compile(r"^\s*\(?([A-Z])[).:]\s*")
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
_MAX_LISTED = 5  # problems listed in one error message before "... and N more"


class BenchmarkError(ValueError):
    """A suite that cannot be read: the message names the file, the field or the name that is wrong."""


@dataclass
class BenchmarkItem:
    """One question of a suite: the Sample asked on the full image, its category, and other levels it counts in."""

    sample: Sample
    category: str
    groups: dict[str, str] = field(default_factory=dict)  # e.g. {"task": "Perception"}, {"cycle": "2"}


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
            category = str(row.get("category") or Path(str(row["image"])).parts[0])
            items.append(BenchmarkItem(sample, category))
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
                items.append(BenchmarkItem(sample, subtask.name))
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
            items.append(BenchmarkItem(sample, category, groups))
        except ValueError as error:
            problems.append(f"line {row_number}: {error}")
    _raise_problems(path, problems)
    return items


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


def _load_mme_realworld(data: Path, file_name: str, suite: str) -> list[BenchmarkItem]:
    path = _pick_file(Path(data), (file_name,), suite, MME_LAYOUT)
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
            options = []
            for choice_number, choice in enumerate(entry["Answer choices"]):
                match = _CHOICE_PREFIX.match(str(choice))
                if match is None or match.group(1) != chr(ord("A") + choice_number):
                    raise ValueError(
                        f"Answer choices: expected '({chr(ord('A') + choice_number)}) ...', got {choice!r}"
                    )
                options.append(str(choice)[match.end() :].strip())
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
            items.append(BenchmarkItem(sample, f"{task}/{subtask}", groups))
        except ValueError as error:
            problems.append(f"{where}: {error}")
    _raise_problems(path, problems)
    return items


MME_LAYOUT = (
    "MME_RealWorld.json (Question_id, Image, Text, Answer choices, Ground truth, Task, Subtask, Category) with the "
    "image folders beside it"
)


def load_mme_realworld(data: Path) -> list[BenchmarkItem]:
    return _load_mme_realworld(data, "MME_RealWorld.json", "mme-realworld")


def load_mme_realworld_cn(data: Path) -> list[BenchmarkItem]:
    return _load_mme_realworld(data, "MME_RealWorld_CN.json", "mme-realworld-cn")


def _report_mme(records: Sequence[dict[str, Any]]) -> dict[str, float]:
    reported = {task: stats["accuracy"] for task, stats in accuracy_by(records, "task").items()}
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


def summarize_benchmark(spec: BenchmarkSpec, records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Overall accuracy (mean of the records), per category, per other level, and the paper's own numbers."""
    levels = sorted({key for record in records for key in record.get("groups", {})})
    flat = [{**record, **record.get("groups", {})} for record in records]
    accuracy = _micro(flat)
    p_values = [r["full_p_correct"] for r in flat if r.get("full_p_correct") is not None]
    return {
        "benchmark": spec.name,
        "title": spec.title,
        "accuracy": accuracy,
        "full_accuracy": accuracy,  # the key the rest of the project reads for the full-image condition
        "n": len(flat),
        "n_items": len(flat),
        "correct": sum(bool(r["full_correct"]) for r in flat),
        "unanswered": sum(r["full_choice"] is None for r in flat),
        "full_p_correct": sum(p_values) / len(p_values) if p_values else float("nan"),
        "full_letters": dict(sorted(Counter(str(r["full_choice"]) for r in flat).items())),
        "categories": accuracy_by(flat, "category"),
        "breakdowns": {level: accuracy_by(flat, level) for level in levels},
        "reported": spec.report(flat) if flat else {},
    }


def evaluate_benchmark(
    config: EvalConfig, *, callbacks: Sequence[ProgressCallback] = (), loaded: LoadedModel | None = None
) -> EvalResult:
    """Greedy multiple-choice accuracy on a suite: the full image (fit to views.max_pixels), the plain question.

    Returns the project's EvalResult with the crop fields NaN (there is no box to crop); ``summary`` carries the
    per-category accuracy and ``records`` one row per question with its category.
    """
    if config.benchmark is None or config.data is None:
        raise ValueError("evaluate_benchmark needs config.benchmark and config.data")
    events = CallbackList(callbacks)
    spec = get_benchmark(config.benchmark)
    items = load_benchmark(spec.name, config.data)
    if config.limit is not None:
        items = items[: config.limit]
    loaded = loaded or load_model_and_processor(config.model, config.runtime)
    events.on_start(total=len(items), start=0, unit="sample")
    records: list[dict[str, Any]] = []
    for start in range(0, len(items), config.batch_size):
        if events.should_stop():
            events.on_end(status="stopped", result=None)
            raise InterruptedError("evaluation cancelled")
        batch = items[start : start + config.batch_size]
        answers = generate_answers(
            loaded,
            [full_view(item.sample, config.views) for item in batch],
            [item.sample.options for item in batch],
            max_new_tokens=config.max_new_tokens,
        )
        for item, answer in zip(batch, answers, strict=True):
            records.append(
                {
                    "id": item.sample.id,
                    "benchmark": spec.name,
                    "category": item.category,
                    "groups": dict(item.groups),
                    "question": item.sample.question,
                    "options": item.sample.options,
                    "answer": item.sample.answer,
                    **answer_record(item.sample, "full", answer),
                }
            )
        events.on_progress(done=len(records), total=len(items), metrics=None)

    summary = summarize_benchmark(spec, records)
    records_path = None
    if config.output:
        records_path = Path(config.output)
        records_path.parent.mkdir(parents=True, exist_ok=True)
        records_path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    result = EvalResult(
        full_accuracy=summary["accuracy"],
        crop_accuracy=float("nan"),
        gap=float("nan"),
        n=summary["n"],
        records_path=records_path,
        summary=summary,
        records=records,
    )
    events.on_end(status="succeeded", result=summary)
    return result


def format_summary_table(summary: dict[str, Any]) -> str:
    """A terminal table (category, n, accuracy): categories, the other levels, then overall."""
    rows: list[tuple[str, int, float]] = [(name, s["n"], s["accuracy"]) for name, s in summary["categories"].items()]
    for level, groups in summary.get("breakdowns", {}).items():
        rows.extend((f"{level}={name}", s["n"], s["accuracy"]) for name, s in groups.items())
    rows.append(("overall", summary["n"], summary["accuracy"]))
    width = max(len("category"), *(len(name) for name, _, _ in rows))
    lines = [f"{summary.get('title', summary.get('benchmark', ''))}", f"{'category':<{width}}  {'n':>6}  accuracy"]
    lines.extend(f"{name:<{width}}  {n:>6}  {accuracy:8.4f}" for name, n, accuracy in rows)
    reported = summary.get("reported") or {}
    if reported:
        lines.append("as reported: " + ", ".join(f"{name} {value:.4f}" for name, value in reported.items()))
    return "\n".join(lines)
