"""Datasets: upload a dataset (checked by the server, every problem named), make a synthetic set, list them by name
and preview a few samples with their boxes, all without a terminal.

Every dataset list in the studio shows names; the id stays the value a job's config names. After an upload or a
synthetic set, ``frontend.app`` refreshes the other tabs' dataset lists.
"""

from __future__ import annotations

import html
import json
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import gradio as gr
import pandas as pd

from frontend import render, strings
from frontend.client import ApiError, Dataset, Sample, VopdClient
from frontend.context import UiContext, choices_update, dataset_choices, readable_errors

DATA_SUFFIXES = (".zip", ".jsonl", ".json", ".parquet")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".gif")
MAX_ISSUES_SHOWN = 50
PREVIEW_THUMBNAIL = 384


# ----------------------------------------------------------------------------- pure callbacks
def _paths(files: Any) -> list[Path]:
    """gr.File's value (a path, a list of paths, or upload objects with ``.name``) as paths."""
    if not files:
        return []
    items = files if isinstance(files, list | tuple) else [files]
    return [Path(getattr(item, "name", item)) for item in items]


def bundle_jsonl_with_images(jsonl: Path, images: list[Path], target: Path) -> Path:
    """One .jsonl and the image files picked with it, zipped as the upload expects: data.jsonl at the root and each
    image at the path the lines name for it (matched by file name), so ``"image": "images/a.png"`` finds a.png.
    Images no line names go in as they are; the server then reports any line whose image is missing."""
    wanted: dict[str, str] = {}
    for line in jsonl.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue  # the server names the line and what is wrong with it
        if isinstance(record, dict):
            for key in ("image", "crop_image"):
                value = record.get(key)
                if isinstance(value, str) and value and not PurePosixPath(value).is_absolute() and ".." not in value:
                    wanted.setdefault(PurePosixPath(value).name, value)
    with zipfile.ZipFile(target, "w", compression=zipfile.ZIP_STORED) as archive:
        archive.write(jsonl, "data.jsonl")
        for image in images:
            archive.write(image, wanted.get(image.name, image.name))
    return target


def upload_file(files: Any, scratch: Path) -> Path:
    """The one file to send: a single pick as it is, or a .jsonl with its images bundled into a zip named after the
    .jsonl (so the set's default name is the .jsonl's)."""
    paths = _paths(files)
    if not paths:
        raise render.UiInputError(strings.UPLOAD_NEED_FILE)
    if len(paths) == 1:
        return paths[0]
    jsonls = [path for path in paths if path.suffix.lower() in (".jsonl", ".json")]
    images = [path for path in paths if path.suffix.lower() in IMAGE_SUFFIXES]
    if len(jsonls) != 1 or len(images) != len(paths) - 1:
        raise render.UiInputError(
            strings.UPLOAD_BUNDLE_NEEDS_JSONL.format(names=", ".join(path.name for path in paths))
        )
    scratch.mkdir(parents=True, exist_ok=True)
    return bundle_jsonl_with_images(jsonls[0], images, scratch / f"{jsonls[0].stem}.zip")


def rejection_markdown(error: ApiError, sent: Path | None = None) -> str:
    """The API's own words for a refused upload: its message, then every issue it listed (line, field, message);
    a lone .jsonl whose image files were not found also gets the way to send them."""
    headline = error.message.split(": line ", 1)[0] if error.details else error.message
    lines = [strings.UPLOAD_REJECTED.format(message=html.escape(headline))]
    if error.details:
        lines.append("")
        lines += [f"- {html.escape(detail)}" for detail in error.details[:MAX_ISSUES_SHOWN]]
        if len(error.details) > MAX_ISSUES_SHOWN:
            lines.append(strings.UPLOAD_MORE_ISSUES.format(n=len(error.details) - MAX_ISSUES_SHOWN))
    lone_jsonl = sent is not None and sent.suffix.lower() in (".jsonl", ".json")
    if lone_jsonl and any("image file not found" in detail for detail in error.details):
        lines += ["", strings.UPLOAD_IMAGES_HINT]
    return "\n".join(lines)


def upload(client: VopdClient, files: Any, name: str | None, scratch: Path) -> tuple[Dataset | None, str]:
    """Send the picked file(s); the new dataset and a success line, or None and the server's reasons."""
    path = upload_file(files, scratch)
    try:
        dataset = client.upload_dataset(path, name)
    except ApiError as error:
        if error.status_code is None or error.status_code in (401, 403):
            raise
        return None, rejection_markdown(error, path)
    return dataset, strings.UPLOADED.format(
        name=html.escape(dataset.name), n=dataset.n_samples, size=render.human_size(dataset.size_bytes)
    )


def _whole(value: Any, minimum: int, message: str) -> int:
    try:
        number = float(value)
    except (TypeError, ValueError) as error:
        raise render.UiInputError(message) from error
    if not number.is_integer() or number < minimum:
        raise render.UiInputError(message)
    return int(number)


def make_synthetic(client: VopdClient, n: Any, seed: Any, world: str, name: str | None) -> tuple[Dataset, str]:
    """A synthetic set made on the server (POST /api/datasets/synthetic); its out-of-range fields come back in the
    API's words."""
    count = _whole(n, 1, strings.SYNTH_NEED_N)
    seed_value = _whole(seed, 0, strings.SYNTH_NEED_SEED)
    dataset = client.make_synthetic_dataset(count, seed_value, world != strings.SYNTH_NO_BOX, name)
    return dataset, strings.SYNTH_DONE.format(
        name=html.escape(dataset.name), n=dataset.n_samples, size=render.human_size(dataset.size_bytes)
    )


def dataset_table(datasets: list[Dataset]) -> pd.DataFrame:
    rows = [
        [
            d.name,
            d.n_samples,
            render.human_size(d.size_bytes),
            strings.OWNER_SHARED if d.shared else strings.OWNER_YOURS,
            d.id,
        ]
        for d in datasets
    ]
    return pd.DataFrame(rows, columns=strings.DATASET_TABLE_COLUMNS)


def _box_text(box: tuple[float, ...] | None) -> str:
    return "[" + ", ".join(f"{v:g}" for v in box) + "]" if box is not None else ""


def preview_image(sample: Sample) -> Any:
    """The student's view (its red box drawn by the server, as in training); a set without boxes gets the box it
    keeps for evaluation drawn dashed, scaled from the sample's pixels to the thumbnail's."""
    image = render.image_from_data_url(sample.student_image)
    if sample.bbox is None and sample.hidden_bbox is not None and sample.width and sample.height:
        scale_x, scale_y = image.width / sample.width, image.height / sample.height
        x0, y0, x1, y1 = sample.hidden_bbox
        box = (x0 * scale_x, y0 * scale_y, x1 * scale_x, y1 * scale_y)
        return render.image_with_box(image, box, strings.PREVIEW_HIDDEN_LABEL)
    return render.enlarged(image, min_side=PREVIEW_THUMBNAIL)


def _text(text: Any) -> str:
    return html.escape(str(text)).replace("\n", " ")


def preview(
    client: VopdClient, dataset_id: str | None, names: dict[str, str] | None = None
) -> tuple[list[tuple[str, str]], str]:
    """A few samples: each picture with its box, and a list of question, options, answer and box (a list, not a
    table: at 420 px a six-column table broke ids letter by letter)."""
    if not dataset_id:
        raise render.UiInputError(strings.PREVIEW_NEED_DATASET)
    page = client.samples(dataset_id, limit=strings.PREVIEW_COUNT, thumbnail=PREVIEW_THUMBNAIL)
    gallery = [
        (render.stable_png_path(preview_image(sample)), f"#{sample.index} · {sample.question}") for sample in page.items
    ]
    rows = [
        strings.PREVIEW_ITEM.format(
            index=sample.index,
            id=html.escape(sample.id),
            question=_text(sample.question),
            options=_text(", ".join(sample.options or [])) or "none (open question)",
            answer=_text(sample.answer or "none"),
            box=_box_text(sample.bbox)
            or (f"{_box_text(sample.hidden_bbox)} hidden" if sample.hidden_bbox else strings.PREVIEW_NO_BOX),
        )
        for sample in page.items
    ]
    header = strings.PREVIEW_HEADER.format(
        name=html.escape(render.dataset_label(dataset_id, names)),
        first=0,
        last=max(0, len(page.items) - 1),
        total=page.total,
    )
    return gallery, "\n".join([header, "", *rows])


# ----------------------------------------------------------------------------- layout and wiring
@dataclass
class DatasetsTab:
    changed: gr.State  # the id of a dataset just uploaded or made: other tabs refresh their lists on its change
    refresh: Any
    refresh_inputs: list[Any]
    refresh_outputs: list[Any]
    first_preview: Any  # previews the chosen dataset when nothing is previewed yet (on opening the tab)
    first_preview_inputs: list[Any]
    first_preview_outputs: list[Any]


def build_datasets_tab(ctx: UiContext) -> DatasetsTab:
    gr.Markdown(strings.DATASETS_INTRO)
    changed = gr.State(None)
    with gr.Row(equal_height=False):
        with gr.Column(min_width=300):
            gr.Markdown(strings.UPLOAD_TITLE)
            files = gr.File(
                label=strings.UPLOAD_FILES_LABEL,
                file_count="multiple",
                file_types=[*DATA_SUFFIXES, *IMAGE_SUFFIXES],
                type="filepath",
                elem_id="datasets-file",
            )
            upload_name = gr.Textbox(label=strings.UPLOAD_NAME_LABEL, max_length=200, elem_id="datasets-upload-name")
            upload_button = gr.Button(strings.UPLOAD_BUTTON, variant="primary", elem_id="datasets-upload")
        with gr.Column(min_width=300):
            gr.Markdown(strings.SYNTH_TITLE)
            with gr.Row():
                synth_n = gr.Number(
                    value=64, label=strings.SYNTH_N_LABEL, precision=0, min_width=120, elem_id="datasets-synth-n"
                )
                synth_seed = gr.Number(
                    value=0, label=strings.SYNTH_SEED_LABEL, precision=0, min_width=120, elem_id="datasets-synth-seed"
                )
            synth_world = gr.Radio(
                [strings.SYNTH_WITH_BOX, strings.SYNTH_NO_BOX],
                value=strings.SYNTH_WITH_BOX,
                label=strings.SYNTH_WORLD_LABEL,
                elem_id="datasets-synth-world",
            )
            synth_name = gr.Textbox(label=strings.SYNTH_NAME_LABEL, max_length=200, elem_id="datasets-synth-name")
            synth_button = gr.Button(strings.SYNTH_BUTTON, variant="primary", elem_id="datasets-synth")
            gr.Markdown(strings.SYNTH_HELP)
    status = gr.Markdown(elem_id="datasets-status")
    table = gr.Dataframe(
        headers=strings.DATASET_TABLE_COLUMNS,
        interactive=False,
        wrap=True,
        elem_id="datasets-table",
    )
    gr.Markdown(strings.PREVIEW_TITLE)
    with gr.Row(equal_height=False):
        preview_dataset = gr.Dropdown(
            label=strings.PREVIEW_DATASET_LABEL, choices=[], scale=3, min_width=220, elem_id="datasets-preview-dataset"
        )
        preview_button = gr.Button(strings.PREVIEW_BUTTON, scale=1, min_width=140, elem_id="datasets-preview")
    gr.Markdown(strings.PREVIEW_NOTE)
    gallery = gr.Gallery(
        label=strings.PREVIEW_GALLERY_LABEL,
        show_label=False,
        columns=3,
        object_fit="contain",
        height="auto",
        allow_preview=True,
        elem_id="datasets-gallery",
    )
    details = gr.Markdown(elem_id="datasets-preview-text")

    @readable_errors
    def refresh(request: gr.Request, current: str | None, selected: str | None) -> tuple[Any, Any]:
        """The table and the preview list; a dataset just made (``selected``) becomes the one previewed."""
        datasets = ctx.client(request).datasets()
        wanted = selected if selected in {d.id for d in datasets} else current
        return dataset_table(datasets), choices_update(dataset_choices(datasets), wanted)

    @readable_errors
    def on_preview(request: gr.Request, dataset_id: str | None) -> tuple[Any, str]:
        client = ctx.client(request)
        return preview(client, dataset_id, client.dataset_names())

    def on_first_preview(request: gr.Request, dataset_id: str | None, shown: str | None) -> tuple[Any, Any]:
        """On opening the tab: show the chosen set's first samples unless a preview is already up."""
        if shown or not dataset_id:
            return gr.skip(), gr.skip()
        try:
            return on_preview(request, dataset_id)
        except gr.Error:  # the user asked for nothing: no toast
            return gr.skip(), gr.skip()

    def on_row(event: gr.SelectData) -> Any:
        """A row of the table picks that dataset for the preview (its id is the last cell)."""
        row = event.row_value or []
        return row[-1] if row else gr.skip()

    @readable_errors
    def on_upload(request: gr.Request, picked: Any, name: str | None) -> tuple[Any, ...]:
        with tempfile.TemporaryDirectory(prefix="vopd-ui-upload-") as scratch:
            dataset, message = upload(ctx.client(request), picked, name, Path(scratch))
        if dataset is None:
            return message, gr.skip(), gr.skip(), gr.skip()
        return message, dataset.id, None, ""

    @readable_errors
    def on_synth(request: gr.Request, n: Any, seed: Any, world: str, name: str | None) -> tuple[Any, ...]:
        dataset, message = make_synthetic(ctx.client(request), n, seed, world, name)
        return message, dataset.id, ""

    refresh_inputs = [preview_dataset, changed]
    refresh_outputs = [table, preview_dataset]
    upload_button.click(on_upload, [files, upload_name], [status, changed, files, upload_name])
    synth_button.click(on_synth, [synth_n, synth_seed, synth_world, synth_name], [status, changed, synth_name])
    # A new dataset (ids are never reused, so every one is a change): list it, select it and show its first samples.
    changed.change(refresh, refresh_inputs, refresh_outputs).success(on_preview, preview_dataset, [gallery, details])
    preview_button.click(on_preview, preview_dataset, [gallery, details])
    preview_dataset.input(on_preview, preview_dataset, [gallery, details])
    table.select(on_row, None, preview_dataset).then(on_preview, preview_dataset, [gallery, details])
    return DatasetsTab(
        changed=changed,
        refresh=refresh,
        refresh_inputs=refresh_inputs,
        refresh_outputs=refresh_outputs,
        first_preview=on_first_preview,
        first_preview_inputs=[preview_dataset, details],
        first_preview_outputs=[gallery, details],
    )
