"""/api/inspect: per-token student (full image) vs teacher (crop) distributions for one image and question."""

from __future__ import annotations

import base64
import binascii

from fastapi import APIRouter, HTTPException, Request, status
from PIL import Image

from app.deps import ApiKeyDep, SessionDep, SettingsDep
from app.registry import UnknownName, resolve_model, visible_dataset
from app.schemas import InspectRequest
from vopd.config import InspectConfig
from vopd.data import decode_image, load_dataset
from vopd.inspect import InspectResult, inspect_sample

router = APIRouter(prefix="/api", tags=["inspect"])

_SOURCE_FIELDS = {"image_base64", "dataset", "sample"}
MAX_IMAGE_BYTES = 32 * 1024 * 1024


def _unprocessable(field: str, message: str) -> HTTPException:
    return HTTPException(
        status.HTTP_422_UNPROCESSABLE_CONTENT, [{"loc": ["body", field], "msg": message, "type": "value_error"}]
    )


def _image_and_defaults(body: InspectRequest, session: SessionDep, owner_id: int) -> tuple[Image.Image, dict]:
    """The image to inspect and the sample's question/options/bbox to fall back on."""
    if (body.image_base64 is None) == (body.dataset is None):
        raise _unprocessable("image_base64", "give either image_base64 or dataset + sample")
    if body.image_base64 is not None:
        encoded = body.image_base64.split(",", 1)[1] if body.image_base64.startswith("data:") else body.image_base64
        if len(encoded) > MAX_IMAGE_BYTES * 4 // 3:
            raise _unprocessable("image_base64", "image larger than 32 MB")
        try:
            return decode_image(base64.b64decode(encoded, validate=True)), {}
        except (binascii.Error, ValueError) as error:
            raise _unprocessable("image_base64", f"not a readable base64 image: {error}") from error
    dataset = visible_dataset(session, owner_id, body.dataset or "")
    if dataset is None:
        raise _unprocessable("dataset", f"unknown dataset {body.dataset!r}; GET /api/datasets lists ids")
    index = body.sample if body.sample is not None else 0
    if index >= dataset.n_samples:
        raise _unprocessable("sample", f"dataset {dataset.id} has {dataset.n_samples} samples; got index {index}")
    sample = load_dataset(dataset.path, check_images=False, limit=index + 1)[index]
    defaults = {"question": sample.question, "options": sample.options, "bbox": sample.bbox}
    return sample.load_image(), defaults


@router.post("/inspect", response_model=InspectResult)
def inspect(body: InspectRequest, request: Request, session: SessionDep, settings: SettingsDep, key: ApiKeyDep):
    """Send the image as ``image_base64`` (the file's bytes, base64) or pick ``dataset`` + ``sample``; question,
    options and bbox default to the sample's. ``model`` is a name from GET /api/models."""
    image, defaults = _image_and_defaults(body, session, key.id)
    try:
        path = resolve_model(session, settings, key.id, body.model)
    except UnknownName as error:
        raise _unprocessable("model", str(error)) from error
    session.close()  # inference may take a while: give the connection back first
    values = body.model_dump(exclude=_SOURCE_FIELDS)
    for field in ("question", "options", "bbox"):  # the sample's own, unless the request overrides them
        if values[field] is None:
            values[field] = defaults.get(field)
    values = {field: value for field, value in values.items() if value is not None} | {"model": str(path)}
    try:
        config = InspectConfig.model_validate(values)
    except ValueError as error:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(error)) from error
    cache = request.app.state.model_cache
    try:
        with cache.inference_lock:
            result = inspect_sample(config, image, loaded=cache.get(path, config.runtime))
    except ValueError as error:  # e.g. a box outside the image
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(error)) from error
    return result.model_copy(update={"model": body.model})
