"""Models loaded for /api/inspect, kept in a bounded LRU keyed by (folder, dtype, device).

Loading takes seconds and memory; inspecting takes a fraction of a second. One lock serialises inference so
concurrent requests queue instead of oversubscribing the cores (or the GPU's memory).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from pathlib import Path

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
