"""A typed httpx client for the parts of the Vision-OPD REST API that the studio uses.

The UI is a client of the API and nothing else, so everything it shows goes through here. The response models
below mirror the service's schemas but ignore unknown fields: the server may add fields without breaking an older
UI. Every failure (HTTP error, unreachable server, malformed answer) becomes one ``ApiError`` whose message is
short enough to show to a user as is.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any, Literal, TypeVar

import httpx
from pydantic import BaseModel, ConfigDict, ValidationError

JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]
TERMINAL_STATUSES: frozenset[str] = frozenset({"succeeded", "failed", "cancelled"})
DEFAULT_TIMEOUT_S = 30.0
# Inspect may first load a model from disk, then decode: far slower than any other call.
INSPECT_TIMEOUT_S = 600.0
# An upload is sent, unpacked and every image decoded before the answer; a synthetic set is drawn within the request.
DATASET_TIMEOUT_S = 600.0
# How long the id -> name map of the datasets is reused: the job table and header name datasets on every poll tick.
DATASET_NAMES_TTL_S = 10.0
MAX_MESSAGE_CHARS = 600


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore")


class JobPlan(_Model):
    """A train job's memory plan (POST /api/jobs/plan): per-device bytes by term, whether they fit, what would."""

    fits: bool
    per_device_bytes: dict[str, int]
    device_memory_bytes: int
    host_bytes: dict[str, int] = {}
    suggestions: list[dict[str, Any]] = []
    table: str = ""


class Job(_Model):
    id: int
    kind: Literal["train", "eval"]
    status: JobStatus
    queue_position: int | None = None
    progress: float = 0.0
    step: int = 0
    total_steps: int | None = None
    unit: str = "step"
    eta_seconds: float | None = None
    latest_metrics: dict[str, Any] | None = None
    result: dict[str, Any] | None = None
    engine: str | None = None  # hf or vllm, as the worker resolved the job's engine setting (None while unknown)
    error: str | None = None
    cancel_requested: bool = False
    attempts: int = 0
    worker: str | None = None
    config: dict[str, Any]
    model_job_id: int | None = None  # the training job whose weights config.model names, if any
    model_step: int | None = None  # ...and its checkpoint step (None: its final weights)
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None

    @property
    def is_terminal(self) -> bool:
        return self.status in TERMINAL_STATUSES

    @property
    def model_name(self) -> str:
        return str(self.config.get("model", ""))

    @property
    def dataset_id(self) -> str:
        return str(self.config.get("dataset") or "")

    @property
    def benchmark(self) -> str | None:
        """The published suite an eval job ran on (None for a dataset evaluation)."""
        return self.config.get("benchmark") or None

    @property
    def source_label(self) -> str:
        """What an evaluation was asked on: the dataset id, or ``benchmark:folder``."""
        if self.benchmark:
            return f"{self.benchmark}:{self.config.get('data', '')}"
        return self.dataset_id


class JobPage(_Model):
    items: list[Job]
    total: int
    limit: int
    offset: int


class Metric(_Model):
    id: int
    step: int
    data: dict[str, Any]


class MetricPage(_Model):
    items: list[Metric]
    next_since: int


class LogLine(_Model):
    id: int
    level: str
    message: str
    created_at: datetime


class LogPage(_Model):
    items: list[LogLine]
    next_since: int


class Artifact(_Model):
    name: str
    kind: str
    is_folder: bool
    size_bytes: int
    step: int | None = None
    model_name: str | None = None


class Dataset(_Model):
    id: str
    name: str
    n_samples: int
    size_bytes: int = 0
    shared: bool = False


class Sample(_Model):
    index: int
    id: str
    question: str
    options: list[str] | None = None
    answer: str | None = None
    bbox: tuple[float, float, float, float] | None = None
    hidden_bbox: tuple[float, float, float, float] | None = None  # where the target is, in a set without boxes
    evidence: str = "box"  # "box", or "search": no box, a model finds its own crop
    width: int | None = None  # the sample's own image size (its boxes are in these pixels)
    height: int | None = None
    student_image: str
    teacher_image: str
    image: str | None = None  # the sample's own image, when asked for with original=True


class SamplePage(_Model):
    items: list[Sample]
    total: int


class ModelInfo(_Model):
    name: str
    kind: Literal["base", "final", "checkpoint", "run"]  # run: a CLI run under VOPD_HOME/runs
    job_id: int | None = None
    step: int | None = None


class TopToken(_Model):
    token: str
    token_id: int
    prob: float
    rank: int


class TokenRecord(_Model):
    position: int
    token: str
    token_id: int
    student_prob: float
    teacher_prob: float
    divergence: float
    forward_kl: float
    reverse_kl: float
    jsd: float
    student_entropy: float
    teacher_entropy: float
    argmax_agree: bool
    student_in_topk: bool = True  # the sampled token is among the student's top-k (else only the tail holds it)
    student_top: list[TopToken]
    teacher_top: list[TopToken]
    student_tail_mass: float
    teacher_tail_mass: float


class Evidence(_Model):
    """Where the model looked: the box it was given, or the crop its own evidence search chose."""

    box: tuple[float, float, float, float]
    source: str = "given"  # "given" (the request's or the sample's box) or "search" (the model chose it)
    confidence: float | None = None  # the search's confidence in its crop; None for a given box


class InspectResult(_Model):
    model: str
    student_text: str
    student_choice: str | None = None
    teacher_answer: str
    teacher_choice: str | None = None
    student_prompt: str = ""
    teacher_prompt: str = ""
    alpha: float
    mean_divergence: float
    tokens: list[TokenRecord]
    evidence: Evidence | None = None  # absent from servers older than box-free inspection


class ComponentHealth(_Model):
    ok: bool
    detail: str


class Health(_Model):
    status: str
    database: ComponentHealth
    broker: ComponentHealth
    workers: list[dict[str, Any]]


ModelT = TypeVar("ModelT", bound=BaseModel)


class KeyInfo(_Model):
    id: int
    name: str
    prefix: str
    admin: bool = False


class SessionInfo(_Model):
    """A studio session the API opened (POST /api/sessions): the browser's cookie holds ``session``, never a key."""

    session: str
    expires_at: datetime
    key_id: int
    name: str


class ApiError(Exception):
    """A failed API call, with a message fit for a user: what went wrong and, where the API says, where."""

    def __init__(self, message: str, status_code: int | None = None, details: Iterable[str] = ()) -> None:
        super().__init__(message)
        self.message = message
        self.status_code = status_code
        self.details = list(details)

    def __str__(self) -> str:
        return self.message


def _clip(text: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _validation_item(item: Any) -> str:
    """``{"loc": ["body", "config", "steps"], "msg": "..."}`` -> ``config.steps: ...``."""
    if not isinstance(item, dict):
        return str(item)
    location = [str(part) for part in item.get("loc", []) if part not in ("body", "query", "path")]
    message = str(item.get("msg", "invalid value"))
    message = message.removeprefix("Value error, ")
    return f"{'.'.join(location)}: {message}" if location else message


def error_from_response(response: httpx.Response) -> ApiError:
    """Turn any error answer of the API (FastAPI's shapes, dataset issue lists, or plain text) into an ApiError."""
    status = response.status_code
    try:
        body = response.json()
    except ValueError:
        body = None
    details: list[str] = []
    if isinstance(body, dict):
        detail = body.get("detail")
        if isinstance(detail, list):
            details = [_validation_item(item) for item in detail]
            headline = "; ".join(details[:5]) + (f" (and {len(details) - 5} more)" if len(details) > 5 else "")
        elif detail is not None:
            headline = str(detail)
        else:
            headline = json.dumps(body)
        issues = body.get("issues")
        if isinstance(issues, list):  # a rejected dataset lists its problems per line
            details = [
                f"line {i.get('line')}: {i.get('field')}: {i.get('message')}" for i in issues if isinstance(i, dict)
            ]
            headline += ": " + "; ".join(details[:5])
    else:
        headline = response.text.strip() or response.reason_phrase
    if status == 401:
        headline = f"not authorised ({headline})"
    return ApiError(f"{_clip(headline)} [HTTP {status}]", status_code=status, details=details)


def parse_sse(lines: Iterable[str]) -> Iterator[tuple[str, Any]]:
    """(event name, JSON data) of each event in a text/event-stream; comments and id-only blocks are skipped."""
    name, data = "message", []
    for line in lines:
        if not line:
            if data:
                yield name, json.loads("\n".join(data))
            name, data = "message", []
        elif line.startswith("event:"):
            name = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))
    if data:
        yield name, json.loads("\n".join(data))


def apply_change(job: Job, change: dict[str, Any]) -> Job:
    """``job`` with a ``change`` event's fields (the ones that changed, each whole) put in."""
    return Job.model_validate({**job.model_dump(mode="json"), **change})


class VopdClient:
    """One API base URL and one key; thread-safe (httpx.Client is), so one instance may serve every UI session."""

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout_s, transport=transport)
        self._names: tuple[float, dict[str, str]] | None = None  # (fetched at, id -> name)
        self._names_lock = threading.Lock()

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> VopdClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ plumbing
    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TimeoutException as error:
            raise ApiError(f"the API at {self.base_url} did not answer {method} {path} in time") from error
        except httpx.HTTPError as error:
            raise ApiError(f"cannot reach the API at {self.base_url}: {error}") from error
        if response.is_error:
            raise error_from_response(response)
        return response

    def _get_json(self, path: str, model: type[ModelT], **kwargs: Any) -> ModelT:
        return self._parse(self._request("GET", path, **kwargs), model)

    @staticmethod
    def _parse(response: httpx.Response, model: type[ModelT]) -> ModelT:
        try:
            return model.model_validate(response.json())
        except (ValueError, ValidationError) as error:
            raise ApiError(f"unexpected answer from {response.request.url.path}: {_clip(str(error), 200)}") from error

    # ------------------------------------------------------------------ health, models, datasets
    def health(self) -> Health:
        return self._get_json("/api/health", Health)

    def me(self) -> KeyInfo:
        """Whose key this client sends (``/api/keys/me``): the studio shows who is signed in."""
        return self._get_json("/api/keys/me", KeyInfo)

    def open_session(self, code: str | None = None) -> SessionInfo:
        """A new session: for a one-time sign-in ``code`` when given, else for this client's API key."""
        body = {"code": code} if code is not None else None
        return self._parse(self._request("POST", "/api/sessions", json=body), SessionInfo)

    def close_session(self) -> None:
        """Sign-out: ends this client's session (its Bearer credential) on the server."""
        self._request("DELETE", "/api/sessions/current")

    def models(self) -> list[ModelInfo]:
        return self._get_json("/api/models", _ModelList).items

    def datasets(self) -> list[Dataset]:
        items = self._get_json("/api/datasets", _DatasetList).items
        with self._names_lock:
            self._names = (time.monotonic(), {d.id: d.name for d in items})
        return items

    def dataset_names(self) -> dict[str, str]:
        """id -> name of every dataset this key sees, reused for DATASET_NAMES_TTL_S (the job table and header show
        names on every poll tick); an upload or a synthetic set made through this client refreshes it at once."""
        with self._names_lock:
            cached = self._names
        if cached is not None and time.monotonic() - cached[0] < DATASET_NAMES_TTL_S:
            return cached[1]
        try:
            self.datasets()
        except ApiError:  # names are a courtesy: where they cannot be read, the ids are shown as before
            return cached[1] if cached is not None else {}
        with self._names_lock:
            return self._names[1] if self._names is not None else {}

    def upload_dataset(self, path: Path, name: str | None = None) -> Dataset:
        """POST /api/datasets: a .zip (data.jsonl + images, or Parquet files), a .jsonl with base64 images or a
        .parquet. A rejected dataset raises ApiError whose ``details`` are the API's per-line issues."""
        form = {"name": name} if name and name.strip() else None
        with path.open("rb") as handle:
            response = self._request(
                "POST", "/api/datasets", files={"file": (path.name, handle)}, data=form, timeout=DATASET_TIMEOUT_S
            )
        self._names = None
        return self._parse(response, Dataset)

    def make_synthetic_dataset(self, n: int, seed: int, box: bool, name: str | None = None) -> Dataset:
        """POST /api/datasets/synthetic: a synthetic set of ``n`` items drawn on the server, as ``vopd synth``."""
        body: dict[str, Any] = {"n": n, "seed": seed, "box": box}
        if name and name.strip():
            body["name"] = name.strip()
        response = self._request("POST", "/api/datasets/synthetic", json=body, timeout=DATASET_TIMEOUT_S)
        self._names = None
        return self._parse(response, Dataset)

    def benchmarks(self) -> BenchmarkFolderList:
        """The published suites placed in the server's benchmarks folder."""
        return self._get_json("/api/benchmarks", BenchmarkFolderList)

    def samples(
        self, dataset_id: str, offset: int = 0, limit: int = 8, thumbnail: int = 320, original: bool = False
    ) -> SamplePage:
        params: dict[str, Any] = {"offset": offset, "limit": limit, "thumbnail": thumbnail}
        if original:
            params["original"] = "true"
        return self._get_json(f"/api/datasets/{dataset_id}/samples", SamplePage, params=params)

    # ------------------------------------------------------------------ jobs
    def submit_job(
        self, kind: Literal["train", "eval"], config: dict[str, Any], resources: dict[str, int] | None = None
    ) -> Job:
        body: dict[str, Any] = {"kind": kind, "config": config}
        if resources:
            body["resources"] = resources
        return self._parse(self._request("POST", "/api/jobs", json=body), Job)

    def plan_job(
        self, config: dict[str, Any], resources: dict[str, int] | None = None, device_memory: str | None = None
    ) -> JobPlan:
        """The memory plan of a train job's config, nothing queued (the model is read from its config.json)."""
        body: dict[str, Any] = {"kind": "train", "config": config}
        if resources:
            body["resources"] = resources
        if device_memory:
            body["device_memory"] = device_memory
        return self._parse(self._request("POST", "/api/jobs/plan", json=body), JobPlan)

    def jobs(self, status: str | None = None, kind: str | None = None, limit: int = 50, offset: int = 0) -> JobPage:
        params: dict[str, Any] = {"limit": limit, "offset": offset}
        if status:
            params["status"] = status
        if kind:
            params["kind"] = kind
        return self._get_json("/api/jobs", JobPage, params=params)

    def job(self, job_id: int) -> Job:
        return self._get_json(f"/api/jobs/{job_id}", Job)

    def metrics(self, job_id: int, since: int = 0) -> MetricPage:
        return self._get_json(f"/api/jobs/{job_id}/metrics", MetricPage, params={"since": since})

    def logs(self, job_id: int, since: int = 0) -> LogPage:
        return self._get_json(f"/api/jobs/{job_id}/logs", LogPage, params={"since": since})

    def job_events(self, job_id: int) -> Iterator[tuple[str, Any]]:
        """The job's server-sent events as (name, value) until the stream ends: ``status`` and ``change`` both give
        the whole job (a change's fields merged into the job held, ``apply_change``), ``metric`` a Metric, ``log`` a
        LogLine, ``end`` its dict. The studio polls instead; scripts and tests read the stream through this."""
        job: Job | None = None
        try:
            with self._http.stream("GET", f"/api/jobs/{job_id}/events", timeout=None) as response:
                if response.is_error:
                    response.read()
                    raise error_from_response(response)
                for name, data in parse_sse(response.iter_lines()):
                    if name == "status":
                        job = Job.model_validate(data)
                        yield name, job
                    elif name == "change" and job is not None:
                        job = apply_change(job, data)
                        yield name, job
                    elif name == "metric":
                        yield name, Metric.model_validate(data)
                    elif name == "log":
                        yield name, LogLine.model_validate(data)
                    else:
                        yield name, data
        except httpx.HTTPError as error:
            raise ApiError(f"the event stream of job {job_id} broke: {error}") from error

    def cancel(self, job_id: int) -> Job:
        return self._parse(self._request("POST", f"/api/jobs/{job_id}/cancel"), Job)

    def resume(self, job_id: int) -> Job:
        return self._parse(self._request("POST", f"/api/jobs/{job_id}/resume"), Job)

    def artifacts(self, job_id: int) -> list[Artifact]:
        return self._get_json(f"/api/jobs/{job_id}/artifacts", _ArtifactList).items

    def artifact_url(self, job_id: int, name: str) -> str:
        return f"{self.base_url}/api/jobs/{job_id}/artifacts/{name}"

    def download_artifact(self, job_id: int, name: str, target_dir: Path) -> Path:
        """Stream an artifact (folders arrive as zip archives) into ``target_dir``; returns the file written."""
        target_dir.mkdir(parents=True, exist_ok=True)
        path = f"/api/jobs/{job_id}/artifacts/{name}"
        try:
            with self._http.stream("GET", path, timeout=None) as response:
                if response.is_error:
                    response.read()
                    raise error_from_response(response)
                filename = response.headers.get("content-disposition", "").rpartition("filename=")[2].strip('"')
                target = target_dir / (filename or Path(name).name or "artifact")
                with target.open("wb") as handle:
                    for chunk in response.iter_bytes():
                        handle.write(chunk)
        except httpx.HTTPError as error:
            raise ApiError(f"download of {name!r} from job {job_id} failed: {error}") from error
        return target

    def artifact_text(self, job_id: int, name: str) -> str:
        return self._request("GET", f"/api/jobs/{job_id}/artifacts/{name}").text

    # ------------------------------------------------------------------ inspect
    def inspect(self, request: dict[str, Any]) -> InspectResult:
        """``request`` is an InspectRequest body: image_base64 (or dataset + sample), question, bbox, model, ..."""
        response = self._request("POST", "/api/inspect", json=request, timeout=INSPECT_TIMEOUT_S)
        return self._parse(response, InspectResult)


class _ModelList(_Model):
    items: list[ModelInfo]


class _DatasetList(_Model):
    items: list[Dataset]


class BenchmarkFolder(_Model):
    suite: str
    data: str


class BenchmarkFolderList(_Model):
    items: list[BenchmarkFolder]
    folder: str


class _ArtifactList(_Model):
    items: list[Artifact]
