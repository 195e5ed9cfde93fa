"""What every tab shares: the API client for the key in use, and the translation of failures into UI messages."""

from __future__ import annotations

import functools
import html
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ParamSpec, TypeVar

import gradio as gr

from frontend import strings
from frontend.client import ApiError, Dataset, ModelInfo, VopdClient
from frontend.render import UiInputError, served
from frontend.signin import request_credential

# The sets `vopd serve` registers on first start (app.bootstrap; a test pins these names to it): the default training
# set and its held-out twin (another synth seed), each preselected where it belongs, so a first run trains on one and
# is judged on the other.
TRAIN_DATASET_ID = "synth-train"
HELD_OUT_DATASET_ID = "synth-heldout"

P = ParamSpec("P")
R = TypeVar("R")


@dataclass
class UiContext:
    """One per mounted UI. Clients are cached per credential (a browser's session, a script's key), so every browser
    session reuses pooled connections."""

    api_base_url: str
    _clients: dict[str, VopdClient] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def client(self, request: gr.Request | None) -> VopdClient:
        """The client for the signed-in user (the session in the sign-in cookie, or a Bearer header of the callback's
        request), which the API resolves to its key. There is no fallback key: a request without one is refused,
        never served as someone else."""
        credential = request_credential(request)
        if not credential:
            raise ApiError(strings.NOT_SIGNED_IN, 401)
        with self._lock:
            if credential not in self._clients:
                self._clients[credential] = VopdClient(self.api_base_url, credential)
            return self._clients[credential]


def readable_errors(fn: Callable[P, R]) -> Callable[P, R]:
    """Show API and input errors as a Gradio error toast with the message only (no traceback)."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except (ApiError, UiInputError) as error:
            raise gr.Error(html.escape(str(error)), print_exception=False) from error

    return wrapper


def serve_images(fn: Callable[P, R]) -> Callable[P, R]:
    """A Gradio handler whose PIL images reach Gradio as finished files (``render.served``): re-serving an image
    Gradio had rewritten in place meanwhile ended short of its Content-Length."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        return served(fn(*args, **kwargs))

    wrapper.serves_images = True  # type: ignore[attr-defined]  (tests find the handlers so wrapped)
    return wrapper


def model_choices(models: list[ModelInfo]) -> list[tuple[str, str]]:
    """(label, name) pairs: base models first, then CLI runs, trained models and checkpoints, labelled by kind."""
    labels = {"base": "base", "final": "trained", "checkpoint": "checkpoint", "run": "CLI run"}

    def label(model: ModelInfo) -> str:
        if model.kind == "run" and model.step is not None:
            return "CLI run checkpoint"
        return labels.get(model.kind, model.kind)

    return [(f"{m.name}  ({label(m)})", m.name) for m in models]


def dataset_choices(datasets: list[Dataset]) -> list[tuple[str, str]]:
    """(label, id) pairs: a dataset is shown by its name and size; the id (what a job's config names) is the value,
    and is shown only beside a name that two datasets share, to tell them apart."""
    counts: dict[str, int] = {}
    for dataset in datasets:
        counts[dataset.name] = counts.get(dataset.name, 0) + 1

    def label(d: Dataset) -> str:
        facts = [] if f"{d.n_samples:,} items" in d.name else [f"{d.n_samples:,} samples"]  # a name may say it
        if counts[d.name] > 1:
            facts.append(d.id)
        return f"{d.name}  ({', '.join(facts)})" if facts else d.name

    return [(label(d), d.id) for d in datasets]


def choices_update(
    choices: list[tuple[str, str]],
    current: Any,
    *,
    multiselect: bool = False,
    optional: bool = False,
    preferred: str | None = None,
) -> dict[str, Any]:
    """Refresh a dropdown's choices, keeping the current selection when it is still offered; otherwise the
    ``preferred`` choice when offered, else the first; an ``optional`` dropdown stays empty rather than defaulting."""
    names = [value for _, value in choices]
    if multiselect:
        kept = [value for value in (current or []) if value in names]
        return gr.update(choices=choices, value=kept or names[:1])
    fallback = None if optional or not names else (preferred if preferred in names else names[0])
    return gr.update(choices=choices, value=current if current in names else fallback)
