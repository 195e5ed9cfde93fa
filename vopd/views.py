"""The two views of one sample that Vision-OPD distils between.

The student sees the whole image with the evidence box drawn in red and a hint to look inside it; the teacher sees
only the box, cropped and enlarged, so it resolves the fine detail the student must learn to find. Both receive the
same text, so any difference in their next-token distributions comes from what they see.

Without a box (``views.evidence: search``, or ``auto`` on a sample with neither a box nor a crop) the teacher's crop
is the window the model itself is most confident on (``vopd.evidence``, stored on the sample as ``search_box``) and
the student sees the plain full image: no drawn box and no hint, since there is no box to point at.
"""

from __future__ import annotations

import html
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from vopd.config import ViewConfig
from vopd.data import Sample, load_dataset, option_letter

MULTIPLE_CHOICE_INSTRUCTION = "Answer with the option's letter from the given choices directly."
_RESAMPLE = Image.Resampling.LANCZOS


@dataclass
class View:
    """What one model is shown: an RGB image and the prompt text."""

    image: Image.Image
    text: str


def format_question(sample: Sample, hint: str) -> str:
    """The question, lettered options, the hint (if any) and, for multiple choice, the answer-format instruction."""
    lines = [sample.question.strip()]
    if sample.options:
        lines.extend(f"{option_letter(index)}. {option}" for index, option in enumerate(sample.options))
    if hint.strip():
        lines.append(hint.strip())
    if sample.options:
        lines.append(MULTIPLE_CHOICE_INSTRUCTION)
    return "\n".join(lines)


def _fit_to_pixels(image: Image.Image, max_pixels: int | None) -> Image.Image:
    """Downscale (aspect kept) so width * height <= max_pixels; the student's compute grows with its pixels.
    ``None`` leaves the image as it is: the processor then applies its own pixel limit, as the official run does."""
    width, height = image.size
    if max_pixels is None or width * height <= max_pixels:
        return image
    scale = math.sqrt(max_pixels / (width * height))
    new_size = (max(1, math.floor(width * scale)), max(1, math.floor(height * scale)))
    return image.resize(new_size, _RESAMPLE)


def _draw_box_outline(
    image: Image.Image, box: tuple[float, float, float, float], color: tuple[int, int, int], width: int
) -> None:
    """Draw the outline just *outside* the box so the evidence pixels stay untouched; at an image border, where
    outside does not exist, the line moves inward so the box stays visible."""
    image_width, image_height = image.size
    x0, y0, x1, y1 = box
    left = max(0, math.floor(x0) - width)
    top = max(0, math.floor(y0) - width)
    right = min(image_width - 1, math.ceil(x1) - 1 + width)
    bottom = min(image_height - 1, math.ceil(y1) - 1 + width)
    if right < left or bottom < top:
        return  # the box lies entirely outside the image: nothing to mark
    ImageDraw.Draw(image).rectangle((left, top, right, bottom), outline=tuple(color), width=width)


def uses_search(sample: Sample, cfg: ViewConfig) -> bool:
    """Whether the teacher's crop of ``sample`` is searched for (vopd.evidence) rather than cut from its box."""
    if cfg.evidence == "search":
        return True
    if cfg.evidence == "box":
        return False
    return sample.bbox is None and not sample.has_crop


def student_view(sample: Sample, cfg: ViewConfig) -> View:
    """The full image (downscaled to cfg.max_pixels when set) with the evidence box drawn; text with the hint.

    A sample with only a precomputed crop has no box to draw (released datasets ship the box already drawn). In
    search mode the student sees the plain image and question: a hint about a red box nobody drew would mislead."""
    if uses_search(sample, cfg):
        return full_view(sample, cfg)
    original = sample.load_image()
    image = _fit_to_pixels(original, cfg.max_pixels)
    if cfg.draw_box and sample.bbox is not None:
        scale_x = image.width / original.width
        scale_y = image.height / original.height
        x0, y0, x1, y1 = sample.bbox
        box = (x0 * scale_x, y0 * scale_y, x1 * scale_x, y1 * scale_y)
        line_width = max(1, round(cfg.box_width * min(scale_x, scale_y)))
        _draw_box_outline(image, box, cfg.box_color, line_width)
    return View(image=image, text=format_question(sample, cfg.hint))


def crop_box(image: Image.Image, bbox: tuple[float, float, float, float], cfg: ViewConfig) -> Image.Image:
    """The box region padded by cfg.padding of its sides (clamped to the image), then enlarged by cfg.upscale with
    the shorter side raised to min_crop_side and the longer side capped at max_crop_side (the cap wins)."""
    x0, y0, x1, y1 = bbox
    pad_x = cfg.padding * (x1 - x0)
    pad_y = cfg.padding * (y1 - y0)
    left = max(0, math.floor(x0 - pad_x))
    top = max(0, math.floor(y0 - pad_y))
    right = min(image.width, math.ceil(x1 + pad_x))
    bottom = min(image.height, math.ceil(y1 + pad_y))
    if right <= left or bottom <= top:
        raise ValueError(f"bbox {list(bbox)} lies outside the {image.width}x{image.height} image")
    crop = image.crop((left, top, right, bottom))

    width = crop.width * cfg.upscale
    height = crop.height * cfg.upscale
    shorter = min(width, height)
    if shorter < cfg.min_crop_side:
        width, height = width * cfg.min_crop_side / shorter, height * cfg.min_crop_side / shorter
    longer = max(width, height)
    if longer > cfg.max_crop_side:
        width, height = width * cfg.max_crop_side / longer, height * cfg.max_crop_side / longer
    size = (max(1, round(width)), max(1, round(height)))
    return crop if size == crop.size else crop.resize(size, _RESAMPLE)


def teacher_view(sample: Sample, cfg: ViewConfig) -> View:
    """The precomputed crop as-is when the sample has one, else the padded, enlarged box; same text as the student.

    In search mode the crop is the sample's ``search_box`` (chosen by ``vopd.evidence.search_evidence``), with the
    student's plain text."""
    if uses_search(sample, cfg):
        if sample.search_box is None:
            raise ValueError(
                f"sample {sample.id!r} is in evidence-search mode but has no searched box yet: run "
                "vopd.evidence.search_evidence first (or give it a bbox)"
            )
        return View(image=crop_box(sample.load_image(), sample.search_box, cfg), text=format_question(sample, ""))
    text = format_question(sample, cfg.hint)
    precomputed = sample.load_crop()
    if precomputed is not None:
        return View(image=precomputed, text=text)
    if sample.bbox is None:
        raise ValueError(
            f"sample {sample.id!r} has neither a bbox nor a precomputed crop: set views.evidence to search (or auto) "
            "to let the model find its own crop"
        )
    return View(image=crop_box(sample.load_image(), sample.bbox, cfg), text=text)


def full_view(sample: Sample, cfg: ViewConfig) -> View:
    """The plain question on the full image: no box, no hint (evaluation on full images, the demo)."""
    return View(image=_fit_to_pixels(sample.load_image(), cfg.max_pixels), text=format_question(sample, ""))


def to_messages(view: View) -> list[dict[str, Any]]:
    """One user turn in the chat format that transformers' processors and chat templates take."""
    return [
        {
            "role": "user",
            "content": [{"type": "image", "image": view.image}, {"type": "text", "text": view.text}],
        }
    ]


# --------------------------------------------------------------------------- `vopd views`
def view_config_from_overrides(overrides: dict[str, Any] | None) -> ViewConfig:
    """A ViewConfig from command-line settings named either ``padding`` or ``views.padding``."""
    known = ViewConfig.model_fields
    values: dict[str, Any] = {}
    for raw_key, value in (overrides or {}).items():
        key = raw_key.replace("-", "_").removeprefix("views.")
        if key not in known:
            raise ValueError(f"unknown view setting {raw_key!r}; known settings: {', '.join(sorted(known))}")
        values[key] = value
    return ViewConfig.model_validate(values)


def _file_stem(sample_id: str, used: set[str]) -> str:
    """A file-name-safe, unique stem for a sample id (ids may hold slashes or spaces)."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", sample_id).strip("._") or "sample"
    candidate, counter = stem, 1
    while candidate in used:
        counter += 1
        candidate = f"{stem}-{counter}"
    used.add(candidate)
    return candidate


def write_view_pairs(
    dataset: str | Path,
    out_dir: str | Path,
    *,
    limit: int | None = None,
    overrides: dict[str, Any] | None = None,
) -> int:
    """Write ``<id>_student.png`` and ``<id>_teacher.png`` per sample plus index.jsonl and index.html, so a person
    can check what each side of the distillation sees. Returns the number of pairs written."""
    cfg = view_config_from_overrides(overrides)
    samples = load_dataset(dataset, limit=limit)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    used_stems: set[str] = set()
    rows: list[dict[str, Any]] = []
    for sample in samples:
        stem = _file_stem(sample.id, used_stems)
        student = student_view(sample, cfg)
        student.image.save(out / f"{stem}_student.png")
        # A box-free sample's crop does not exist until a model searches for it (vopd.evidence, at training time).
        teacher = None if uses_search(sample, cfg) and sample.search_box is None else teacher_view(sample, cfg)
        if teacher is not None:
            teacher.image.save(out / f"{stem}_teacher.png")
        rows.append(
            {
                "id": sample.id,
                "student": f"{stem}_student.png",
                "teacher": f"{stem}_teacher.png" if teacher is not None else None,
                "student_size": list(student.image.size),
                "teacher_size": list(teacher.image.size) if teacher is not None else None,
                "text": student.text,
                "answer": sample.answer,
            }
        )
    with (out / "index.jsonl").open("w", encoding="utf-8") as stream:
        for row in rows:
            stream.write(json.dumps(row, ensure_ascii=False) + "\n")
    (out / "index.html").write_text(_index_html(rows), encoding="utf-8")
    return len(rows)


def _index_html(rows: list[dict[str, Any]]) -> str:
    body = "\n".join(
        "<tr><td>{id}</td><td><img src='{student}'></td><td>{teacher}</td>"
        "<td><pre>{text}</pre>answer: {answer}</td></tr>".format(
            id=html.escape(row["id"]),
            student=html.escape(row["student"], quote=True),
            teacher=(
                f"<img src='{html.escape(row['teacher'], quote=True)}'>"
                if row["teacher"]
                else "no box: the model searches for its crop while training"
            ),
            text=html.escape(row["text"]),
            answer=html.escape(str(row["answer"])),
        )
        for row in rows
    )
    return (
        "<!doctype html><meta charset='utf-8'><title>Vision-OPD views</title>"
        "<style>img{max-width:480px}td{vertical-align:top;padding:4px}pre{white-space:pre-wrap;max-width:400px}</style>"
        "<table><tr><th>id</th><th>student</th><th>teacher</th><th>text</th></tr>\n"
        f"{body}\n</table>\n"
    )
