"""Models loaded for /api/inspect, kept in a bounded LRU keyed by (folder, dtype, device).

Loading takes seconds and memory; inspecting takes a fraction of a second. One inference thread (``InferencePool``)
runs every inspect in turn, so concurrent requests queue (boundedly) instead of oversubscribing the cores (or the GPU's
memory), and the request threads stay free for everything else.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from vopd.config import RuntimeConfig
from vopd.models import LoadedModel, load_model_and_processor


class ModelCache:
    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._models: OrderedDict[tuple[str, str, str, int], LoadedModel] = OrderedDict()
        self._lock = threading.Lock()
        self.inference_lock = threading.Lock()

    def get(self, path: Path, runtime: RuntimeConfig) -> LoadedModel:
        # The folder's mtime is part of the key: a checkpoint rewritten on resume must not be served stale.
        key = (str(path.resolve()), runtime.dtype, runtime.device, path.stat().st_mtime_ns)
        with self._lock:
            if key in self._models:
                self._models.move_to_end(key)
                return self._models[key]
            loaded = load_model_and_processor(path, runtime)
            self._models[key] = loaded
            while len(self._models) > self.capacity:
                self._models.popitem(last=False)
            return loaded

    def __len__(self) -> int:
        return len(self._models)


class InferenceBusy(RuntimeError):
    """The inference queue is full; the client should come back after ``retry_after_s``."""

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class InferenceTask:
    """One unit of inference work with a deadline and a cancellation flag the work itself polls."""

    def __init__(self, work: Callable[[Callable[[], bool]], Any], deadline: float) -> None:
        self.work = work
        self.deadline = deadline
        self.cancelled = threading.Event()
        self.future: Future = Future()

    def should_stop(self) -> bool:
        return self.cancelled.is_set() or time.monotonic() > self.deadline

    def cancel(self) -> None:
        self.cancelled.set()


class InferencePool:
    """One dedicated inference thread fed by a bounded queue: request threads never run (or wait on) inference, so
    health and job routes answer while inspects run, and a flood of inspects is refused (503) instead of queued
    without end. A task whose deadline passes or whose client leaves is skipped, or stopped mid-way through its
    ``should_stop`` hook (vopd.token_inspection checks it before every forward pass)."""

    def __init__(self, queue_size: int) -> None:
        self._queue: queue.Queue[InferenceTask | None] = queue.Queue(maxsize=queue_size)
        self._thread = threading.Thread(target=self._run, name="vopd-inference", daemon=True)
        self._thread.start()
        self.busy_since: float | None = None

    def busy_error(self, timeout_s: float) -> InferenceBusy:
        return InferenceBusy(
            f"{self._queue.maxsize} inspects are already waiting (VOPD_INSPECT_QUEUE_SIZE); try again shortly",
            retry_after_s=max(1, min(30, int(timeout_s / 4) or 1)),
        )

    def full(self) -> bool:
        return self._queue.full()

    def submit(self, work: Callable[[Callable[[], bool]], Any], timeout_s: float) -> InferenceTask:
        task = InferenceTask(work, time.monotonic() + timeout_s)
        try:
            self._queue.put_nowait(task)
        except queue.Full as error:
            raise self.busy_error(timeout_s) from error
        return task

    def _run(self) -> None:
        while (task := self._queue.get()) is not None:
            if task.should_stop():  # its client gave up or its budget ran out while it waited
                task.future.set_exception(TimeoutError("stopped before it started"))
                continue
            self.busy_since = time.monotonic()
            try:
                task.future.set_result(task.work(task.should_stop))
            except BaseException as error:  # handed to the request that waits for it
                task.future.set_exception(error)
            finally:
                self.busy_since = None

    def close(self) -> None:
        """Stop the thread once the task at hand is done; waiting tasks are dropped (their requests are gone)."""
        while True:
            try:
                task = self._queue.get_nowait()
            except queue.Empty:
                break
            if task is not None:
                task.cancel()
                task.future.set_exception(TimeoutError("the server is stopping"))
        try:
            self._queue.put(None, timeout=5)
        except queue.Full:  # a request raced the shutdown in; the daemon thread ends with the process
            return
