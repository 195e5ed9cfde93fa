"""First start on embedded defaults: a model, a training set and a held-out set a newcomer can use at once, and a
local key.

The first run should show the method working on data it never saw: the default recipe (``tiny-world``) trains on
``synth-train`` (synth seed 1) and the Evaluate tab and the job page's base-vs-trained comparison read
``synth-heldout`` (synth seed 2), which no default ever trains on (docs/reproduction.md measures the pair).

Everything is idempotent (safe on every start) and written atomically (build in a temporary folder, then
rename), so an interrupted first start never leaves a half model behind.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.orm import Session, sessionmaker

from app.auth import create_api_key, find_api_key
from app.db import make_engine, make_session_factory, run_migrations, session_scope
from app.settings import Settings
from app.tables import Dataset

DEFAULT_MODEL_NAME = "tiny"
# The box-free world's base (vopd synth --no-box), for inspecting and training without an evidence box.
NO_BOX_MODEL_NAME = "tiny-nobox"
# A small set for quick looks (Inspect's samples, the tiny-cpu recipe, tests).
SMALL_DATASET_ID = "synth-64"
SMALL_DATASET_NAME = "Synthetic fine-detail benchmark (64 items, seed 0)"
# The default training set and its held-out twin: different synth seeds, so no item, canvas or target is shared.
TRAIN_DATASET_ID = "synth-train"
TRAIN_SEED = 1
HELD_OUT_DATASET_ID = "synth-heldout"
HELD_OUT_SEED = 2
# Kept for callers of the earlier name: the dataset a first training run reads.
DEFAULT_DATASET_ID = TRAIN_DATASET_ID


@dataclass
class DefaultAssets:
    model_name: str
    dataset_id: str  # the default training set
    held_out_dataset_id: str


def _build_atomically(target: Path, build) -> None:
    if target.exists():
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        build(scratch)
        os.replace(scratch, target)
    except OSError:
        if not target.exists():  # another process won the race: theirs is as good as ours
            raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _default_model(folder: Path) -> None:
    """The pretrained tiny base shipped in the package when present, else a random-weight tiny Qwen2-VL."""
    from vopd.tiny import shipped_base_model_dir
    from vopd.tiny_models import build_tiny_qwen2vl

    shipped = shipped_base_model_dir()
    if (shipped / "config.json").is_file():
        shutil.copytree(shipped, folder, dirs_exist_ok=True)
    else:
        build_tiny_qwen2vl(folder)


def _no_box_model(folder: Path) -> None:
    from vopd.tiny import shipped_no_box_model_dir

    shutil.copytree(shipped_no_box_model_dir(), folder, dirs_exist_ok=True)


def _synth_set(n: int, seed: int) -> Callable[[Path], None]:
    def build(folder: Path) -> None:
        from vopd.synth import SynthConfig, generate_dataset

        generate_dataset(folder, SynthConfig(n=n, seed=seed))

    return build


def default_datasets(settings: Settings) -> list[tuple[str, str, Callable[[Path], None]]]:
    """(id, name, builder) of every dataset registered on first start: the default training set first."""
    train, held_out = settings.demo_train_items, settings.held_out_items
    return [
        (
            TRAIN_DATASET_ID,
            f"Synthetic training set ({train:,} items, seed {TRAIN_SEED})",
            _synth_set(train, TRAIN_SEED),
        ),
        (
            HELD_OUT_DATASET_ID,
            f"Held-out synthetic set ({held_out:,} items, seed {HELD_OUT_SEED}; never trained on)",
            _synth_set(held_out, HELD_OUT_SEED),
        ),
        (SMALL_DATASET_ID, SMALL_DATASET_NAME, _synth_set(64, 0)),
    ]


def ensure_default_assets(settings: Settings, factory: sessionmaker[Session] | None = None) -> DefaultAssets:
    """The tiny model under VOPD_HOME/models/tiny (and the box-free world's under models/tiny-nobox, when the package
    ships it), the synthetic training and held-out sets and the small set, registered for every key.

    The training set dominates a first start: 4,800 items (the default ``demo_train_items``) took about 20 s and
    115 MB on a 2-core machine; later starts find it built."""
    from vopd.tiny import shipped_no_box_model_dir

    settings.ensure_dirs()
    _build_atomically(settings.models_dir / DEFAULT_MODEL_NAME, _default_model)
    if (shipped_no_box_model_dir() / "config.json").is_file():
        _build_atomically(settings.models_dir / NO_BOX_MODEL_NAME, _no_box_model)
    datasets = default_datasets(settings)
    for dataset_id, _, build in datasets:
        _build_atomically(settings.datasets_dir / dataset_id, build)

    if factory is None:
        engine = make_engine(settings)
        run_migrations(engine, settings)
        factory = make_session_factory(engine)
    with session_scope(factory) as session:
        for dataset_id, name, _ in datasets:
            if session.get(Dataset, dataset_id) is not None:
                continue
            dataset_dir = settings.datasets_dir / dataset_id
            data_file = dataset_dir / "data.jsonl"
            size = sum(path.stat().st_size for path in dataset_dir.rglob("*") if path.is_file())
            session.add(
                Dataset(
                    id=dataset_id,
                    owner_id=None,
                    name=name,
                    path=str(data_file),
                    n_samples=sum(1 for line in data_file.read_text().splitlines() if line.strip()),
                    size_bytes=size,
                )
            )
    return DefaultAssets(
        model_name=DEFAULT_MODEL_NAME, dataset_id=TRAIN_DATASET_ID, held_out_dataset_id=HELD_OUT_DATASET_ID
    )


def ensure_local_key(settings: Settings, factory: sessionmaker[Session]) -> str:
    """The key of whoever runs ``vopd serve``, kept in VOPD_HOME/local_api_key (mode 600) across restarts.

    It is the admin key (it may list and revoke every key); a key file from before admin keys existed is
    promoted on the next start. A revoked local key is replaced by a new one.
    """
    key_file = settings.local_key_file
    with session_scope(factory) as session:
        if key_file.is_file():
            key = key_file.read_text().strip()
            row = find_api_key(session, key) if key else None
            if row is not None:
                row.admin = True
                return key
        _, key = create_api_key(session, "local", admin=True)
    settings.home.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(key + "\n")
    return key
