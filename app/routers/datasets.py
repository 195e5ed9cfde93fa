"""/api/datasets: upload (validated by vopd.data, every problem listed per line), a synthetic set built on the
server, list, detail, samples."""

from __future__ import annotations

import base64
import io
import secrets
import shutil
import tempfile
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, File, Form, HTTPException, Query, Request, UploadFile, status
from fastapi import Path as PathParam
from fastapi.responses import JSONResponse, Response
from PIL import Image
from sqlalchemy import or_, select

from app.artifacts import folder_size
from app.crud import storage_used
from app.deps import ApiKeyDep, SessionDep, SettingsDep
from app.paths import public_text
from app.registry import visible_dataset
from app.responses import ErrorOut, errors
from app.schemas import (
    DatasetIssueOut,
    DatasetList,
    DatasetOut,
    DatasetRejected,
    SampleOut,
    SamplePage,
    SyntheticDatasetCreate,
)
from app.tables import Dataset
from app.uploads import MB, UploadRejected, quota_message, save_stream, unpack_upload
from vopd.config import ViewConfig
from vopd.data import Sample, load_dataset, validate_dataset
from vopd.synth import SynthConfig, generate_dataset
from vopd.views import student_view, teacher_view, uses_search

router = APIRouter(prefix="/api/datasets", tags=["datasets"])

# What one synthetic item holds on disk (its PNG and its line), a little over what the default world measured: 115 MB
# for 4,800 items, 42 MB for 2,000.
# Used to refuse a set over the quota before drawing it; the built set is measured and checked again.
SYNTH_BYTES_PER_ITEM = 24_000


def upload_name(name: str | None, filename: str) -> str:
    """The name shown for an upload: the one given, else the file's name without its suffix (never blank)."""
    given = (name or "").strip()
    return given or Path(filename).stem.strip() or "upload"


def dataset_out(dataset: Dataset) -> DatasetOut:
    return DatasetOut(
        id=dataset.id,
        name=dataset.name,
        n_samples=dataset.n_samples,
        size_bytes=dataset.size_bytes,
        shared=dataset.owner_id is None,
        created_at=dataset.created_at,
    )


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=DatasetOut,
    responses={422: {"model": DatasetRejected, "description": "The dataset does not load; every issue is listed."}},
)
def upload_dataset(
    request: Request,
    file: Annotated[UploadFile, File(description="A .zip (data.jsonl + images) or a .jsonl with base64 images.")],
    session: SessionDep,
    settings: SettingsDep,
    key: ApiKeyDep,
    name: Annotated[str | None, Form(max_length=200)] = None,
) -> DatasetOut | JSONResponse:
    max_bytes = int(settings.max_upload_mb * MB)
    declared = int(request.headers.get("content-length") or 0)
    if declared > max_bytes + MB:  # multipart framing adds a little
        raise HTTPException(status.HTTP_413_CONTENT_TOO_LARGE, f"upload larger than {settings.max_upload_mb:g} MB")
    used = storage_used(session, key.id)
    quota_left = int(settings.user_quota_mb * MB) - used
    if declared > quota_left + MB:  # refused before a byte is stored
        raise HTTPException(status.HTTP_413_CONTENT_TOO_LARGE, quota_message(settings, used, declared))
    filename = file.filename or "upload"
    home = settings.home
    dataset_id = "ds-" + secrets.token_hex(5)
    target = settings.datasets_dir / dataset_id
    try:
        with tempfile.TemporaryDirectory(dir=settings.home / "tmp") as scratch:
            saved = Path(scratch) / "upload"
            size = save_stream(file.file, saved, max_bytes)
            if size > quota_left:
                raise UploadRejected(quota_message(settings, used, size), status.HTTP_413_CONTENT_TOO_LARGE)
            data_file = unpack_upload(saved, filename, target, settings, quota_left)
        issues = validate_dataset(data_file)
        if issues:
            shutil.rmtree(target, ignore_errors=True)
            rejected = DatasetRejected(
                detail=f"{len(issues)} problem(s) in the dataset; nothing was stored",
                issues=[
                    DatasetIssueOut(**issue.model_dump(exclude={"message"}), message=public_text(issue.message, home))
                    for issue in issues
                ],
            )
            return JSONResponse(rejected.model_dump(), status_code=status.HTTP_422_UNPROCESSABLE_CONTENT)
        n_samples = len(load_dataset(data_file, check_images=False))
        size = folder_size(target)  # what it holds on disk, unpacked: the figure the quota counts
    except UploadRejected as error:
        shutil.rmtree(target, ignore_errors=True)
        raise HTTPException(error.status_code, public_text(str(error), home)) from error
    except BaseException:
        shutil.rmtree(target, ignore_errors=True)
        raise
    dataset = Dataset(
        id=dataset_id,
        owner_id=key.id,
        name=upload_name(name, filename),
        path=str(data_file),
        n_samples=n_samples,
        size_bytes=size,
    )
    session.add(dataset)
    session.commit()
    return dataset_out(dataset)


@router.post(
    "/synthetic",
    status_code=status.HTTP_201_CREATED,
    response_model=DatasetOut,
    responses={422: {"model": ErrorOut, "description": "A field is out of range; the detail says which and why."}},
)
def create_synthetic_dataset(
    body: SyntheticDatasetCreate, session: SessionDep, settings: SettingsDep, key: ApiKeyDep
) -> DatasetOut:
    """Build a synthetic fine-detail set (``vopd synth --n N --seed S [--no-box]``) and register it as yours, named.

    It is built within the request, so its size is capped (VOPD_MAX_SYNTH_ITEMS, 2,000 by default: 11 s on a busy
    2-core machine); the same seed gives the same items, so a set made here equals the CLI's."""
    if body.n > settings.max_synth_items:
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT,
            f"n: at most {settings.max_synth_items:,} items are built on request (VOPD_MAX_SYNTH_ITEMS), got "
            f"{body.n:,}; build a larger set with `vopd synth` and upload it",
        )
    used = storage_used(session, key.id)
    quota_left = int(settings.user_quota_mb * MB) - used
    if body.n * SYNTH_BYTES_PER_ITEM > quota_left:
        raise HTTPException(
            status.HTTP_413_CONTENT_TOO_LARGE, quota_message(settings, used, body.n * SYNTH_BYTES_PER_ITEM)
        )
    dataset_id = "ds-" + secrets.token_hex(5)
    target = settings.datasets_dir / dataset_id
    try:
        data_file = generate_dataset(target, SynthConfig(n=body.n, seed=body.seed, no_box=not body.box))
        size = folder_size(target)
        if size > quota_left:
            raise UploadRejected(quota_message(settings, used, size), status.HTTP_413_CONTENT_TOO_LARGE)
    except UploadRejected as error:
        shutil.rmtree(target, ignore_errors=True)
        raise HTTPException(error.status_code, str(error)) from error
    except BaseException:
        shutil.rmtree(target, ignore_errors=True)
        raise
    world = "box" if body.box else "no box"
    default_name = f"Synthetic set ({body.n:,} items, seed {body.seed}, {world})"
    dataset = Dataset(
        id=dataset_id,
        owner_id=key.id,
        name=(body.name or "").strip() or default_name,
        path=str(data_file),
        n_samples=body.n,
        size_bytes=size,
    )
    session.add(dataset)
    session.commit()
    return dataset_out(dataset)


@router.get("", response_model=DatasetList)
def list_datasets(session: SessionDep, key: ApiKeyDep) -> DatasetList:
    """Your datasets and the shared built-in ones; each id is usable as config.dataset."""
    rows = session.scalars(
        select(Dataset).where(or_(Dataset.owner_id == key.id, Dataset.owner_id.is_(None))).order_by(Dataset.created_at)
    )
    return DatasetList(items=[dataset_out(row) for row in rows])


def _dataset_or_404(session: SessionDep, owner_id: int, dataset_id: str) -> Dataset:
    dataset = visible_dataset(session, owner_id, dataset_id)
    if dataset is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"dataset {dataset_id!r} not found")
    return dataset


@router.get("/{dataset_id}", response_model=DatasetOut, responses=errors(404))
def get_dataset(dataset_id: str, session: SessionDep, key: ApiKeyDep) -> DatasetOut:
    return dataset_out(_dataset_or_404(session, key.id, dataset_id))


def _data_url(image: Image.Image, side: int) -> str:
    thumbnail = image.convert("RGB")
    thumbnail.thumbnail((side, side))
    buffer = io.BytesIO()
    thumbnail.save(buffer, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _png_data_url(image: Image.Image) -> str:
    """Lossless and unscaled: box coordinates drawn on it are the sample's own."""
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _image_size(sample: Sample) -> tuple[int, int]:
    """The sample's own image size, read from its header (the views may have scaled it): a thumbnail's scale."""
    source = sample.image_path if sample.image_path is not None else io.BytesIO(sample.image_bytes or b"")
    with Image.open(source) as image:
        return image.size


@router.get("/{dataset_id}/samples", response_model=SamplePage, responses=errors(404))
def list_samples(
    dataset_id: str,
    session: SessionDep,
    key: ApiKeyDep,
    offset: Annotated[int, Query(ge=0, le=2**31 - 1)] = 0,
    limit: Annotated[int, Query(ge=1, le=50)] = 8,
    thumbnail: Annotated[int, Query(ge=32, le=512, description="Longest side of each thumbnail in px.")] = 224,
    original: Annotated[
        bool, Query(description="Also each sample's own image at its original size (PNG), e.g. to draw a box on.")
    ] = False,
) -> SamplePage:
    """Samples with what each model sees: the student's full image (red box) and the teacher's crop."""
    dataset = _dataset_or_404(session, key.id, dataset_id)
    samples = load_dataset(dataset.path, check_images=False, limit=offset + limit)[offset:]
    views = ViewConfig()
    items = []
    for index, sample in enumerate(samples, start=offset):
        searched = uses_search(sample, views)
        student = student_view(sample, views)
        # A sample without a box has no crop until a model searches for one (at training time, vopd.evidence): its
        # teacher thumbnail is the whole image that search covers.
        teacher = student if searched else teacher_view(sample, views)
        size = _image_size(sample)
        items.append(
            SampleOut(
                index=index,
                id=sample.id,
                question=sample.question,
                options=sample.options,
                answer=sample.answer,
                bbox=sample.bbox,
                hidden_bbox=sample.hidden_bbox,
                width=size[0],
                height=size[1],
                student_text=student.text,
                teacher_text=teacher.text,
                student_image=_data_url(student.image, thumbnail),
                teacher_image=_data_url(teacher.image, thumbnail),
                image=_png_data_url(sample.load_image()) if original else None,
                evidence="search" if searched else "box",
            )
        )
    return SamplePage(items=items, total=dataset.n_samples, offset=offset, limit=limit)


@router.get(
    "/{dataset_id}/samples/{index}/image",
    response_class=Response,
    responses={200: {"content": {"image/png": {}}}, **errors(404)},
)
def sample_image(
    dataset_id: str, index: Annotated[int, PathParam(ge=0, le=2**31 - 1)], session: SessionDep, key: ApiKeyDep
) -> Response:
    """A sample's own image as PNG, unchanged (no box drawn): what an OpenAI-compatible chat request may name as its
    ``image_url`` on this server."""
    dataset = _dataset_or_404(session, key.id, dataset_id)
    if index >= dataset.n_samples:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"dataset {dataset_id!r} has {dataset.n_samples} samples")
    sample = load_dataset(dataset.path, check_images=False, limit=index + 1)[index]
    buffer = io.BytesIO()
    sample.load_image().save(buffer, format="PNG")
    return Response(buffer.getvalue(), media_type="image/png")
