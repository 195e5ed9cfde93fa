"""How long-running library work (training, evaluation) reports to whoever runs it.

The CLI shows a progress bar, the Celery worker writes rows to the database, tests collect values:
all through this one interface, so the library never knows who is listening.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any


class ProgressCallback:
    """Base class with no-op hooks; override what you need."""

    def on_start(self, *, total: int, start: int, unit: str) -> None:
        """Work of ``total`` units (steps or samples) begins, ``start`` of them already done (resume)."""

    def on_progress(self, *, done: int, total: int, metrics: dict[str, Any] | None = None) -> None:
        """``done`` units finished; ``metrics`` is the step's metric record when there is one."""

    def on_log(self, message: str, *, level: str = "info") -> None:
        """A human-readable line (warnings such as collapse alerts included)."""

    def on_checkpoint(self, *, step: int, path: Path) -> None:
        """A checkpoint was fully written at ``path``."""

    def on_end(self, *, status: str, result: dict[str, Any] | None = None) -> None:
        """Work ended with ``status`` in {"succeeded", "stopped", "failed"}."""

    def should_stop(self) -> bool:
        """Polled between steps: True asks the loop to checkpoint and stop (cancellation)."""
        return False


class CallbackList(ProgressCallback):
    """Fan one event out to many callbacks; stop when any of them asks to."""

    def __init__(self, callbacks: Sequence[ProgressCallback] = ()) -> None:
        self.callbacks = list(callbacks)

    def on_start(self, **kwargs: Any) -> None:
        for callback in self.callbacks:
            callback.on_start(**kwargs)

    def on_progress(self, **kwargs: Any) -> None:
        for callback in self.callbacks:
            callback.on_progress(**kwargs)

    def on_log(self, message: str, *, level: str = "info") -> None:
        for callback in self.callbacks:
            callback.on_log(message, level=level)

    def on_checkpoint(self, **kwargs: Any) -> None:
        for callback in self.callbacks:
            callback.on_checkpoint(**kwargs)

    def on_end(self, **kwargs: Any) -> None:
        for callback in self.callbacks:
            callback.on_end(**kwargs)

    def should_stop(self) -> bool:
        return any(callback.should_stop() for callback in self.callbacks)
