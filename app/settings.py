"""Service settings from the environment, shared by the API, the worker and the CLI.

Everything lives under ``VOPD_HOME`` unless ``DATABASE_URL`` / ``REDIS_URL`` point elsewhere, so a newcomer's
``vopd serve`` needs no server at all (SQLite for the data, kombu's SQLAlchemy transport on SQLite as broker).
"""

from __future__ import annotations

import re
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

DEFAULT_QUEUE = "vopd"
# A queue name is also a Redis key (the list of its messages) beside the keys kombu and Celery keep for themselves in
# the same database; a queue that takes one of their names breaks every worker (docs/reliability.md). No dots either:
# the server derives the queues of multi-device jobs and node groups from a name with dots (``app.queueing``), and
# only it may.
QUEUE_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
RESERVED_QUEUE_NAMES = frozenset({"unacked", "unacked_index", "unacked_mutex", "celery", "celeryev"})
RESERVED_QUEUE_PREFIXES = ("_", "celery", "kombu", "unacked")


def queue_name_problem(name: str) -> str | None:
    """Why ``name`` cannot be a configured queue, or None when it can."""
    if not QUEUE_NAME.match(name):
        return f"queue name {name!r} must be 1-64 letters, digits, '_' or '-' (no dots: those name derived queues)"
    lowered = name.lower()
    if lowered in RESERVED_QUEUE_NAMES or lowered.startswith(RESERVED_QUEUE_PREFIXES):
        return (
            f"queue name {name!r} is reserved: the broker keeps its own bookkeeping under names like it "
            f"({', '.join(sorted(RESERVED_QUEUE_NAMES))}, and names starting with {', '.join(RESERVED_QUEUE_PREFIXES)})"
        )
    return None


class Settings(BaseSettings):
    """Validated once at start; a bad value fails loudly instead of surfacing as a puzzling runtime error."""

    model_config = SettingsConfigDict(env_prefix="VOPD_", extra="ignore", validate_by_name=True)

    home: Path = Field(
        Path("~/.vopd"),
        validation_alias="VOPD_HOME",
        description="Root of all local state: database, broker, artifacts, datasets, models.",
    )
    database_url_env: str | None = Field(
        None,
        validation_alias="DATABASE_URL",
        description="SQLAlchemy URL; default sqlite:///$VOPD_HOME/vopd.db. postgresql:// uses psycopg 3.",
    )
    redis_url: str | None = Field(
        None,
        validation_alias="REDIS_URL",
        description="Celery broker; absent = the embedded SQLite broker at $VOPD_HOME/broker.db.",
    )
    queue: str = Field(
        DEFAULT_QUEUE,
        min_length=1,
        description="Queue a worker consumes (one per GPU type), and the API's default queue for jobs that name none.",
    )
    queues: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description=(
            'Further queues (comma-separated) that jobs may name with "queue", beside VOPD_QUEUE: one per GPU type '
            "whose workers run with that VOPD_QUEUE. Any other name is refused (422), so a client cannot write to a "
            "broker key of its choosing."
        ),
    )
    nodes: int = Field(
        1,
        ge=1,
        le=64,
        description=(
            "Machines in this worker's node group: with M > 1, the group's workers together run jobs that ask for "
            "resources.nodes M, each machine starting resources.gpus processes under torchrun (one group per queue)."
        ),
    )
    node_rank: int = Field(
        0,
        ge=0,
        description=(
            "This machine's place in its node group: 0 takes the group's jobs and hosts the rendezvous; 1 .. M-1 only "
            "start their share of the processes when machine 0 asks."
        ),
    )
    master_addr: str = Field(
        "127.0.0.1",
        min_length=1,
        description="Address of the node group's machine 0, as every machine of the group reaches it (torchrun).",
    )
    master_port: int = Field(29500, ge=1, le=65535, description="Port of the group's rendezvous on machine 0.")
    judge_url: str | None = Field(
        None,
        description=(
            "The one OpenAI-compatible endpoint (base URL, before /chat/completions) that eval jobs may name as their "
            "judge. The worker sends its VOPD_JUDGE_API_KEY there, so a job may not choose another address; absent = "
            "jobs cannot ask for a judge."
        ),
    )
    max_upload_mb: float = Field(1024.0, gt=0, description="Largest accepted dataset upload.")
    max_synth_items: int = Field(
        2000,
        ge=1,
        le=100_000,
        description=(
            "Most items of a synthetic set built by POST /api/datasets/synthetic. It is built within the request "
            "(about 5 ms and 22 kB an item on a busy 2-core machine: 2,000 items in 11 s and 42 MB); larger sets come "
            "from `vopd synth` and an upload."
        ),
    )
    max_unzipped_mb: float = Field(4096.0, gt=0, description="Largest total uncompressed size of an uploaded zip.")
    max_zip_entries: int = Field(200_000, ge=1, description="Most files an uploaded zip may hold.")
    max_zip_ratio: float = Field(
        200.0, gt=1, description="Largest compression ratio of one zip entry (ratios beyond it are zip bombs)."
    )
    model_cache_size: int = Field(2, ge=1, description="Loaded models kept for /api/inspect (LRU).")
    inference_threads: int = Field(
        1,
        ge=0,
        description=(
            "CPU threads torch uses for /api/inspect in the API process (0 = torch's default, all cores). One thread "
            "leaves the other cores to requests and the worker; with two threads on two busy shared cores, inspect "
            "was measured 15x slower (0.44 s vs 7 s) from OpenMP threads spinning on each other."
        ),
    )
    progress_interval_s: float = Field(0.5, ge=0, description="Least time between two progress writes of a job.")
    heartbeat_interval_s: float = Field(10.0, gt=0, description="How often a running job and a worker say alive.")
    stale_after_s: float = Field(
        120.0, gt=0, description="A running job silent this long is orphaned and requeued (resumes)."
    )
    reaper_interval_s: float = Field(
        30.0, gt=0, description="How often the API looks for orphaned jobs and queued jobs whose message is gone."
    )
    republish_after_s: float = Field(
        10.0,
        ge=0,
        description=(
            "A job queued this long whose message the broker no longer holds (a flushed or restarted Redis, a "
            "publish that failed) is published again by the reaper; duplicates are harmless (the claim is atomic)."
        ),
    )
    max_attempts: int = Field(
        3,
        ge=1,
        le=100,
        description=(
            "Starts a job gets per submission or resume: one whose process dies (out of memory, killed) this many "
            "times fails with the reason instead of being delivered again forever."
        ),
    )
    worker_restart_max_s: float = Field(
        30.0, gt=0, description="`vopd serve` restarts a dead local worker after 1 s, doubling up to this back-off."
    )
    embedded_poll_s: float = Field(0.25, gt=0, description="Polling interval of the embedded SQLite broker.")
    events_poll_s: float = Field(
        0.5,
        gt=0,
        le=5,
        description=(
            "How often /events looks for news in the database, and checks that the caller's key (or session) still "
            "stands: a stream of a revoked key or an ended session closes within one interval."
        ),
    )
    access_log: Literal["off", "errors", "all"] = Field(
        "errors",
        description=(
            "`vopd serve`'s access log: errors = only requests answered 4xx or 5xx (the default: a studio left open "
            "polls several times a second, and every line of it buried the sign-in link), all = every request, "
            "off = none. Secrets are redacted from every line written (`--access-log` overrides it)."
        ),
    )
    session_ttl_hours: float = Field(
        168.0, gt=0, description="How long a studio sign-in (a server-side session in an HttpOnly cookie) lasts."
    )
    signin_code_ttl_s: float = Field(
        900.0,
        gt=0,
        le=86400,
        description="How long the one-time sign-in link `vopd serve` prints (or `vopd apikey signin-link`) stays good.",
    )
    secure_cookies: bool = Field(
        False,
        description=(
            "The deployment is HTTPS: the sign-in cookie is always `Secure`. Without it the cookie is `Secure` when "
            "the request came over HTTPS (or X-Forwarded-Proto says so from a proxy uvicorn trusts)."
        ),
    )
    # Limits that keep one request from starving the API (docs/reliability.md): each refusal names its setting.
    max_body_mb: float = Field(
        24.0, gt=0, description="Largest JSON request body (an inspect image travels base64 inside it); 413 beyond."
    )
    max_question_chars: int = Field(
        2000, ge=1, description="Longest question (and view hint) /api/inspect takes: prompt cost grows quadratically."
    )
    max_options: int = Field(26, ge=1, description="Most multiple-choice options /api/inspect takes (A..Z).")
    max_option_chars: int = Field(200, ge=1, description="Longest single option /api/inspect takes.")
    max_inspect_image_mb: float = Field(16.0, gt=0, description="Largest image file /api/inspect takes.")
    max_inspect_image_pixels: int = Field(
        16_000_000, ge=28 * 28, description="Most pixels (width x height) of an image /api/inspect takes."
    )
    max_inspect_new_tokens: int = Field(256, ge=1, description="Largest max_new_tokens /api/inspect takes.")
    inspect_timeout_s: float = Field(
        60.0, gt=0, description="Time budget of one inspect, queueing included; past it the work stops and 504."
    )
    inspect_queue_size: int = Field(
        8, ge=1, description="Inspects waiting for the inference thread; beyond it 503 with Retry-After."
    )
    demo_train_items: int = Field(
        4800,
        ge=1,
        description=(
            "Items of the synthetic training set built and registered on first start (`synth-train`, synth seed 1): "
            "the default recipe's 300 steps of 16 prompts see each once. 4,800 items take about 20 s and 115 MB."
        ),
    )
    held_out_items: int = Field(
        400,
        ge=1,
        description=(
            "Items of the held-out set registered beside it (`synth-heldout`, synth seed 2, never trained on): the "
            "Evaluate tab's default and the base-vs-trained comparison's set. 400 items take about 2 s and 10 MB."
        ),
    )
    user_quota_mb: float = Field(
        10240.0,
        gt=0,
        description=(
            "Storage one key may fill: its datasets as unpacked, everything its jobs write (checkpoints, final "
            "folders, records, logs, download archives). Beyond it an upload is a 413, a new or resumed job a 429, "
            "and a running job fails at its next check, keeping its newest checkpoint."
        ),
    )

    @field_validator("home", mode="after")
    @classmethod
    def _absolute_home(cls, home: Path) -> Path:
        return home.expanduser().resolve()

    @field_validator("queues", mode="before")
    @classmethod
    def _split_queues(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("queue")
    @classmethod
    def _queue_name(cls, name: str) -> str:
        problem = queue_name_problem(name)
        if problem:
            raise ValueError(problem)
        return name

    @field_validator("queues")
    @classmethod
    def _queue_names(cls, names: list[str]) -> list[str]:
        for name in names:
            problem = queue_name_problem(name)
            if problem:
                raise ValueError(problem)
        return names

    @property
    def allowed_queues(self) -> list[str]:
        """The queue names a job may ask for: VOPD_QUEUE first, then VOPD_QUEUES."""
        return list(dict.fromkeys([self.queue, *self.queues]))

    @model_validator(mode="after")
    def _node_rank_in_group(self) -> Settings:
        if self.node_rank >= self.nodes:
            raise ValueError(f"node_rank {self.node_rank} must be below nodes {self.nodes} (machines count from 0)")
        return self

    @cached_property
    def database_url(self) -> str:
        """SQLAlchemy URL, with bare ``postgresql://`` mapped to psycopg 3 (the installed driver)."""
        url = self.database_url_env or f"sqlite:///{self.home / 'vopd.db'}"
        for prefix in ("postgresql://", "postgres://"):
            if url.startswith(prefix):
                return "postgresql+psycopg://" + url[len(prefix) :]
        return url

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")

    @property
    def broker_url(self) -> str:
        """Redis when configured, else a SQLite file read by ``app.embedded_broker`` (kombu's SQLAlchemy
        transport with a faster poll)."""
        return self.redis_url or f"sqlite:///{self.home / 'broker.db'}"

    @property
    def embedded_broker(self) -> bool:
        return self.redis_url is None

    @property
    def models_dir(self) -> Path:
        return self.home / "models"

    @property
    def datasets_dir(self) -> Path:
        return self.home / "datasets"

    @property
    def artifacts_dir(self) -> Path:
        return self.home / "artifacts"

    def job_dir(self, job_id: int) -> Path:
        return self.artifacts_dir / "jobs" / str(job_id)

    @property
    def local_key_file(self) -> Path:
        return self.home / "local_api_key"

    def ensure_dirs(self) -> None:
        for folder in (self.home, self.models_dir, self.datasets_dir, self.artifacts_dir / "jobs", self.home / "tmp"):
            folder.mkdir(parents=True, exist_ok=True)


def get_settings() -> Settings:
    """Fresh settings from the current environment (tests change the environment between sessions)."""
    return Settings()
