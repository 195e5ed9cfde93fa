"""Pure display logic: API records in, plain Python values out (lists, DataFrames, PIL images, markdown).

Nothing here touches Gradio or the network, so the choices that matter (the colour scale, what a top-k row says,
which metrics make which curve) are unit-tested without a browser.
"""

from __future__ import annotations

import base64
import hashlib
import html
import io
import math
import os
import re
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from PIL import Image
from pydantic import ValidationError

from frontend import strings
from frontend.client import InspectResult, Job, Metric, TokenRecord, TopToken
from vopd.config import ViewConfig

ROBUST_SIGMAS = 2.5
_BARE_LETTER = re.compile(r"(?:answer:?\s*)?\(?[A-Z]\)?\.?", re.IGNORECASE)
EMPTY_TOKEN = "∅"
# Gradio's HighlightedText paints a positive score s as rgba(239, 68, 60, s): the legend uses the same colour.
SCORE_RGB = (239, 68, 60)


class UiInputError(ValueError):
    """Bad input typed into the UI (no image, a box with x1 <= x0...): shown to the user as is."""


# ----------------------------------------------------------------------------- colour scale
@dataclass(frozen=True)
class ColorScale:
    """Maps a divergence to [0, 1] linearly between ``low`` and ``high``, clamping outside.

    ``low``/``high`` are mean -/+ 2.5 sigma of the rollout's values, narrowed to the values' own range: one
    runaway token then saturates instead of washing every other token out to white.
    """

    low: float
    high: float

    def score(self, value: float) -> float:
        if not math.isfinite(value):
            return 1.0 if value > 0 else 0.0
        span = self.high - self.low
        if span <= 1e-12:  # every token alike: colour them all alike, faintly unless they are all zero
            return 0.5 if value > 0 else 0.0
        return min(1.0, max(0.0, (value - self.low) / span))


def robust_scale(values: Sequence[float], sigmas: float = ROBUST_SIGMAS) -> ColorScale:
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return ColorScale(0.0, 0.0)
    mean = sum(finite) / len(finite)
    sigma = math.sqrt(sum((v - mean) ** 2 for v in finite) / len(finite))
    low = max(min(finite), mean - sigmas * sigma)
    high = min(max(finite), mean + sigmas * sigma)
    return ColorScale(low, high)


METRIC_FIELDS = {
    strings.METRIC_JSD: "divergence",
    strings.METRIC_REVERSE: "reverse_kl",
    strings.METRIC_FORWARD: "forward_kl",
}


def metric_values(tokens: Sequence[TokenRecord], metric: str) -> list[float]:
    """The per-token values of the chosen divergence (JSD(alpha) is the request's alpha)."""
    if metric not in METRIC_FIELDS:
        raise UiInputError(f"unknown divergence {metric!r}; choose one of {', '.join(METRIC_FIELDS)}")
    field = METRIC_FIELDS[metric]
    return [float(getattr(token, field)) for token in tokens]


def display_token(text: str) -> str:
    """Tokens as they read. Unprintable characters (control bytes such as a newline or a tab) show by their byte value,
    ``<0x0A>``, as tokenizers name byte tokens; a token that is only part of a multi-byte character (decoded alone it
    is U+FFFD; the server names such bytes itself, older servers did not) shows as ``<byte>``; an empty decode (a
    special token) still gets a clickable glyph."""
    if not text:
        return EMPTY_TOKEN
    if set(text) == {"\ufffd"}:
        return "<byte>" * len(text)
    return "".join(
        "".join(f"<0x{byte:02X}>" for byte in char.encode("utf-8")) if _unprintable(char) else char for char in text
    )


def _unprintable(char: str) -> bool:
    return (not char.isprintable() and char != " ") or char == "\ufffd"


def probability_text(prob: float) -> str:
    """A probability as a percentage to three significant figures: 60.0%, 0.412%, 3.10e-05%, 0%.
    (Rounded to 4 decimals, most of a top-k list printed as 0.)"""
    if not math.isfinite(prob) or prob <= 0:
        return "0%"
    percent = prob * 100
    if percent >= 99.95:
        return "100%"
    if percent < 0.01:
        return f"{percent:.2e}%"
    return f"{percent:#.3g}".rstrip(".") + "%"


# The absolute scale (the default): one fixed range per divergence, so a colour means the same amount on every answer
# and a negligible divergence stays pale. ln 2 is the most two distributions can differ by JSD (alpha 0.5), in nats;
# the KLs are unbounded and clamp at 2 nats, where the two sides already put their mass on different tokens.
ABSOLUTE_HIGH = {
    strings.METRIC_JSD: math.log(2),
    strings.METRIC_REVERSE: 2.0,
    strings.METRIC_FORWARD: 2.0,
}


def absolute_scale(metric: str) -> ColorScale:
    if metric not in ABSOLUTE_HIGH:
        raise UiInputError(f"unknown divergence {metric!r}; choose one of {', '.join(ABSOLUTE_HIGH)}")
    return ColorScale(0.0, ABSOLUTE_HIGH[metric])


def token_strip(
    tokens: Sequence[TokenRecord], metric: str, scale_mode: str = strings.SCALE_ABSOLUTE
) -> tuple[list[tuple[str, float]], ColorScale]:
    """HighlightedText value: one (token, score in [0, 1]) pair per rollout position, and the scale used: the fixed
    range of the divergence (absolute, the default) or this answer's own spread (relative)."""
    values = metric_values(tokens, metric)
    scale = robust_scale(values) if scale_mode == strings.SCALE_RELATIVE else absolute_scale(metric)
    return [(display_token(t.token), round(scale.score(v), 4)) for t, v in zip(tokens, values, strict=True)], scale


def legend_html(scale: ColorScale, metric: str, scale_mode: str = strings.SCALE_RELATIVE) -> str:
    """A gradient bar labelled with the divergence values at both ends of the scale, and which scale it is."""
    red = ",".join(str(c) for c in SCORE_RGB)
    note = (
        f"(relative to this answer: clamped at mean ± {ROBUST_SIGMAS:g}σ)"
        if scale_mode == strings.SCALE_RELATIVE
        else "(absolute, nats: the same on every answer)"
    )
    return (
        '<div style="display:flex;align-items:center;gap:8px;flex-wrap:wrap;font-size:0.9em">'
        f"<span>{html.escape(metric)}:</span><span>≤ {scale.low:.3g}</span>"
        f'<span style="display:inline-block;width:160px;height:12px;border:1px solid #8884;'
        f'background:linear-gradient(to right, rgba({red},0), rgba({red},1))"></span>'
        f"<span>≥ {scale.high:.3g}</span>"
        f'<span style="opacity:0.7">{note}</span></div>'
    )


def most_divergent(tokens: Sequence[TokenRecord], metric: str) -> int | None:
    """The position the detail panel opens on: the token the summary names as the highest."""
    if not tokens:
        return None
    values = metric_values(tokens, metric)
    return max(range(len(tokens)), key=lambda i: values[i] if math.isfinite(values[i]) else math.inf)


def enlarged(image: Image.Image | None, min_side: int = 320) -> Image.Image | None:
    """A view shown large enough to see the evidence: a small image (the teacher's crop is often under 64 px) scaled
    up by a whole factor, pixel for pixel (nearest), so nothing is smoothed away; larger images are left as they are."""
    if image is None:
        return None
    factor = math.ceil(min_side / max(1, max(image.size)))
    if factor <= 1:
        return image
    return image.resize((image.width * factor, image.height * factor), Image.Resampling.NEAREST)


# ----------------------------------------------------------------------------- one token's distributions
def _logp(prob: float) -> float:
    return math.log(prob) if prob > 0 else float("-inf")


def topk_frame(own: Sequence[TopToken], other: Sequence[TopToken], tail_mass: float) -> pd.DataFrame:
    """One side's top-k: rank, token, probability, log p(this side) - log p(other side) where the other side
    lists the token too, and a last row with the probability mass outside the top-k."""
    other_probs = {entry.token_id: entry.prob for entry in other}
    rows: list[list[Any]] = []
    for entry in own:
        if entry.token_id in other_probs:
            delta = f"{_logp(entry.prob) - _logp(other_probs[entry.token_id]):+.3g}"
            note = ""
        else:
            delta, note = "", strings.TOPK_NOT_LISTED
        rows.append([entry.rank, display_token(entry.token), probability_text(entry.prob), delta, note])
    rows.append(["", strings.TOPK_TAIL, probability_text(tail_mass), "", strings.TOPK_TAIL_NOTE])
    return pd.DataFrame(rows, columns=strings.TOPK_COLUMNS)


def topk_columns_help() -> str:
    """One line per top-k column: what it means (the Δ log p column especially)."""
    return "  \n".join(
        f"**{html.escape(name, quote=False)}**: {html.escape(meaning, quote=False)}"  # "<0xNN>" is no HTML tag
        for name, meaning in zip(strings.TOPK_COLUMNS, strings.TOPK_COLUMN_HELP, strict=True)
    )


def topk_tables(record: TokenRecord) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Student and teacher top-k at one position, side by side."""
    return (
        topk_frame(record.student_top, record.teacher_top, record.student_tail_mass),
        topk_frame(record.teacher_top, record.student_top, record.teacher_tail_mass),
    )


def token_details_markdown(record: TokenRecord) -> str:
    student_argmax = display_token(record.student_top[0].token) if record.student_top else "?"
    teacher_argmax = display_token(record.teacher_top[0].token) if record.teacher_top else "?"
    agreement = (
        f"both argmaxes are `{student_argmax}`"
        if record.argmax_agree
        else f"**argmaxes disagree**: student `{student_argmax}` vs teacher `{teacher_argmax}`"
    )
    return (
        f"**Position {record.position}**, sampled token `{display_token(record.token)}` — "
        f"p(student) {record.student_prob:.3f}, p(teacher) {record.teacher_prob:.3f}; {agreement}.  \n"
        f"Entropy: student {record.student_entropy:.3f}, teacher {record.teacher_entropy:.3f} nats.  \n"
        f"JSD(alpha) {record.divergence:.4f} · JSD {record.jsd:.4f} · forward KL {record.forward_kl:.4f} · "
        f"reverse KL {record.reverse_kl:.4f}"
    )


# ----------------------------------------------------------------------------- whole rollout
def answer_text(text: str, choice: str | None, options: Sequence[str] | None = None) -> str:
    """An answer as a reader wants it: the chosen option's letter with its text ("B. green"); an open question's
    answer in the model's words (flagged when the model still answered with a bare letter)."""
    text = (text or "").strip()
    if choice and options:
        index = ord(choice.upper()) - ord("A")
        if 0 <= index < len(options):
            return f"{choice}. {options[index]}"
    if choice:
        return f"{choice} — {text}" if text and text != choice else choice
    if not text:
        return "(empty)"
    if not options and _BARE_LETTER.fullmatch(text):
        return f"{text} {strings.LETTER_FOR_OPEN_QUESTION}"
    return text


def rollout_summary_markdown(result: InspectResult, metric: str) -> str:
    """Mean divergence and where along the answer the two argmaxes part ways."""
    tokens = result.tokens
    if not tokens:
        return strings.NO_TOKENS
    values = metric_values(tokens, metric)
    disagree = [t for t in tokens if not t.argmax_agree]
    where = ", ".join(f"#{t.position} `{display_token(t.token)}`" for t in disagree[:12])
    more = f" and {len(disagree) - 12} more" if len(disagree) > 12 else ""
    peak = max(range(len(tokens)), key=lambda i: values[i])
    return (
        f"Model `{result.model}` · alpha {result.alpha:g} · {len(tokens)} tokens · mean {metric} "
        f"{sum(values) / len(values):.4f} · highest at #{peak} `{display_token(tokens[peak].token)}`.  \n"
        + (
            f"Argmaxes disagree at {len(disagree)} of {len(tokens)} positions: {where}{more}."
            if disagree
            else "Student and teacher argmaxes agree at every position."
        )
    )


# ----------------------------------------------------------------------------- inputs
def validation_message(error: ValidationError) -> str:
    """Pydantic's errors as ``field.path: message`` pairs, the wording a user can act on."""
    lines = []
    for item in error.errors():
        location = ".".join(str(part) for part in item["loc"])
        message = str(item["msg"]).removeprefix("Value error, ")
        lines.append(f"{location}: {message}" if location else message)
    return "; ".join(lines)


def parse_options(text: str | None) -> list[str] | None:
    """Options typed one per line, or comma-separated on one line; None when there are none."""
    if not text or not text.strip():
        return None
    parts = text.splitlines() if "\n" in text.strip() else text.split(",")
    options = [part.strip() for part in parts if part.strip()]
    if len(options) == 1:
        raise UiInputError("give at least two options, or none for an open question")
    return options


def parse_box(
    values: Sequence[float | None], image_size: tuple[int, int] | None = None
) -> tuple[float, float, float, float]:
    """Validate the four typed corners (and, when the image is known, that the box lies inside it)."""
    if len(values) != 4 or any(v is None for v in values):
        raise UiInputError("set the evidence box: draw it on the image or type x0, y0, x1, y1")
    x0, y0, x1, y1 = (float(v) for v in values)  # type: ignore[arg-type]
    if x1 <= x0 or y1 <= y0:
        raise UiInputError(f"bad box [{x0:g}, {y0:g}, {x1:g}, {y1:g}]: need x1 > x0 and y1 > y0")
    if x0 < 0 or y0 < 0:
        raise UiInputError(f"bad box [{x0:g}, {y0:g}, {x1:g}, {y1:g}]: corners must not be negative")
    if image_size is not None:
        width, height = image_size
        if x1 > width or y1 > height:
            raise UiInputError(
                f"bad box [{x0:g}, {y0:g}, {x1:g}, {y1:g}]: it reaches outside the {width}x{height} image"
            )
    return x0, y0, x1, y1


def box_from_annotation(boxes: Sequence[dict[str, Any]] | None) -> tuple[float, float, float, float] | None:
    """The last drawn box of gradio-image-annotation's value (``xmin``... in image pixels), or None."""
    if not boxes:
        return None
    box = boxes[-1]
    return float(box["xmin"]), float(box["ymin"]), float(box["xmax"]), float(box["ymax"])


def default_box(image_size: tuple[int, int]) -> tuple[float, float, float, float]:
    """A starting box in the middle quarter of a freshly uploaded image, so Run works before any drawing."""
    width, height = image_size
    return float(width // 4), float(height // 4), float(width - width // 4), float(height - height // 4)


def view_previews(
    image_bytes: bytes, box: tuple[float, float, float, float], views: ViewConfig | None = None
) -> tuple[Image.Image, Image.Image]:
    """Exactly what each model is shown (vopd.views, pure PIL): the student's full image with the red box and the
    teacher's padded, upscaled crop."""
    from vopd.data import Sample
    from vopd.views import student_view, teacher_view

    views = views or ViewConfig()
    try:
        sample = Sample(id="preview", question="preview", bbox=box, image_bytes=image_bytes)
        return student_view(sample, views).image, teacher_view(sample, views).image
    except ValueError as error:
        raise UiInputError(str(error)) from error


# ----------------------------------------------------------------------------- jobs
def format_eta(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return ""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def dataset_label(dataset_id: str, names: Mapping[str, str] | None) -> str:
    """A dataset's name where the caller knows it, else its id (a deleted set, or one the key cannot see)."""
    return (names or {}).get(dataset_id) or dataset_id


def source_label(job: Job, names: Mapping[str, str] | None) -> str:
    """What an evaluation was asked on, by name: the dataset's name, or ``benchmark:folder``."""
    return job.source_label if job.benchmark else dataset_label(job.dataset_id, names)


def job_rows(jobs: Sequence[Job], names: Mapping[str, str] | None = None) -> pd.DataFrame:
    """The job table; the dataset column shows each dataset's name (``names``: id -> name)."""
    rows = [
        [
            job.id,
            job.kind,
            job.status,
            f"{job.progress:.0%}",
            f"{job.step}/{job.total_steps}" if job.total_steps else str(job.step),
            job.queue_position if job.queue_position is not None else "",
            format_eta(job.eta_seconds),
            job.model_name,
            dataset_label(job.dataset_id, names),
            job.created_at.strftime("%Y-%m-%d %H:%M:%S"),
        ]
        for job in jobs
    ]
    return pd.DataFrame(rows, columns=strings.JOB_TABLE_COLUMNS)


def job_header_markdown(job: Job, names: Mapping[str, str] | None = None) -> str:
    parts = [f"### Job {job.id} · {job.kind} · {job.status}"]
    facts = [f"model `{job.model_name}`", f"dataset `{dataset_label(job.dataset_id, names)}`"]
    if job.total_steps:
        facts.append(f"{job.unit} {job.step}/{job.total_steps} ({job.progress:.0%})")
    if job.status == "queued" and job.queue_position is not None:
        facts.append(f"queue position {job.queue_position}")
    if job.status == "running" and job.eta_seconds is not None:
        facts.append(f"ETA {format_eta(job.eta_seconds)}")
    if job.cancel_requested and not job.is_terminal:
        facts.append("cancellation requested")
    if job.attempts > 1:
        facts.append(f"attempt {job.attempts}")
    if job.kind == "train":
        facts.append(rollout_fact(job))
    elif job.engine is not None or job.config.get("engine") not in (None, "auto", "hf"):
        facts.append(engine_fact(job, "answers", job.config.get("engine")))
    parts.append(" · ".join(facts))
    if job.error:
        parts.append(f"**Failed:** {job.error}")
    if job.result and job.kind == "eval":
        parts.append(eval_result_line(job.result))
    elif job.result and job.result.get("model"):
        parts.append(f"Trained model: `{job.result['model']}` (usable in Inspect, Evaluate and Demo).")
    return "\n\n".join(parts)


def engine_fact(job: Job, what: str, asked: Any) -> str:
    """``what`` `engine`: the engine the worker resolved the job's setting to (the API's ``engine``), with what was
    asked beside it where that differs (auto); only what was asked while the worker has not said yet."""
    asked = asked if isinstance(asked, str) else "auto"
    if job.engine is None:
        return f"{what} `{asked}`" + (" (resolved by the worker)" if asked == "auto" else "")
    return f"{what} `{job.engine}`" + (f" (asked `{asked}`)" if asked != job.engine else "")


def rollout_fact(job: Job) -> str:
    """The rollout engine of a training job as the worker resolved it (auto = vLLM on a GPU worker that has it; the
    trainer writes the engine into every step's metrics) and its latest rollout speed (rollout/tokens_per_s)."""
    rollout = job.config.get("rollout")
    fact = engine_fact(job, "rollouts", rollout.get("engine", "auto") if isinstance(rollout, dict) else "auto")
    speed = (job.latest_metrics or {}).get("rollout/tokens_per_s")
    if isinstance(speed, int | float) and math.isfinite(speed):
        fact += f" at {speed:,.0f} tok/s"
    return fact


def progress_html(job: Job) -> str:
    """A native <progress> bar: the job's fraction done (indeterminate while queued)."""
    if job.status == "queued":
        return '<progress style="width:100%"></progress>'
    return f'<progress style="width:100%" value="{job.progress:.4f}" max="1"></progress>'


def percent(value: Any) -> str:
    """An accuracy as 66.0%; n/a where there is none."""
    return f"{value:.1%}" if isinstance(value, int | float) and math.isfinite(value) else "n/a"


def eval_result_line(result: dict[str, Any]) -> str:
    def pct(key: str) -> str:
        return percent(result.get(key))

    return f"Full image {pct('full_accuracy')} · crop {pct('crop_accuracy')} · gap {pct('gap')} · n {result.get('n')}"


CURVE_DTYPES = {"step": "int64", "value": "float64", "series": "str"}


def curve_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """Typed even when empty: a plot first fed an empty object-typed frame takes its axes for categories and keeps
    them when the numbers arrive (no line is drawn then)."""
    return pd.DataFrame(rows, columns=list(CURVE_DTYPES)).astype(CURVE_DTYPES)


def plot_value(frame: pd.DataFrame) -> pd.DataFrame | None:
    """What a plot is given: None rather than an empty frame. A Gradio plot fixes its colour domain from the first
    data it draws; fed an empty frame first, it never draws the lines that arrive later."""
    return None if frame.empty else frame


def _long_frame(metrics: Sequence[Metric], keys: Sequence[str]) -> pd.DataFrame:
    return curve_frame(
        [
            {"step": m.step, "value": float(m.data[key]), "series": key}
            for m in metrics
            for key in keys
            if isinstance(m.data.get(key), int | float) and math.isfinite(float(m.data[key]))
        ]
    )


def metric_keys(metrics: Sequence[Metric]) -> set[str]:
    return {key for m in metrics for key, value in m.data.items() if isinstance(value, int | float)}


def curve_frames(metrics: Sequence[Metric]) -> dict[str, pd.DataFrame]:
    """Long-format frames (step, value, series) for the loss, divergence, agreement and accuracy curves.

    Series are chosen by name so curves follow the trainer's metric names without a fixed list: ``loss``;
    ``divergence*``; anything with ``agree``; anything with ``accuracy``.
    """
    keys = metric_keys(metrics)
    groups = {
        "loss": sorted(k for k in keys if k == "loss"),
        "divergence": sorted(k for k in keys if k.startswith("divergence")),
        "agreement": sorted(k for k in keys if "agree" in k),
        "accuracy": sorted(k for k in keys if "accuracy" in k),
    }
    return {name: _long_frame(metrics, group) for name, group in groups.items()}


def _eval_points(job: Job, step: int, names: Mapping[str, str] | None = None) -> list[dict[str, Any]]:
    """A succeeded dataset evaluation's full-image and crop accuracy at ``step``, one series per condition and
    dataset: evaluations on two datasets are two measurements, never one line."""
    rows = []
    for condition, key in (("full image", "full_accuracy"), ("crop", "crop_accuracy")):
        value = (job.result or {}).get(key)
        if isinstance(value, int | float) and math.isfinite(value):
            source = source_label(job, names)
            series = f"{condition} · {source}" if source else condition
            rows.append({"step": step, "value": float(value), "series": series})
    return rows


def eval_accuracy_frame(
    train_job: Job, eval_jobs: Sequence[Job], names: Mapping[str, str] | None = None
) -> pd.DataFrame:
    """Full-image and crop accuracy of the succeeded evaluations of this training job's checkpoints, by step, one
    series per (condition, dataset); the base model's evaluations on those same datasets sit at step 0, where
    training started. The newest evaluation wins where one model was evaluated twice on one dataset."""
    done = [job for job in eval_jobs if job.status == "succeeded" and job.result and not job.benchmark]
    points: dict[tuple[int, str], dict[str, Any]] = {}
    datasets: set[str] = set()
    for job in sorted(done, key=lambda job: job.id):
        if job.model_job_id != train_job.id:
            continue
        step = job.model_step if job.model_step is not None else (train_job.total_steps or train_job.step)
        datasets.add(job.dataset_id)
        points.update({(row["step"], row["series"]): row for row in _eval_points(job, step, names)})
    for job in sorted(done, key=lambda job: job.id):
        if job.model_job_id is None and job.model_name == train_job.model_name and job.dataset_id in datasets:
            points.update({(row["step"], row["series"]): row for row in _eval_points(job, 0, names)})
    return curve_frame(sorted(points.values(), key=lambda row: (row["series"], row["step"])))


def single_point_series(frame: pd.DataFrame | None) -> bool:
    """Whether some series of a (step, value, series) frame has one point: a line needs two, so Vega-Lite draws
    nothing for it (a legend over an empty plot)."""
    if frame is None or frame.empty:
        return False
    return bool((frame.groupby("series")["step"].nunique() < 2).any())


def log_tail(lines: Sequence[str], keep: int = 200) -> str:
    """The newest ``keep`` lines, newest first: the line that matters is the one in view, with no scrolling (a
    Textbox shows its first lines, and its autoscroll does not fire while the tab is hidden)."""
    return "\n".join(reversed(lines[-keep:]))


def human_size(size_bytes: int) -> str:
    size = float(size_bytes)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GB"


# ----------------------------------------------------------------------------- evaluation
def eval_engine(job: Job) -> str:
    """The evaluation's answer engine for its table row: the one the worker resolved (the API's ``engine``, from the
    result) once known, else the setting asked for (``auto`` where the config leaves it out)."""
    if job.engine is not None:
        return job.engine
    asked = job.config.get("engine")
    return asked if isinstance(asked, str) else "auto"


def eval_table(jobs: Sequence[Job], names: Mapping[str, str] | None = None) -> pd.DataFrame:
    rows = []
    for job in jobs:
        result = job.result or {}

        def number(key: str, result: dict[str, Any] = result) -> float | None:
            value = result.get(key)
            return round(float(value), 4) if isinstance(value, int | float) and math.isfinite(value) else None

        rows.append(
            [
                job.id,
                job.model_name,
                source_label(job, names),
                job.status,
                eval_engine(job),
                number("full_accuracy"),
                number("crop_accuracy"),
                number("gap"),
                result.get("n"),
            ]
        )
    return pd.DataFrame(rows, columns=strings.EVAL_TABLE_COLUMNS)


# The two conditions' colours, fixed so the chart and its legend (our own HTML swatches: Gradio 6.31's bar legend
# drew names without swatches) always agree.
CONDITION_COLORS = {"full image": "#2563eb", "crop": "#f97316"}


def condition_legend_html() -> str:
    """A legend with a colour swatch per condition, and what each condition means."""
    items = "".join(
        f'<span style="display:inline-flex;align-items:center;gap:6px;margin-right:18px">'
        f'<span style="display:inline-block;width:14px;height:14px;border-radius:3px;background:{color}"></span>'
        f"{html.escape(name)} — {html.escape(strings.CONDITION_MEANING[name])}</span>"
        for name, color in CONDITION_COLORS.items()
    )
    return f'<div style="display:flex;flex-wrap:wrap;gap:4px;font-size:0.9em">{items}</div>'


def eval_chart_frame(jobs: Sequence[Job]) -> pd.DataFrame:
    """Bars: one group per evaluated model (job id disambiguates repeats), full image vs crop."""
    rows = []
    for job in jobs:
        if job.status != "succeeded" or not job.result:
            continue
        label = f"{job.model_name} (#{job.id})"
        for condition, key in (("full image", "full_accuracy"), ("crop", "crop_accuracy")):
            value = job.result.get(key)
            if isinstance(value, int | float) and math.isfinite(value):
                rows.append({"model": label, "accuracy": float(value), "condition": condition})
    return pd.DataFrame(rows, columns=["model", "accuracy", "condition"]).astype(
        {"model": "str", "accuracy": "float64", "condition": "str"}
    )


def _mark(correct: Any) -> str:
    return "✓" if correct is True else "✗" if correct is False else "–"


def item_rows(records: Sequence[dict[str, Any]]) -> pd.DataFrame:
    rows = [
        [
            index,
            record.get("id", ""),
            record.get("question", ""),
            record.get("answer") or "",
            answer_text(record.get("full_text", ""), record.get("full_choice"), record.get("options")),
            _mark(record.get("full_correct")),
            answer_text(record.get("crop_text", ""), record.get("crop_choice"), record.get("options")),
            _mark(record.get("crop_correct")),
        ]
        for index, record in enumerate(records)
    ]
    return pd.DataFrame(rows, columns=strings.ITEM_COLUMNS)


def item_markdown(record: dict[str, Any]) -> str:
    options = record.get("options") or []
    lettered = "  \n".join(f"{chr(ord('A') + i)}. {option}" for i, option in enumerate(options))
    return (
        f"**{record.get('id', '')}** — {record.get('question', '')}  \n{lettered}\n\n"
        f"Correct answer: **{record.get('answer') or 'n/a'}**  \n"
        f"Student (full image): {answer_text(record.get('full_text', ''), record.get('full_choice'), options)} "
        f"{_mark(record.get('full_correct'))}  \n"
        f"Teacher (crop): {answer_text(record.get('crop_text', ''), record.get('crop_choice'), options)} "
        f"{_mark(record.get('crop_correct'))}"
    )


def image_with_box(image: Image.Image, box: Sequence[float], label: str = "") -> Image.Image:
    """A copy of ``image`` with ``box`` outlined (dashed blue, as on the Inspect tab's surface) and labelled; small
    images are enlarged first so the outline stays thin next to the detail."""
    from PIL import ImageDraw

    scale = max(1, math.ceil(384 / max(image.size)))
    shown = image.convert("RGB").resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST)
    draw = ImageDraw.Draw(shown)
    x0, y0, x1, y1 = (v * scale for v in box)
    color = (37, 99, 235)
    dash = 6
    for start in range(int(x0), int(x1), dash * 2):
        draw.line([(start, y0), (min(start + dash, x1), y0)], fill=color, width=3)
        draw.line([(start, y1), (min(start + dash, x1), y1)], fill=color, width=3)
    for start in range(int(y0), int(y1), dash * 2):
        draw.line([(x0, start), (x0, min(start + dash, y1))], fill=color, width=3)
        draw.line([(x1, start), (x1, min(start + dash, y1))], fill=color, width=3)
    if label:
        text_y = max(0, y0 - 14)
        draw.rectangle([x0, text_y, x0 + 7 * len(label) + 6, text_y + 13], fill=color)
        draw.text((x0 + 3, text_y), label, fill=(255, 255, 255))
    return shown


def png_bytes(image: Image.Image) -> bytes:
    """Lossless bytes of what the browser uploaded (decoded once by Gradio), for the API and the previews."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def stable_png_path(image: Image.Image) -> str:
    """The image as a PNG in the temp folder, named by its content and written atomically.

    Handing Gradio a finished file (rather than a PIL image it would re-encode, lossily, into a file it rewrites
    on every event) keeps concurrent events from reading a half-written image.
    """
    data = png_bytes(image)
    folder = Path(tempfile.gettempdir()) / "vopd-ui-images"
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"{hashlib.sha256(data).hexdigest()[:32]}.png"
    if not target.exists():
        handle, staging = tempfile.mkstemp(dir=folder, suffix=".partial")
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
        os.replace(staging, target)
    return str(target)


def served(value: Any) -> Any:
    """``value`` with every PIL image in it (alone, or in a tuple or list of outputs) handed over as a finished file
    (``stable_png_path``). Gradio writes a PIL output into its cache on every event, in place under a name its content
    decides: the same image shown again is rewritten while a browser may still be reading it, and that response ends
    short of its Content-Length ("Response content shorter than Content-Length"). A finished file is never rewritten."""
    if isinstance(value, Image.Image):
        return stable_png_path(value)
    if type(value) in (tuple, list):  # outputs, and values made of them; no other sequence is opened
        return type(value)(served(item) for item in value)
    return value


def image_from_data_url(url: str) -> Image.Image:
    """The API's sample thumbnails arrive as ``data:image/jpeg;base64,...`` URLs."""
    _, _, encoded = url.partition(",")
    return Image.open(io.BytesIO(base64.b64decode(encoded))).convert("RGB")
