"""A fake REST API for the front end's unit tests: canned JSON per route, every request recorded."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from frontend.client import VopdClient

BASE_URL = "http://api.test"
API_KEY = "vopd_test_key"

Handler = Callable[[httpx.Request], httpx.Response]


@dataclass
class FakeApi:
    """Routes are ``"METHOD /path"``; a value is JSON to return, an httpx.Response, or a handler."""

    routes: dict[str, Any] = field(default_factory=dict)
    requests: list[httpx.Request] = field(default_factory=list)

    def handle(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        answer = self.routes.get(f"{request.method} {request.url.path}")
        if answer is None:
            return httpx.Response(404, json={"detail": f"no route {request.method} {request.url.path}"})
        if callable(answer):
            return answer(request)
        if isinstance(answer, httpx.Response):
            return answer
        return httpx.Response(200, json=answer)

    def client(self, api_key: str | None = API_KEY) -> VopdClient:
        return VopdClient(BASE_URL, api_key, transport=httpx.MockTransport(self.handle))

    def bodies(self, route: str) -> list[Any]:
        method, path = route.split(" ", 1)
        return [json.loads(r.content) for r in self.requests if r.method == method and r.url.path == path]


@pytest.fixture
def api() -> FakeApi:
    return FakeApi()


def job_json(job_id: int = 1, **overrides: Any) -> dict[str, Any]:
    """A JobOut as the service returns it: validated and dumped by the server's own schema, so a field the server
    renames or drops fails here rather than in a browser."""
    from app.crud import resolved_engine
    from app.registry import parse_job_model_name
    from app.schemas import JobOut

    job = {
        "id": job_id,
        "kind": "train",
        "status": "running",
        "queue": "vopd",
        "queue_position": None,
        "progress": 0.5,
        "step": 2,
        "total_steps": 4,
        "unit": "step",
        "eta_seconds": 12.0,
        "latest_metrics": {"loss": 0.5},
        "result": None,
        "error": None,
        "cancel_requested": False,
        "attempts": 1,
        "worker": "host:1",
        "config": {"model": "tiny", "dataset": "synth-64", "steps": 4},
        "resolved_config": {},
        "created_at": "2026-01-01T00:00:00Z",
        "started_at": "2026-01-01T00:00:01Z",
        "finished_at": None,
        "heartbeat_at": None,
    }
    job.update(overrides)
    source = parse_job_model_name(str(job["config"].get("model", "")))  # what the server derives from the name
    job.setdefault("model_job_id", source[0] if source else None)
    job.setdefault("model_step", source[1] if source else None)
    job.setdefault("engine", resolved_engine(job["kind"], job["latest_metrics"], job["result"]))
    return JobOut.model_validate(job).model_dump(mode="json")


def top(tokens: list[tuple[str, int, float]]) -> list[dict[str, Any]]:
    return [{"token": t, "token_id": i, "prob": p, "rank": r + 1} for r, (t, i, p) in enumerate(tokens)]


def token_json(position: int, token: str, token_id: int, divergence: float, **overrides: Any) -> dict[str, Any]:
    record = {
        "position": position,
        "token": token,
        "token_id": token_id,
        "student_prob": 0.6,
        "teacher_prob": 0.3,
        "divergence": divergence,
        "forward_kl": divergence * 2,
        "reverse_kl": divergence * 3,
        "jsd": divergence,
        "student_entropy": 1.0,
        "teacher_entropy": 1.5,
        "argmax_agree": True,
        "student_in_topk": True,
        "student_top": top([(token, token_id, 0.6), ("x", 99, 0.2)]),
        "teacher_top": top([(token, token_id, 0.3), ("y", 98, 0.25)]),
        "student_tail_mass": 0.2,
        "teacher_tail_mass": 0.45,
    }
    record.update(overrides)
    return record


def inspect_json(model: str = "tiny", divergences: tuple[float, ...] = (0.1, 0.5, 0.2)) -> dict[str, Any]:
    tokens = [token_json(i, f"t{i}", 10 + i, d) for i, d in enumerate(divergences)]
    return {
        "model": model,
        "student_text": "B",
        "student_choice": "B",
        "teacher_answer": "C",
        "teacher_choice": "C",
        "student_prompt": "q",
        "teacher_prompt": "q",
        "alpha": 0.5,
        "mean_divergence": sum(divergences) / len(divergences),
        "tokens": tokens,
    }


# ---------------------------------------------------------------- browser tests fail on any page error
@pytest.fixture(autouse=True)
def _no_page_errors(request: pytest.FixtureRequest) -> Iterator[list[str]]:
    """Every browser test fails on an uncaught JavaScript error in any of its pages (Gradio's plots threw "Cannot
    read properties of null (reading 'offsetWidth')" unseen): each browser context the test opens reports its
    pages' errors here, and the test's teardown asserts there were none."""
    if "browser" not in request.fixturenames:
        yield []
        return
    browser = request.getfixturevalue("browser")
    errors: list[str] = []
    original = browser.new_context

    def new_context(*args: Any, **kwargs: Any) -> Any:
        context = original(*args, **kwargs)
        context.on("weberror", lambda error: errors.append(str(error.error)))
        return context

    browser.new_context = new_context
    try:
        yield errors
    finally:
        del browser.new_context  # the instance attribute; the class's method shows again
    assert not errors, f"page errors: {errors}"
