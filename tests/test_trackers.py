"""report_to: the run's metrics also reach TensorBoard and MLflow (both offline here), the same numbers the studio
plots; a missing tracker library is an error before any work."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest

from tests.test_trainer import write_dataset
from vopd.config import TrainConfig
from vopd.trackers import (
    RUN_IDS_FILE,
    TENSORBOARD_DIR,
    MlflowTracker,
    TensorBoardTracker,
    TrackerUnavailable,
    scalar_metrics,
    tracker_callbacks,
)


def need(*modules: str) -> None:
    """The trackers are an optional extra (`.[trackers]`): skip without them, except under CI=true."""
    missing = [name for name in modules if importlib.util.find_spec(name) is None]
    if missing:
        reason = f"{', '.join(missing)} not installed (pip install -e '.[trackers]' torch==2.13.0)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(reason)
        pytest.skip(reason)


def _scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def _mlflow_history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    from mlflow.tracking import MlflowClient

    return [(m.step, m.value) for m in MlflowClient(tracking_uri=uri).get_metric_history(run_id, key)]


def test_scalar_metrics_keep_finite_numbers_only() -> None:
    record = {"loss": 0.5, "steps": 3, "nan": float("nan"), "ok": True, "note": "x", "inf": float("inf")}
    assert scalar_metrics(record) == {"loss": 0.5, "steps": 3.0}
    assert scalar_metrics(None) == {}


def test_report_to_is_a_list_of_known_trackers() -> None:
    base = {"model": "m", "dataset": "d", "steps": 1}
    assert TrainConfig.model_validate(base).report_to == []
    assert TrainConfig.model_validate(base | {"report_to": "tensorboard, MLflow"}).report_to == [
        "tensorboard",
        "mlflow",
    ]
    assert TrainConfig.model_validate(base | {"report_to": ["wandb", "wandb"]}).report_to == ["wandb"]
    assert TrainConfig.model_validate(base | {"report_to": "none"}).report_to == []
    with pytest.raises(ValueError, match="report_to"):
        TrainConfig.model_validate(base | {"report_to": ["comet"]})


def test_tensorboard_event_files_hold_each_steps_metrics(tmp_path: Path) -> None:
    need("tensorboard")
    tracker = TensorBoardTracker(tmp_path)
    tracker.on_progress(done=1, total=2, metrics={"loss": 0.75, "divergence_mean": 0.25})
    tracker.on_progress(done=2, total=2, metrics={"loss": 0.5, "divergence_mean": 0.125})
    tracker.on_end(status="succeeded")
    scalars = _scalars(tmp_path / TENSORBOARD_DIR)
    assert scalars["loss"] == [(1, 0.75), (2, 0.5)]
    assert scalars["divergence_mean"] == [(1, 0.25), (2, 0.125)]


def test_mlflow_file_store_run_continues_on_resume(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    need("mlflow")
    uri = (tmp_path / "mlruns").as_uri()  # MLflow's local file store, offline
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    config = TrainConfig(model="m", dataset="d", steps=2, lr=1e-4)
    first = MlflowTracker(tmp_path / "run", config)
    first.on_progress(done=1, total=2, metrics={"loss": 0.75})
    first.on_end(status="stopped")
    again = MlflowTracker(tmp_path / "run", config)  # a resumed run: same MLflow run
    again.on_progress(done=2, total=2, metrics={"loss": 0.5})
    again.on_end(status="succeeded")
    assert again.run_id == first.run_id == json.loads((tmp_path / "run" / RUN_IDS_FILE).read_text())["mlflow"]
    assert _mlflow_history(uri, first.run_id, "loss") == [(1, 0.75), (2, 0.5)]
    from mlflow.tracking import MlflowClient

    run = MlflowClient(tracking_uri=uri).get_run(first.run_id)
    assert run.data.params["lr"] == "0.0001" and run.info.status == "FINISHED"


def test_a_missing_tracker_library_is_an_error_before_any_run(tmp_path: Path, monkeypatch) -> None:
    present = object()  # as if tensorboard were installed, and wandb not
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else present)
    with pytest.raises(
        TrackerUnavailable, match=r"wandb, which is not installed: pip install 'vision-opd-studio\[trackers\]'"
    ):
        tracker_callbacks(["tensorboard", "wandb"], tmp_path)
    assert not (tmp_path / TENSORBOARD_DIR).exists()  # nothing started


def test_training_reports_the_studios_metrics_to_tensorboard_and_mlflow(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    need("tensorboard", "mlflow")
    from vopd.trainer import train

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # the default: a store inside the run folder
    config = TrainConfig(
        model=str(tiny_model_dir),
        dataset=str(write_dataset(tmp_path / "data", count=4)),
        output=str(tmp_path / "run"),
        steps=2,
        batch_size=2,
        lr=1e-3,
        report_to=["tensorboard", "mlflow"],
        rollout={"num_rollouts": 1, "max_new_tokens": 4},
        divergence={"topk": 8},
    )
    train(config)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    plotted = [key for key in rows[0] if key == "loss" or key.startswith("divergence") or "agree" in key]
    assert "loss" in plotted and len(plotted) >= 3
    scalars = _scalars(tmp_path / "run" / TENSORBOARD_DIR)
    run_id = json.loads((tmp_path / "run" / RUN_IDS_FILE).read_text())["mlflow"]
    uri = MlflowTracker.default_uri(tmp_path / "run")
    assert uri.endswith("run/mlflow/mlflow.db")
    for key in plotted:
        expected = [(row["step"], pytest.approx(row[key], rel=1e-6)) for row in rows]
        assert scalars[key] == expected, key
        assert _mlflow_history(uri, run_id, key) == expected, key


def test_the_services_artifacts_list_the_tracker_logs(tmp_path: Path) -> None:
    """TensorBoard event files land in the run folder and are listed (and downloadable) as an artifact."""
    need("tensorboard")
    from app.artifacts import job_artifacts
    from app.tables import Job

    class NoRows:  # the job has no artifact or checkpoint rows: only the folders on disk count here
        def scalars(self, *_: object) -> list[object]:
            return []

    run = tmp_path / "run"
    tracker = TensorBoardTracker(run)
    tracker.on_progress(done=1, total=1, metrics={"loss": 1.0})
    tracker.on_end(status="succeeded")
    entries = job_artifacts(NoRows(), Job(id=5, kind="train", output_dir=str(run)))  # type: ignore[arg-type]
    assert [(e.out.name, e.out.kind, e.out.is_folder) for e in entries] == [("tensorboard", "tensorboard", True)]
    assert entries[0].path == run / TENSORBOARD_DIR and entries[0].out.size_bytes > 0
    assert job_artifacts(NoRows(), Job(id=6, kind="train", output_dir=str(tmp_path / "empty"))) == []  # type: ignore[arg-type]
