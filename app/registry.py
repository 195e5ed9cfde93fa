"""Names a client may use as ``config.model`` / ``config.dataset``, and the paths they stand for.

The API resolves names before a job is queued, so a typo is a 422 at submission rather than a failed job
minutes later, and the worker runs exactly the paths stored in the job's ``resolved_config``.
"""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.schemas import ModelOut
from app.settings import Settings
from app.tables import Checkpoint, Dataset, Job

# The names' grammar and the on-disk layout live in the library (vopd.home), shared with the CLI, which resolves the
# same names through VOPD_HOME without a database; this module adds the database and each key's ownership.
from vopd.home import (
    JOB_MODEL_NAME,
    RUN_MODEL_NAME,
    is_model_folder,
    parse_job_model_name,
    run_model_folder,
    run_models,
)
from vopd.home import base_model_names as _base_model_names
from vopd.home import runs_dir as _runs_dir

__all__ = [
    "JOB_MODEL_NAME",
    "UnknownName",
    "base_model_names",
    "is_model_folder",
    "list_models",
    "parse_job_model_name",
    "resolve_dataset",
    "resolve_model",
    "visible_dataset",
]


class UnknownName(ValueError):
    """A model or dataset name that does not resolve; the message tells where to find valid names."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def base_model_names(settings: Settings) -> list[str]:
    """Model folders directly under VOPD_HOME/models, or one level deeper (``org/name``)."""
    return _base_model_names(settings.models_dir)


def list_models(session: Session, settings: Settings, owner_id: int) -> list[ModelOut]:
    """Base models, then the models of CLI runs under VOPD_HOME/runs (on disk, like the base models, so every key
    sees them), then the caller's own jobs' final models and checkpoints."""
    models = [ModelOut(name=name, kind="base") for name in base_model_names(settings)]
    models.extend(ModelOut(name=name, kind="run", step=step) for name, step in run_models(settings.home))
    finals = session.scalars(
        select(Job).where(Job.owner_id == owner_id, Job.kind == "train", Job.status == "succeeded").order_by(Job.id)
    )
    for job in finals:
        if is_model_folder(Path(job.output_dir) / "final"):
            models.append(ModelOut(name=f"job-{job.id}/final", kind="final", job_id=job.id))
    checkpoints = session.execute(
        select(Checkpoint.job_id, Checkpoint.step, Checkpoint.path)
        .join(Job, Job.id == Checkpoint.job_id)
        .where(Job.owner_id == owner_id)
        .order_by(Checkpoint.job_id, Checkpoint.step)
    )
    for job_id, step, path in checkpoints:
        if is_model_folder(Path(path)):
            models.append(ModelOut(name=f"job-{job_id}/step-{step}", kind="checkpoint", job_id=job_id, step=step))
    return models


def _inside(path: Path, root: Path) -> bool:
    return path.resolve().is_relative_to(root.resolve())


def resolve_model(session: Session, settings: Settings, owner_id: int, name: str) -> Path:
    """The folder behind a model name from GET /api/models (or an absolute path inside VOPD_HOME/models)."""
    hint = "GET /api/models lists the names usable as config.model"
    match = JOB_MODEL_NAME.match(name)
    if match:
        job = session.get(Job, int(match.group(1)))
        if job is None or job.owner_id != owner_id or job.kind != "train":
            raise UnknownName("model", f"no training job {match.group(1)} of yours; {hint}")
        if match.group(3) is None:
            folder = Path(job.output_dir) / "final"
            if job.status != "succeeded" or not is_model_folder(folder):
                raise UnknownName("model", f"job {job.id} has no final model (status {job.status}); {hint}")
            return folder
        checkpoint = session.scalar(
            select(Checkpoint).where(Checkpoint.job_id == job.id, Checkpoint.step == int(match.group(3)))
        )
        if checkpoint is None or not is_model_folder(Path(checkpoint.path)):
            raise UnknownName("model", f"job {job.id} has no checkpoint at step {match.group(3)} (pruned?); {hint}")
        return Path(checkpoint.path)
    if RUN_MODEL_NAME.match(name):
        folder = run_model_folder(settings.home, name)
        if folder is None:
            raise UnknownName("model", f"no model at {name} in VOPD_HOME (a run's final/ or checkpoint); {hint}")
        return folder
    candidate = Path(name)
    runs = _runs_dir(settings.home)
    if candidate.is_absolute():
        # A model given by path: a base model's folder, or a CLI run's (final or checkpoint) under VOPD_HOME/runs.
        if _inside(candidate, runs) and is_model_folder(candidate):
            return candidate
        if not _inside(candidate, settings.models_dir):
            raise UnknownName("model", f"absolute model paths must lie inside {settings.models_dir} or {runs}; {hint}")
    else:
        if ".." in candidate.parts:
            raise UnknownName("model", f"model name {name!r} must not contain '..'; {hint}")
        candidate = settings.models_dir / candidate
    if not is_model_folder(candidate) or not _inside(candidate, settings.models_dir):
        raise UnknownName("model", f"unknown model {name!r}; {hint}")
    return candidate


def visible_dataset(session: Session, owner_id: int, dataset_id: str) -> Dataset | None:
    """The dataset if it is the caller's own or shared (owner NULL); others' datasets do not exist for them."""
    dataset = session.get(Dataset, dataset_id)
    if dataset is None or (dataset.owner_id is not None and dataset.owner_id != owner_id):
        return None
    return dataset


def resolve_dataset(session: Session, owner_id: int, dataset_id: str) -> Path:
    dataset = visible_dataset(session, owner_id, dataset_id)
    if dataset is None:
        raise UnknownName(
            "dataset", f"unknown dataset {dataset_id!r}; GET /api/datasets lists the ids usable as config.dataset"
        )
    return Path(dataset.path)
