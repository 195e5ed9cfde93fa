"""What the service's names stand for on disk, read straight from ``VOPD_HOME``: no database, no web code.

The REST API names models (``tiny``, ``job-3/final``, ``job-3/step-20``, a CLI run's ``runs/NAME/final``) and
datasets (``synth-64``, ``ds-1a2b3c``) rather than paths. The studio shows the equivalent ``vopd train`` command with
those same names, so the CLI must understand them too: this module maps a name to the folder or file the service keeps
it in, with the same layout the service writes (``$VOPD_HOME/models/NAME``, ``$VOPD_HOME/datasets/ID/data.jsonl``,
``$VOPD_HOME/artifacts/jobs/N/{final,checkpoints/step-M}``, ``$VOPD_HOME/runs/NAME/...``). The service adds ownership
checks on top (``app.registry``); the CLI runs as the machine's user, who may read every folder anyway.

A path that exists always wins over a name, so every command keeps accepting plain paths exactly as before.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

DEFAULT_HOME = "~/.vopd"
JOB_MODEL_NAME = re.compile(r"^job-(\d+)/(final|step-(\d+))$")
# A run that ``vopd train --output $VOPD_HOME/runs/NAME`` wrote: its final model or one of its checkpoints, named by
# its path relative to VOPD_HOME (so the name reads as the folder it is). NAME may be up to three folders deep
# (``vopd reproduce --output $VOPD_HOME/runs/repro`` writes repro/opd and repro/runs/ARM-seedN); no part is ``..``.
_RUN_PART = r"[A-Za-z0-9][A-Za-z0-9._-]*"
MAX_RUN_DEPTH = 3
RUN_MODEL_NAME = re.compile(
    rf"^runs/((?:{_RUN_PART}/){{0,{MAX_RUN_DEPTH - 1}}}{_RUN_PART})/(final|checkpoints/step-(\d+))$"
)
MODEL_MARKERS = ("config.json", "adapter_config.json")
DATA_FILE = "data.jsonl"


def vopd_home(environ: Mapping[str, str] | None = None) -> Path:
    """``VOPD_HOME`` (default ``~/.vopd``), absolute: the service's own default, so both read the same folders."""
    environ = os.environ if environ is None else environ
    return Path(environ.get("VOPD_HOME") or DEFAULT_HOME).expanduser().resolve()


def models_dir(home: Path) -> Path:
    return home / "models"


def datasets_dir(home: Path) -> Path:
    return home / "datasets"


def runs_dir(home: Path) -> Path:
    """Where CLI runs whose models the service lists belong: ``vopd train --output $VOPD_HOME/runs/NAME``."""
    return home / "runs"


def job_dir(home: Path, job_id: int) -> Path:
    """Where the service keeps job ``job_id``'s run folder (its output)."""
    return home / "artifacts" / "jobs" / str(job_id)


def parse_job_model_name(name: str) -> tuple[int, int | None] | None:
    """(job id, checkpoint step or None for final) of a model name made from a job's weights; None for others."""
    match = JOB_MODEL_NAME.match(name)
    if match is None:
        return None
    return int(match.group(1)), int(match.group(3)) if match.group(3) else None


def is_model_folder(folder: Path) -> bool:
    return folder.is_dir() and any((folder / marker).is_file() for marker in MODEL_MARKERS)


def base_model_names(root: Path) -> list[str]:
    """Model folders directly under ``root`` (VOPD_HOME/models), or one level deeper (``org/name``)."""
    if not root.is_dir():
        return []
    names = []
    for child in sorted(root.iterdir()):
        if is_model_folder(child):
            names.append(child.name)
        elif child.is_dir():
            names.extend(
                f"{child.name}/{grandchild.name}"
                for grandchild in sorted(child.iterdir())
                if is_model_folder(grandchild)
            )
    return names


def _run_folders(folder: Path, prefix: str, depth: int) -> list[tuple[str, Path]]:
    """(name, folder) of the runs at or below ``folder``: a folder holding ``final/`` or ``checkpoints/`` is a run
    (not searched further); others are searched down to MAX_RUN_DEPTH folders below VOPD_HOME/runs."""
    found: list[tuple[str, Path]] = []
    for child in sorted(folder.iterdir()):
        name = f"{prefix}{child.name}"
        if not child.is_dir() or re.fullmatch(_RUN_PART, child.name) is None:
            continue
        if (child / "final").is_dir() or (child / "checkpoints").is_dir():
            found.append((name, child))
        elif depth < MAX_RUN_DEPTH:
            found.extend(_run_folders(child, f"{name}/", depth + 1))
    return found


def run_models(home: Path) -> list[tuple[str, int | None]]:
    """(name, checkpoint step or None for final) of every model a CLI run under VOPD_HOME/runs holds: each run's
    ``final`` first, then its checkpoints by step. Runs are listed by name; a run still training shows its checkpoints
    (each is renamed into place whole, so a listed one is complete)."""
    root = runs_dir(home)
    if not root.is_dir():
        return []
    found: list[tuple[str, int | None]] = []
    for run, folder in _run_folders(root, "", 1):
        if run_model_folder(home, f"runs/{run}/final") is not None:
            found.append((f"runs/{run}/final", None))
        checkpoints = folder / "checkpoints"
        steps = sorted(
            int(step.name[5:])
            for step in (checkpoints.iterdir() if checkpoints.is_dir() else ())
            if step.name.startswith("step-")
            and step.name[5:].isdigit()
            and run_model_folder(home, f"runs/{run}/checkpoints/{step.name}") is not None
        )
        found.extend((f"runs/{run}/checkpoints/step-{step}", step) for step in steps)
    return found


def run_model_folder(home: Path, name: str) -> Path | None:
    """The folder a ``runs/NAME/final`` or ``runs/NAME/checkpoints/step-N`` name stands for, if it holds a model
    inside VOPD_HOME/runs (a link pointing elsewhere is not followed out)."""
    if RUN_MODEL_NAME.match(name) is None:
        return None
    folder = home / name
    root = runs_dir(home).resolve()
    if not is_model_folder(folder) or not folder.resolve().is_relative_to(root):
        return None
    return folder


def job_model_folder(home: Path, job_id: int, step: int | None) -> Path:
    """The folder a ``job-N/final`` or ``job-N/step-M`` name stands for (the trainer's run-folder layout)."""
    run = job_dir(home, job_id)
    return run / "final" if step is None else run / "checkpoints" / f"step-{step}"


def dataset_data_file(folder: Path) -> Path | None:
    """An uploaded dataset's data file: data.jsonl at the root or inside a single top-level folder, else the only
    JSONL or parquet file at the root, else the only Parquet file below it (the layouts an upload is accepted in)."""
    candidates = [folder / DATA_FILE]
    children = [child for child in folder.iterdir() if not child.name.startswith(("__MACOSX", "."))]
    if len(children) == 1 and children[0].is_dir():
        candidates.append(children[0] / DATA_FILE)
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    roots = sorted(folder.glob("*.jsonl")) + sorted(folder.glob("*.parquet"))
    if roots:
        return roots[0] if len(roots) == 1 else None
    nested = sorted(folder.rglob("*.parquet"))  # a published dataset's folder (data/train-...parquet), as uploaded
    return nested[0] if len(nested) == 1 else None


def resolve_model_name(name: str, home: Path | None = None) -> Path | None:
    """The model folder for ``name``: an existing path as is, else a service name (``tiny``, ``org/name``,
    ``job-N/final``, ``job-N/step-M``) under VOPD_HOME; None when it is neither."""
    path = Path(name).expanduser()
    if path.exists():
        return path
    home = vopd_home() if home is None else home
    source = parse_job_model_name(name)
    if source is not None:
        folder = job_model_folder(home, *source)
        return folder if is_model_folder(folder) else None
    if RUN_MODEL_NAME.match(name):
        return run_model_folder(home, name)
    if path.is_absolute() or ".." in path.parts:
        return None
    folder = models_dir(home) / path
    return folder if is_model_folder(folder) else None


def resolve_dataset_name(name: str, home: Path | None = None) -> Path | None:
    """The data file for ``name``: an existing path as is, else the dataset id's file under VOPD_HOME/datasets."""
    path = Path(name).expanduser()
    if path.exists():
        return path
    if path.is_absolute() or len(path.parts) != 1 or name in (".", ".."):
        return None
    home = vopd_home() if home is None else home
    folder = datasets_dir(home) / name
    return dataset_data_file(folder) if folder.is_dir() else None


def names_hint(home: Path) -> str:
    """Where valid names come from, for an error message."""
    models = ", ".join(base_model_names(models_dir(home))[:8]) or "none"
    root = datasets_dir(home)
    datasets = ", ".join(sorted(p.name for p in root.iterdir() if p.is_dir())[:8]) if root.is_dir() else ""
    return (
        f"give a path, or a name the service knows in VOPD_HOME={home} (models: {models}; job-N/final, "
        f"job-N/step-M; datasets: {datasets or 'none'})"
    )
