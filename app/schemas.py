"""Request and response bodies of the REST API: what clients see, documented in /docs.

Job bodies reuse the library's own config models, so the JSON a script posts is exactly what ``vopd train
--config`` reads.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from app.responses import FieldError
from vopd.config import EvalConfig, InspectConfig, TrainConfig, merge_settings, recipe

JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]
JobKind = Literal["train", "eval"]


class _Out(BaseModel):
    model_config = ConfigDict(from_attributes=True)


# --------------------------------------------------------------------------- jobs
class Resources(BaseModel):
    """What a job needs from the worker that runs it."""

    model_config = ConfigDict(extra="forbid")

    gpus: int = Field(
        1,
        ge=1,
        le=64,
        description=(
            "Devices (processes) the job trains on, on each machine; only a worker with at least this many takes it "
            "(`vopd worker --gpus N`). More than one process means runtime.strategy ddp unless the config says fsdp; "
            "batch_size must be a multiple of gpus x nodes."
        ),
    )
    nodes: int = Field(
        1,
        ge=1,
        le=64,
        description=(
            "Machines the job trains on, gpus processes on each: only a node group of exactly this many machines "
            "takes it (`vopd worker --nodes M --node-rank K --master-addr HOST` on each)."
        ),
    )


class TrainJobCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt top-level key is an error, as inside config

    kind: Literal["train"]
    recipe: str | None = Field(
        None,
        description=(
            "A named recipe (paper, tiny-world, tiny-cpu) that config is merged over, as `vopd train --preset` does: "
            "config then only needs what differs, e.g. model, dataset and steps."
        ),
    )
    config: TrainConfig = Field(description="config.model: a name from GET /api/models; config.dataset: a dataset id.")
    queue: str | None = Field(
        None,
        min_length=1,
        max_length=100,
        description=(
            "Worker queue (one per GPU type), one of the server's (VOPD_QUEUE, VOPD_QUEUES; any other is a 422 that "
            "lists them); "
            "default: VOPD_QUEUE."
        ),
    )
    resources: Resources = Field(
        default_factory=Resources, description='Devices the job needs, e.g. {"gpus": 4} or {"gpus": 8, "nodes": 2}.'
    )

    @model_validator(mode="before")
    @classmethod
    def _merge_recipe(cls, data: Any) -> Any:
        """Merge config over the named recipe before it is validated (a partial config is complete only then)."""
        if isinstance(data, dict) and data.get("recipe") is not None and isinstance(data.get("config"), dict):
            if not isinstance(data["recipe"], str):
                raise ValueError("recipe must be a recipe name")
            data = {**data, "config": merge_settings(recipe(data["recipe"]), data["config"])}
        return data

    @model_validator(mode="after")
    def _processes_share_the_prompts(self) -> TrainJobCreate:
        gpus, nodes = self.resources.gpus, self.resources.nodes
        processes = gpus * nodes
        if self.config.batch_size % processes:
            where = f"resources.gpus {gpus}" if nodes == 1 else f"resources.gpus x nodes ({gpus} x {nodes})"
            raise ValueError(
                f"config.batch_size {self.config.batch_size} must be a multiple of {where}: the "
                "processes share each micro-batch's prompts"
            )
        if processes == 1 and self.config.runtime.strategy != "single":
            raise ValueError("runtime.strategy ddp or fsdp needs resources.gpus (or nodes) of 2 or more")
        return self


class JobPlanRequest(TrainJobCreate):
    """A train job's body, planned instead of queued (POST /api/jobs/plan), with the device to plan for."""

    device_memory: str | None = Field(
        None,
        max_length=32,
        description=(
            "Memory of each device, e.g. 80GiB or 141GB; default: the API host's first GPU, else its host memory "
            "(the workers' devices may differ: name them)."
        ),
    )
    device_type: Literal["cuda", "cpu"] | None = Field(
        None, description="cuda plans bf16 compute copies and a CUDA allowance; default: from config.runtime.device."
    )
    prompt_tokens: int | None = Field(
        None, ge=1, le=1_000_000, description="Plan with prompts of this many tokens (default: the processor's limit)."
    )


class JobPlanOut(BaseModel):
    """The memory plan of a train job: per-device bytes by term, whether it fits, the smallest changes that do."""

    fits: bool
    per_device_bytes: dict[str, int] = Field(
        description=(
            "masters, gradients, optimizer, teacher, compute_copies, rollout_engine, activations, runtime and total"
        )
    )
    device_memory_bytes: int
    host_bytes: dict[str, int] = Field(
        default_factory=dict,
        description=(
            "What each process keeps in the host's memory instead of the device's (the runtime.offload_* settings): "
            "masters, gradients, optimizer, teacher, as they apply, and total"
        ),
    )
    activations: dict[str, Any] = Field(description="with_checkpointing, without_checkpointing, peak_phase, phases")
    assumptions: dict[str, Any] = Field(description="world size, dtypes, rows, prompt and response tokens planned")
    suggestions: list[dict[str, Any]] = Field(
        description=(
            'Changes that make it fit, smallest first: {"set": {dotted field: value}, "total_bytes", "devices"?}'
        )
    )
    model: dict[str, Any] = Field(description="The model's shape, read from its config.json (no weight loaded).")
    table: str = Field(description="The plan as a short human table.")


class EvalJobCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: Literal["eval"]
    config: EvalConfig = Field(
        description=(
            "config.model: a name from GET /api/models; config.dataset: a dataset id, or instead config.benchmark "
            "(vstar, zoombench, hrbench-4k, hrbench-8k, mme-realworld, mme-realworld-cn, mme-realworld-lite, mmstar, "
            "pope-adversarial, pope-popular, pope-random, cv-bench, mmvp, visualprobe) with config.data, a folder "
            "inside VOPD_HOME/benchmarks; config.judge.url must be the server's VOPD_JUDGE_URL."
        )
    )
    queue: str | None = Field(
        None,
        min_length=1,
        max_length=100,
        description=(
            "Worker queue (one per GPU type), one of the server's (VOPD_QUEUE, VOPD_QUEUES; any other is a 422 that "
            "lists them); "
            "default: VOPD_QUEUE."
        ),
    )


JobCreate = Annotated[TrainJobCreate | EvalJobCreate, Field(discriminator="kind")]


class JobOut(_Out):
    id: int
    kind: JobKind
    status: JobStatus
    queue: str
    gpus: int = Field(1, description="Devices (processes) the job runs on, on each machine.")
    nodes: int = Field(1, description="Machines the job runs on.")
    model_job_id: int | None = Field(
        None, description="When config.model names a job's weights (job-N/final or job-N/step-M): that job's id."
    )
    model_step: int | None = Field(None, description="...and that checkpoint's step; None for the final weights.")
    queue_position: int | None = Field(None, description="1 = next to run; only while queued.")
    progress: float = Field(description="Fraction done, 0..1.")
    step: int = Field(description="Steps (train) or samples (eval) done.")
    total_steps: int | None
    unit: str
    eta_seconds: float | None = Field(None, description="Estimated time left while running.")
    latest_metrics: dict[str, Any] | None
    result: dict[str, Any] | None
    engine: Literal["hf", "vllm"] | None = Field(
        None,
        description=(
            "The engine that generates, as the worker resolved the job's setting (train: rollout.engine, eval: "
            "engine; auto is decided by the worker's device and whether vLLM is installed): from the latest step's "
            "metrics (rollout/engine) or the evaluation's result. None until the first step (or the result)."
        ),
    )
    error: str | None
    cancel_requested: bool
    attempts: int
    worker: str | None
    config: dict[str, Any] = Field(description="The config as submitted.")
    resolved_config: dict[str, Any] = Field(
        description=(
            "The config the worker runs, names resolved to paths; paths are shown relative to the server's home "
            "($VOPD_HOME/models/tiny), any other server path as <server path>."
        )
    )
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    heartbeat_at: datetime | None
    warnings: list[str] = Field(
        default_factory=list,
        description=(
            "Only in the answer to a submit or resume: why the job may wait (no live worker serves its queue, the "
            "broker is unreachable and the job will be published once it is back)."
        ),
    )


class JobPage(BaseModel):
    items: list[JobOut]
    total: int
    limit: int
    offset: int


class MetricOut(_Out):
    id: int
    step: int
    data: dict[str, Any]
    created_at: datetime


class MetricPage(BaseModel):
    items: list[MetricOut]
    next_since: int = Field(description="Pass as ?since= to get only newer rows.")


class LogOut(_Out):
    id: int
    level: str
    message: str
    created_at: datetime


class LogPage(BaseModel):
    items: list[LogOut]
    next_since: int = Field(description="Pass as ?since= to get only newer lines.")


class ArtifactOut(BaseModel):
    name: str = Field(description="Download with GET /api/jobs/{id}/artifacts/{name}.")
    kind: Literal["model", "checkpoint", "records", "metrics", "file", "tensorboard", "mlflow"] = Field(
        description="tensorboard / mlflow: the run's tracker logs (TrainConfig.report_to), for their own viewers."
    )
    is_folder: bool = Field(description="Folders download as a zip archive.")
    size_bytes: int
    step: int | None = None
    model_name: str | None = Field(None, description="Usable as config.model (models and checkpoints).")


class ArtifactList(BaseModel):
    items: list[ArtifactOut]


# --------------------------------------------------------------------------- datasets
class DatasetOut(_Out):
    id: str = Field(description="Usable as config.dataset.")
    name: str
    n_samples: int
    size_bytes: int
    shared: bool = Field(description="Built in and visible to every key.")
    created_at: datetime


class DatasetList(BaseModel):
    items: list[DatasetOut]


class SyntheticDatasetCreate(BaseModel):
    """A synthetic fine-detail set built on the server with ``vopd synth``'s generator (deterministic by seed)."""

    model_config = ConfigDict(extra="forbid")

    n: int = Field(
        64, ge=1, le=100_000, description="Number of items; at most VOPD_MAX_SYNTH_ITEMS (2,000 by default)."
    )
    seed: int = Field(0, ge=0, le=2**31 - 1, description="The same seed gives the same images and records.")
    box: bool = Field(
        True,
        description=(
            "true: each item has its evidence box (the box world); false: the box-free world, whose question names "
            "the target by its colour and whose box is kept for evaluation only (`vopd synth --no-box`)."
        ),
    )
    name: str | None = Field(
        None, max_length=200, description="Shown instead of the id; by default one that says size, seed and world."
    )


class DatasetIssueOut(BaseModel):
    line: int
    field: str
    message: str


class DatasetRejected(BaseModel):
    """Every 422 of an upload: a dataset that does not load lists each problem in ``issues``; an upload refused
    before that (not a zip, a zip entry outside the folder) has only ``detail``, as has a malformed request (whose
    ``detail`` is then the list of field errors)."""

    detail: str | list[FieldError]
    issues: list[DatasetIssueOut] = Field(default_factory=list, description="Per line of data.jsonl: what is wrong.")


class SampleOut(BaseModel):
    index: int
    id: str
    question: str
    options: list[str] | None
    answer: str | None
    bbox: tuple[float, float, float, float] | None
    hidden_bbox: tuple[float, float, float, float] | None = Field(
        None,
        description=(
            "Where the target is in a set without evidence boxes (the box-free synthetic world): for evaluation and "
            "previews only, never shown to a model in training."
        ),
    )
    width: int | None = Field(None, description="The sample's own image width in px (boxes are in its pixels).")
    height: int | None = Field(None, description="The sample's own image height in px.")
    student_text: str
    teacher_text: str
    student_image: str = Field(description="Thumbnail of the student view (red box) as a data: URL.")
    teacher_image: str = Field(description="Thumbnail of the teacher view (upscaled crop) as a data: URL.")
    image: str | None = Field(
        None,
        description=(
            "With ?original=true: the sample's own image (no box drawn, original pixels, PNG) as a data: URL, so a "
            "client can draw a box on it in the image's own coordinates."
        ),
    )
    evidence: Literal["box", "search"] = Field(
        "box",
        description=(
            "box: the teacher's crop is cut from the sample's box (or given); search: the sample has no box, the "
            "model finds its crop at training time (vopd.evidence) and teacher_image shows the whole image searched."
        ),
    )


class SamplePage(BaseModel):
    items: list[SampleOut]
    total: int
    offset: int
    limit: int


# --------------------------------------------------------------------------- models
class ModelOut(BaseModel):
    name: str = Field(description="Usable as config.model.")
    kind: Literal["base", "final", "checkpoint", "run"] = Field(
        description=(
            "base: a folder under VOPD_HOME/models; final / checkpoint: one of your training jobs' weights; run: a "
            "CLI run's final model or checkpoint under VOPD_HOME/runs (step set for a checkpoint)."
        )
    )
    job_id: int | None = None
    step: int | None = None


class ModelList(BaseModel):
    items: list[ModelOut]


class BenchmarkFolderOut(BaseModel):
    suite: str = Field(description="The suite's name, usable as an eval job's config.benchmark.")
    data: str = Field(description="The entry inside the benchmarks folder, usable as config.data.")


class BenchmarkFolderList(BaseModel):
    items: list[BenchmarkFolderOut]
    folder: str = Field(description="Where an administrator places suites, one entry named after each suite.")


# --------------------------------------------------------------------------- inspect
class InspectRequest(InspectConfig):
    """InspectConfig plus where the image comes from: ``image_base64`` (PNG/JPEG bytes, base64) or a dataset
    sample (``dataset`` + ``sample`` index). With a sample, question, options and bbox default to the sample's."""

    question: str | None = Field(None, min_length=1, description="Defaults to the sample's question.")
    bbox: tuple[float, float, float, float] | None = Field(None, description="[x0, y0, x1, y1]; default: sample's.")
    image_base64: str | None = Field(None, description="The image file's bytes, base64 encoded.")
    dataset: str | None = Field(None, description="Dataset id of the sample to inspect.")
    sample: int | None = Field(None, ge=0, description="Index of the sample in the dataset.")

    @field_validator("bbox")
    @classmethod
    def _box_order(cls, box: tuple[float, float, float, float] | None) -> tuple[float, float, float, float] | None:
        return None if box is None else InspectConfig._box_order(box)


# --------------------------------------------------------------------------- health and identity
class ComponentHealth(BaseModel):
    ok: bool
    detail: str


class WorkerOut(_Out):
    name: str
    queue: str
    gpus: int = Field(1, description="Devices it may give one job (jobs of up to this many resources.gpus).")
    nodes: int = Field(1, description="Machines in its node group (jobs of exactly this many resources.nodes).")
    node_rank: int = Field(0, description="Its place in the group: 0 takes the group's jobs.")
    last_seen_at: datetime


class LocalWorkerOut(BaseModel):
    pid: int | None = Field(description="Process id of the current local worker.")
    alive: bool
    restarts: int = Field(description="How often it was started again after it died.")
    last_exit_code: int | None = Field(description="How the last one ended (negative: killed by that signal).")
    next_start_in_s: float | None = Field(description="While dead: the back-off before the next start.")


class HealthOut(BaseModel):
    status: Literal["ok", "starting", "degraded"] = Field(
        description="ok: database, broker and a worker answer; starting: the local worker is up but has not reported "
        "yet (jobs wait in the queue); degraded: something is down."
    )
    database: ComponentHealth
    broker: ComponentHealth
    workers: list[WorkerOut] = Field(description="Workers that reported in the last few heartbeats.")
    local_worker: LocalWorkerOut | None = Field(
        None, description="The worker `vopd serve` supervises (restarted when it dies); None when there is none."
    )


class MeOut(BaseModel):
    id: int
    name: str
