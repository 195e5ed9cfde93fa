"""Experiment trackers (``TrainConfig.report_to``): TensorBoard, MLflow and Weights & Biases, as progress callbacks.

Users of Hugging Face trainers expect their runs in these tools; ours otherwise live only in the studio. Each tracker
is a ``ProgressCallback`` fed the very metric records the studio plots (one per optimizer step, every finite number
in it, under the same names: ``loss``, ``divergence_mean``, ``argmax_agreement``...), so the curves agree everywhere.

* ``tensorboard``: event files in ``OUTPUT/tensorboard`` (the run folder, so they travel with it and the service lists
  them as an artifact); ``tensorboard --logdir OUTPUT``.
* ``mlflow``: the tracking URI MLflow itself reads (``MLFLOW_TRACKING_URI``, e.g. ``file:/path/mlruns`` with
  ``MLFLOW_ALLOW_FILE_STORE=true``; unset: a SQLite store in ``OUTPUT/mlflow``), experiment
  ``MLFLOW_EXPERIMENT_NAME`` or ``vision-opd``; ``mlflow ui --backend-store-uri sqlite:///OUTPUT/mlflow/mlflow.db``.
* ``wandb``: ``wandb.init`` with the usual ``WANDB_*`` environment (``WANDB_MODE=offline`` works without a network).

The libraries are optional (``pip install 'vision-opd-studio[trackers]'``) and imported only when asked for; a missing
one is an error at the start of the run that says what to install, never a crash hours in. A resumed run continues the
same MLflow and W&B runs: their ids are kept in ``OUTPUT/trackers.json``.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vopd.callbacks import ProgressCallback

TENSORBOARD_DIR = "tensorboard"
MLFLOW_DIR = "mlflow"
RUN_IDS_FILE = "trackers.json"
DEFAULT_EXPERIMENT = "vision-opd"
# The module each tracker needs (torch's SummaryWriter needs the tensorboard package itself).
REQUIRED_MODULE = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}
INSTALL_HINT = "pip install 'vision-opd-studio[trackers]' (or pip install {package})"


class TrackerUnavailable(ValueError):
    """A tracker named in report_to whose library is not installed: the message says what to install."""


def scalar_metrics(metrics: dict[str, Any] | None) -> dict[str, float]:
    """The finite numbers of a step's metric record (booleans and text left out): what every tracker logs."""
    scalars: dict[str, float] = {}
    for key, value in (metrics or {}).items():
        if isinstance(value, bool) or not isinstance(value, int | float):
            continue
        if math.isfinite(float(value)):
            scalars[key] = float(value)
    return scalars


def _flat_params(config: Any) -> dict[str, str]:
    """The config as flat ``a.b`` -> text pairs (MLflow and W&B show hyper-parameters that way)."""
    flat: dict[str, str] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(f"{prefix}{key}.", value)
        else:
            flat[prefix.rstrip(".")] = json.dumps(node) if not isinstance(node, str) else node

    walk("", config.model_dump(mode="json") if hasattr(config, "model_dump") else dict(config))
    return flat


def _run_ids(output_dir: Path) -> dict[str, str]:
    try:
        return json.loads((output_dir / RUN_IDS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _save_run_id(output_dir: Path, tracker: str, run_id: str) -> None:
    ids = _run_ids(output_dir) | {tracker: run_id}
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / RUN_IDS_FILE).write_text(json.dumps(ids, indent=2), encoding="utf-8")


class TensorBoardTracker(ProgressCallback):
    """Scalars per step into ``OUTPUT/tensorboard``; the writer flushes each step, so a live TensorBoard follows."""

    def __init__(self, output_dir: Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as error:  # torch's writer needs the tensorboard package
            raise TrackerUnavailable(
                "report_to names tensorboard, which is not installed: " + INSTALL_HINT.format(package="tensorboard")
            ) from error
        self.log_dir = Path(output_dir) / TENSORBOARD_DIR
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.writer = SummaryWriter(log_dir=str(self.log_dir))

    def on_progress(self, *, done: int, total: int, metrics: dict[str, Any] | None = None) -> None:
        scalars = scalar_metrics(metrics)
        for key, value in scalars.items():
            self.writer.add_scalar(key, value, global_step=done)
        if scalars:
            self.writer.flush()

    def on_log(self, message: str, *, level: str = "info") -> None:
        if level in ("warning", "error"):  # collapse alerts and the like, next to the curves
            self.writer.add_text(f"log/{level}", message)

    def on_end(self, *, status: str, result: dict[str, Any] | None = None) -> None:
        self.writer.add_text("run/status", status)
        self.writer.close()


class MlflowTracker(ProgressCallback):
    """One MLflow run per run folder (continued on resume): the config as params, metrics per step."""

    def __init__(self, output_dir: Path, config: Any) -> None:
        try:
            from mlflow.tracking import MlflowClient
        except ImportError as error:
            raise TrackerUnavailable(
                "report_to names mlflow, which is not installed: " + INSTALL_HINT.format(package="mlflow")
            ) from error
        self.output_dir = Path(output_dir)
        uri = os.environ.get("MLFLOW_TRACKING_URI") or self.default_uri(self.output_dir)
        self.client = MlflowClient(tracking_uri=uri)
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT
        experiment = self.client.get_experiment_by_name(name)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(name)
        previous = _run_ids(self.output_dir).get("mlflow")
        if previous is not None:
            self.run_id = previous
            self.client.update_run(previous, status="RUNNING")
        else:
            run = self.client.create_run(
                experiment_id, run_name=self.output_dir.name, tags={"vopd.output": str(output_dir)}
            )
            self.run_id = run.info.run_id
            _save_run_id(self.output_dir, "mlflow", self.run_id)
            for key, value in _flat_params(config).items():
                self.client.log_param(self.run_id, key, value[:6000])

    @staticmethod
    def default_uri(output_dir: Path) -> str:
        """A SQLite store inside the run folder (OUTPUT/mlflow/mlflow.db): MLflow 3's own default backend (its file
        store now refuses to start unless MLFLOW_ALLOW_FILE_STORE=true), and it travels with the run."""
        folder = (output_dir / MLFLOW_DIR).resolve()
        folder.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{folder / 'mlflow.db'}"

    def on_progress(self, *, done: int, total: int, metrics: dict[str, Any] | None = None) -> None:
        from mlflow.entities import Metric

        scalars = scalar_metrics(metrics)
        if scalars:
            stamp = int(time.time() * 1000)
            batch = [Metric(key, value, stamp, done) for key, value in scalars.items()]
            self.client.log_batch(self.run_id, metrics=batch)

    def on_end(self, *, status: str, result: dict[str, Any] | None = None) -> None:
        self.client.set_terminated(self.run_id, status="FINISHED" if status == "succeeded" else "KILLED")


class WandbTracker(ProgressCallback):
    """One W&B run per run folder (resumed by id), the config as its config, metrics per step."""

    def __init__(self, output_dir: Path, config: Any) -> None:
        try:
            import wandb
        except ImportError as error:
            raise TrackerUnavailable(
                "report_to names wandb, which is not installed: " + INSTALL_HINT.format(package="wandb")
            ) from error
        self.output_dir = Path(output_dir)
        run_id = _run_ids(self.output_dir).get("wandb") or wandb.util.generate_id()
        _save_run_id(self.output_dir, "wandb", run_id)
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT") or DEFAULT_EXPERIMENT,
            name=self.output_dir.name,
            id=run_id,
            resume="allow",
            dir=str(self.output_dir),
            config=config.model_dump(mode="json") if hasattr(config, "model_dump") else dict(config),
        )

    def on_progress(self, *, done: int, total: int, metrics: dict[str, Any] | None = None) -> None:
        scalars = scalar_metrics(metrics)
        if scalars:
            self.run.log(scalars, step=done)

    def on_end(self, *, status: str, result: dict[str, Any] | None = None) -> None:
        self.run.finish(exit_code=0 if status == "succeeded" else 1)


def tracker_callbacks(report_to: Sequence[str], output_dir: Path | str, config: Any = None) -> list[ProgressCallback]:
    """The callbacks for ``report_to`` (``TrainConfig.report_to``); raises TrackerUnavailable for a missing library
    before any of them starts a run."""
    output_dir = Path(output_dir)
    builders = {
        "tensorboard": lambda: TensorBoardTracker(output_dir),
        "mlflow": lambda: MlflowTracker(output_dir, config or {}),
        "wandb": lambda: WandbTracker(output_dir, config or {}),
    }
    unknown = [name for name in report_to if name not in builders]
    if unknown:
        raise ValueError(f"unknown tracker(s) {', '.join(unknown)}; choose from {', '.join(builders)}")
    for name in report_to:  # every library present before any run is started anywhere
        if importlib.util.find_spec(REQUIRED_MODULE[name]) is None:
            raise TrackerUnavailable(
                f"report_to names {name}, which is not installed: " + INSTALL_HINT.format(package=name)
            )
    return [builders[name]() for name in report_to]
