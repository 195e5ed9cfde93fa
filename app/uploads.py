"""Receiving a dataset upload safely: size limits while streaming, a per-key storage quota, and zip extraction
that refuses path traversal (zip slip), links, too many entries and zip bombs. Every entry is checked from the
archive's headers *before* anything is written (total declared size, per-entry and whole-archive compression
ratio), and sizes are counted again while extracting, in case the headers lie."""

from __future__ import annotations

import shutil
import stat
import zipfile
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from app.settings import Settings

CHUNK = 1 << 20
MB = 1 << 20
# Entries smaller than this may compress arbitrarily well (a blank PNG) without being a bomb.
RATIO_FLOOR_BYTES = 1 * MB


class UploadRejected(ValueError):
    """An upload refused before validation; ``status_code`` is 413 for size limits, 422 otherwise."""

    def __init__(self, message: str, status_code: int = 422) -> None:
        super().__init__(message)
        self.status_code = status_code


def save_stream(source: BinaryIO, target: Path, max_bytes: int) -> int:
    """Copy the request body to disk, stopping as soon as it exceeds the limit."""
    written = 0
    with target.open("wb") as out:
        while chunk := source.read(CHUNK):
            written += len(chunk)
            if written > max_bytes:
                raise UploadRejected(f"upload larger than the limit of {max_bytes // MB} MB", 413)
            out.write(chunk)
    return written


def _safe_member_path(name: str) -> PurePosixPath:
    path = PurePosixPath(name.replace("\\", "/"))
    if path.is_absolute() or ".." in path.parts or (path.parts and ":" in path.parts[0]):
        raise UploadRejected(f"zip entry {name!r} points outside the dataset folder")
    return path


def quota_message(settings: Settings, used: int, adding: int) -> str:
    return (
        f"over your storage quota: {used / MB:.1f} MB used + {adding / MB:.1f} MB for this upload > "
        f"{settings.user_quota_mb:g} MB (VOPD_USER_QUOTA_MB); delete datasets or ask for a larger quota"
    )


def extract_zip(archive: Path, target: Path, settings: Settings, quota_left: int | None = None) -> None:
    """Refuse from the headers before writing a byte, then extract with sizes counted against the same limits."""
    max_total = int(settings.max_unzipped_mb * MB)
    with zipfile.ZipFile(archive) as zf:
        members = zf.infolist()
        if len(members) > settings.max_zip_entries:
            raise UploadRejected(f"zip holds {len(members)} entries, more than the limit of {settings.max_zip_entries}")
        declared = sum(member.file_size for member in members)
        if declared > max_total:
            raise UploadRejected(
                f"zip expands to {declared // MB} MB, over the limit of {max_total // MB} MB (VOPD_MAX_UNZIPPED_MB)",
                413,
            )
        if quota_left is not None and declared > quota_left:
            raise UploadRejected(quota_message(settings, int(settings.user_quota_mb * MB) - quota_left, declared), 413)
        files: list[tuple[zipfile.ZipInfo, PurePosixPath]] = []
        for member in members:
            relative = _safe_member_path(member.filename)
            if stat.S_ISLNK(member.external_attr >> 16):
                raise UploadRejected(f"zip entry {member.filename!r} is a symbolic link")
            if member.is_dir() or not relative.parts:
                continue
            if member.file_size > RATIO_FLOOR_BYTES and member.file_size > settings.max_zip_ratio * max(
                member.compress_size, 1
            ):
                raise UploadRejected(f"zip entry {member.filename!r} has a suspicious compression ratio (zip bomb?)")
            files.append((member, relative))
        # Many small entries each under the per-entry floor (1024 x 1 MiB of zeros) are a bomb as a whole.
        if declared > RATIO_FLOOR_BYTES and declared > settings.max_zip_ratio * max(archive.stat().st_size, 1):
            raise UploadRejected(
                f"zip expands {declared / max(archive.stat().st_size, 1):.0f} times its size: a suspicious compression "
                f"ratio (zip bomb?), over VOPD_MAX_ZIP_RATIO = {settings.max_zip_ratio:g}"
            )
        cap = max_total if quota_left is None else min(max_total, quota_left)
        written_total = 0
        for member, relative in files:
            destination = target.joinpath(*relative.parts)
            destination.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(member) as source, destination.open("wb") as out:
                entry_written = 0
                while chunk := source.read(CHUNK):
                    entry_written += len(chunk)
                    written_total += len(chunk)
                    if entry_written > member.file_size or written_total > cap:
                        raise UploadRejected("zip entry sizes do not match their headers (zip bomb?)", 413)
                    out.write(chunk)


def find_data_file(folder: Path) -> Path:
    """data.jsonl at the root, or inside a single top-level folder (zipping a folder yields that layout); else the
    only JSONL or Parquet file at the root; else the Parquet files of a published dataset's folder (a Hugging Face
    dataset repository keeps them as ``data/train-00000-of-00002.parquet``...): one is used where it lies (image
    paths in it stay relative to it), several are joined into one ``data.parquet`` beside them."""
    candidates = [folder / "data.jsonl"]
    children = [child for child in folder.iterdir() if not child.name.startswith(("__MACOSX", "."))]
    if len(children) == 1 and children[0].is_dir():
        candidates.append(children[0] / "data.jsonl")
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    roots = [path for path in folder.glob("*.jsonl")] + [path for path in folder.glob("*.parquet")]
    if len(roots) == 1:
        return roots[0]
    shards = sorted(
        path
        for path in folder.rglob("*.parquet")
        if not any(part.startswith(("__MACOSX", ".")) for part in path.relative_to(folder).parts)
    )
    if not roots and shards:
        same_folder = len({shard.parent for shard in shards}) == 1
        return join_parquet_shards(shards, (shards[0].parent if same_folder else folder) / "data.parquet")
    raise UploadRejected(
        "the zip must hold data.jsonl (one sample per line) next to the images it references, or the Parquet "
        "file(s) of a dataset in the official layout"
    )


def join_parquet_shards(shards: list[Path], target: Path) -> Path:
    """One Parquet file from a dataset's shards (a single shard is itself); a shard that does not read, or whose
    columns do not match the others', is refused with its name."""
    if len(shards) == 1:
        return shards[0]
    import pyarrow as pa
    import pyarrow.parquet as pq

    tables = []
    for shard in shards:
        try:
            tables.append(pq.read_table(shard))
        except Exception as error:  # pyarrow raises ArrowInvalid / OSError on a damaged file
            raise UploadRejected(f"unreadable Parquet shard {shard.name!r} ({error})") from error
    try:
        joined = pa.concat_tables(tables, promote_options="default")
    except (pa.ArrowInvalid, pa.ArrowTypeError) as error:
        raise UploadRejected(f"the Parquet shards do not share their columns ({error})") from error
    pq.write_table(joined, target)
    for shard in shards:
        shard.unlink()
    return target


def unpack_upload(upload: Path, filename: str, target: Path, settings: Settings, quota_left: int | None = None) -> Path:
    """Turn the saved upload into a dataset folder; return its data file."""
    target.mkdir(parents=True, exist_ok=True)
    if zipfile.is_zipfile(upload):
        try:
            extract_zip(upload, target, settings, quota_left)
        except zipfile.BadZipFile as error:
            raise UploadRejected(f"corrupt zip: {error}") from error
        return find_data_file(target)
    suffix = Path(filename).suffix.lower()
    if suffix in (".jsonl", ".json", ".parquet"):
        data_file = target / ("data.parquet" if suffix == ".parquet" else "data.jsonl")
        shutil.move(upload, data_file)
        return data_file
    raise UploadRejected(
        f"unsupported upload {filename!r}: send a .zip (data.jsonl + images) or a .jsonl whose images are base64"
    )
