"""/api/models: every name usable as config.model."""

from __future__ import annotations

from fastapi import APIRouter

from app.deps import ApiKeyDep, SessionDep, SettingsDep
from app.registry import list_models
from app.schemas import ModelList

router = APIRouter(prefix="/api/models", tags=["models"])


@router.get("", response_model=ModelList)
def get_models(session: SessionDep, settings: SettingsDep, key: ApiKeyDep) -> ModelList:
    """Base models under VOPD_HOME/models (the tiny model among them), then your succeeded jobs' final models
    (``job-<id>/final``) and the checkpoints still on disk (``job-<id>/step-<n>``)."""
    return ModelList(items=list_models(session, settings, key.id))
