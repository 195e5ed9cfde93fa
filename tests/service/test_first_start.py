"""First start registers a training set and a held-out set of another seed, so the first run is judged on data it
never saw."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

from app.bootstrap import HELD_OUT_DATASET_ID, TRAIN_DATASET_ID, ensure_default_assets
from app.settings import Settings


def test_first_start_registers_a_training_set_and_a_disjoint_held_out_set(tmp_path: Path) -> None:
    settings = Settings(
        home=tmp_path, database_url_env=f"sqlite:///{tmp_path}/vopd.db", demo_train_items=12, held_out_items=8
    )
    assets = ensure_default_assets(settings)
    assert (assets.dataset_id, assets.held_out_dataset_id) == (TRAIN_DATASET_ID, HELD_OUT_DATASET_ID)
    with sqlite3.connect(tmp_path / "vopd.db") as db:
        rows = dict(db.execute("SELECT id, n_samples FROM datasets").fetchall())
        names = dict(db.execute("SELECT id, name FROM datasets").fetchall())
    assert rows == {TRAIN_DATASET_ID: 12, HELD_OUT_DATASET_ID: 8, "synth-64": 64}
    assert "never trained on" in names[HELD_OUT_DATASET_ID] and "seed 2" in names[HELD_OUT_DATASET_ID]
    assert "seed 1" in names[TRAIN_DATASET_ID]

    def items(dataset_id: str) -> list[dict]:
        path = tmp_path / "datasets" / dataset_id / "data.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def pixels(dataset_id: str) -> set[bytes]:
        return {(tmp_path / "datasets" / dataset_id / item["image"]).read_bytes() for item in items(dataset_id)}

    # Another seed: no image is shared, so nothing the default run trains on is ever scored as held out.
    assert not pixels(TRAIN_DATASET_ID) & pixels(HELD_OUT_DATASET_ID)
    ensure_default_assets(settings)  # idempotent
    with sqlite3.connect(tmp_path / "vopd.db") as db:
        assert db.execute("SELECT COUNT(*) FROM datasets").fetchone()[0] == 3


def test_the_default_sizes_are_the_measured_ones() -> None:
    """docs/reproduction.md measured the default recipe on 4,800 training items and 400 held-out ones."""
    fields = Settings.model_fields
    assert (fields["demo_train_items"].default, fields["held_out_items"].default) == (4800, 400)
