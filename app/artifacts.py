"""What a job produced, as a list clients can download: files as they are, folders as zip archives.

Checkpoints come from the ``checkpoints`` table, the rest from ``artifacts``; the trainer prunes old checkpoint
folders, so only entries whose path still exists are listed.
"""

from __future__ import annotations

import os
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.schemas import ArtifactOut
from app.tables import Artifact, Checkpoint, Job
from vopd.trackers import MLFLOW_DIR, TENSORBOARD_DIR

# Tracker logs the trainer writes into the run folder (TrainConfig.report_to): listed when present, as folders.
TRACKER_FOLDERS = ((TENSORBOARD_DIR, "tensorboard"), (MLFLOW_DIR, "mlflow"))


@dataclass
class ArtifactEntry:
    out: ArtifactOut
    path: Path


class ArtifactUnavailable(Exception):
    """A folder artifact that cannot be packed (no writable place for its archive, an unreadable file): the message
    says why, without server paths."""


def folder_size(path: Path) -> int:
    """Bytes under ``path``; what cannot be read counts as nothing rather than failing a listing."""
    try:
        if path.is_file():
            return path.stat().st_size
        return sum(child.stat().st_size for child in path.rglob("*") if child.is_file())
    except OSError:
        return 0


def job_artifacts(session: Session, job: Job) -> list[ArtifactEntry]:
    entries: list[ArtifactEntry] = []
    for row in session.scalars(select(Artifact).where(Artifact.job_id == job.id).order_by(Artifact.id)):
        path = Path(row.path)
        if not path.exists():
            continue
        model_name = f"job-{job.id}/final" if row.kind == "model" else None
        out = ArtifactOut(
            name=row.name, kind=row.kind, is_folder=path.is_dir(), size_bytes=row.size_bytes, model_name=model_name
        )
        entries.append(ArtifactEntry(out, path))
    if job.kind == "train" and job.output_dir:
        for folder_name, kind in TRACKER_FOLDERS:
            path = Path(job.output_dir) / folder_name
            if path.is_dir() and any(path.iterdir()):
                out = ArtifactOut(name=folder_name, kind=kind, is_folder=True, size_bytes=folder_size(path))
                entries.append(ArtifactEntry(out, path))
    for row in session.scalars(select(Checkpoint).where(Checkpoint.job_id == job.id).order_by(Checkpoint.step)):
        path = Path(row.path)
        if not path.is_dir():
            continue
        out = ArtifactOut(
            name=f"checkpoints/step-{row.step}",
            kind="checkpoint",
            is_folder=True,
            size_bytes=folder_size(path),
            step=row.step,
            model_name=f"job-{job.id}/step-{row.step}",
        )
        entries.append(ArtifactEntry(out, path))
    return entries


def _newest_mtime(folder: Path) -> float:
    return max((child.stat().st_mtime for child in folder.rglob("*")), default=folder.stat().st_mtime)


def folder_archive(folder: Path, cache_dir: Path, name: str) -> Path:
    """A zip of ``folder``'s contents (at the archive's root), built once and reused while the folder is unchanged.

    Stored without compression: weights do not compress, and a multi-GB model zips at disk speed. Built in a
    temporary file and renamed, so a concurrent download never sees half an archive.
    """
    cache_dir.mkdir(parents=True, exist_ok=True)
    archive = cache_dir / (name.replace("/", "__") + ".zip")
    if archive.exists() and archive.stat().st_mtime >= _newest_mtime(folder):
        return archive
    handle, temp_name = tempfile.mkstemp(prefix=".partial-", suffix=".zip", dir=cache_dir)
    os.close(handle)
    try:
        with zipfile.ZipFile(temp_name, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            for child in sorted(folder.rglob("*")):
                if child.is_file():
                    zf.write(child, child.relative_to(folder).as_posix())
        os.replace(temp_name, archive)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise
    return archive


def pack_folder(folder: Path, cache_dirs: list[Path], name: str) -> Path:
    """``folder_archive`` in the first of ``cache_dirs`` where it can be built: the job's own folder may be read-only
    (a finished run copied from elsewhere, a volume mounted read-only), so a server-wide scratch folder follows it."""
    reason = "no place to build it"
    for cache_dir in cache_dirs:
        try:
            return folder_archive(folder, cache_dir, name)
        except OSError as error:  # PermissionError, a full disk, an unreadable file inside the folder
            reason = error.strerror or type(error).__name__
    raise ArtifactUnavailable(f"artifact {name!r} could not be packed as a zip archive: {reason.lower()}")
