"""Jobs: the queue and history, and one job followed live (curves, log tail, cancel/resume, artifacts).

A timer polls the API every couple of seconds; metrics and logs are fetched incrementally with ``?since=`` and
accumulated in per-session state, so a long run costs one small request per kind of data per tick.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd

from frontend import render, strings
from frontend.client import Artifact, Job, Metric, VopdClient
from frontend.context import HELD_OUT_DATASET_ID, UiContext, readable_errors
from vopd.config import EvalConfig

POLL_INTERVAL_S = 2.0
MIN_STEP_AXIS = 10
LOG_LINES_KEPT = 500
ANY_STATUS = [strings.ANY, "queued", "running", "succeeded", "failed", "cancelled"]
ANY_KIND = [strings.ANY, "train", "eval"]


@dataclass
class JobView:
    """What this browser session has already fetched of one job."""

    job_id: int
    metrics: list[Metric] = field(default_factory=list)
    metric_since: int = 0
    logs: list[str] = field(default_factory=list)
    log_since: int = 0
    status: str | None = None
    evaluations: tuple[tuple[int, str], ...] = ()  # (id, status) of the evaluations its accuracy plot reads


@dataclass
class JobSnapshot:
    job: Job
    view: JobView
    new_metrics: bool
    new_logs: bool
    status_changed: bool
    artifacts: list[Artifact]
    eval_jobs: list[Job]
    evaluations_changed: bool = False
    names: dict[str, str] = field(default_factory=dict)  # dataset id -> name, for the header, table and plot


# What the four curves are drawn as: Gradio's native line plot, whose value may be its own PlotData (a dict).
_CURVE = gr.LinePlot(x="step", y="value", color="series", render=False)


def measured_value(frame: pd.DataFrame | None) -> dict[str, Any] | None:
    """A curve's plot value, its points drawn as points while some series has only one: Vega-Lite draws no line
    through a single point, which left a legend over an empty plot (an evaluation at one step, the first step)."""
    data = _CURVE.postprocess(frame)
    if data is None:
        return None
    if render.single_point_series(frame):
        data.mark = "point"
    return data.model_dump()


# ----------------------------------------------------------------------------- pure callbacks
def jobs_table(client: VopdClient, status: str | None, kind: str | None) -> pd.DataFrame:
    page = client.jobs(
        status=None if status in (None, strings.ANY) else status,
        kind=None if kind in (None, strings.ANY) else kind,
        limit=100,
    )
    return render.job_rows(page.items, client.dataset_names())


def parse_job_id(value: Any) -> int:
    try:
        job_id = int(value)
    except (TypeError, ValueError) as error:
        raise render.UiInputError(f"not a job id: {value!r}") from error
    if job_id < 1:
        raise render.UiInputError(f"not a job id: {value!r}")
    return job_id


def poll_job(client: VopdClient, view: JobView | None, job_id: int) -> JobSnapshot:
    """The job's row, plus only the metrics and log lines newer than what ``view`` holds."""
    if view is None or view.job_id != job_id:
        view = JobView(job_id)
    job = client.job(job_id)
    metrics = client.metrics(job_id, since=view.metric_since)
    logs = client.logs(job_id, since=view.log_since)
    if metrics.items:
        # A resume recomputes steps past its checkpoint: newer rows replace older ones for the same step.
        by_step = {m.step: m for m in view.metrics}
        by_step.update({m.step: m for m in metrics.items})
        view.metrics = [by_step[step] for step in sorted(by_step)]
    view.metric_since = metrics.next_since
    view.logs = (view.logs + [f"[{line.level}] {line.message}" for line in logs.items])[-LOG_LINES_KEPT:]
    view.log_since = logs.next_since
    status_changed = view.status != job.status
    view.status = job.status
    eval_jobs = client.jobs(kind="eval", limit=200).items if job.kind == "train" else []
    # An evaluation finishing after the job itself (base vs trained) changes the accuracy plot with no new metric.
    evaluations = tuple(
        (e.id, e.status) for e in eval_jobs if e.model_job_id == job.id or e.model_name == job.model_name
    )
    evaluations_changed = evaluations != view.evaluations
    view.evaluations = evaluations
    return JobSnapshot(
        job,
        view,
        bool(metrics.items),
        bool(logs.items),
        status_changed,
        client.artifacts(job_id),
        eval_jobs,
        evaluations_changed,
        client.dataset_names(),
    )


def poll_tick(
    client: VopdClient, view: JobView | None, status: str | None, kind: str | None
) -> tuple[JobSnapshot | None, pd.DataFrame]:
    """One timer tick: the open job first, then the table, so the table is never older than the job's header
    (fetched the other way round, a job ending between the two requests read "succeeded" above a "running" row)."""
    snapshot = poll_job(client, view, view.job_id) if view is not None else None
    return snapshot, jobs_table(client, status, kind)


def curves(snapshot: JobSnapshot) -> tuple[pd.DataFrame | None, ...]:
    """Loss, divergence, agreement and accuracy curves; None where there is nothing to draw yet."""
    frames = render.curve_frames(snapshot.view.metrics)
    accuracy = pd.concat(
        [frames["accuracy"], render.eval_accuracy_frame(snapshot.job, snapshot.eval_jobs, snapshot.names)],
        ignore_index=True,
    )
    return tuple(
        render.plot_value(frame) for frame in (frames["loss"], frames["divergence"], frames["agreement"], accuracy)
    )


def step_range(snapshot: JobSnapshot) -> list[float]:
    """The x range of every curve: step 0 to the run's last step, so a single point is not the axis' only label; at
    least MIN_STEP_AXIS steps wide, so the ticks are whole steps (over 0..2 they read 0.2, 0.4...)."""
    steps = [m.step for m in snapshot.view.metrics] + [snapshot.job.total_steps or 0, snapshot.job.step]
    return [0, max([*steps, MIN_STEP_AXIS])]


def plot_updates(snapshot: JobSnapshot) -> tuple[Any, ...]:
    """The four plots' values, on a shared x range (0 .. last step)."""
    x_lim = step_range(snapshot)
    return tuple(gr.update(value=measured_value(value), x_lim=x_lim) for value in curves(snapshot))


def accuracy_empty_note(snapshot: JobSnapshot) -> str:
    """Why the accuracy plot is empty, and what fills it; nothing once it has points."""
    if curves(snapshot)[3] is not None:
        return ""
    if snapshot.job.kind == "eval":
        return strings.ACCURACY_EMPTY_EVAL
    return strings.ACCURACY_EMPTY


def artifact_table(artifacts: list[Artifact]) -> pd.DataFrame:
    rows = [[a.name, a.kind, render.human_size(a.size_bytes), a.model_name or ""] for a in artifacts]
    return pd.DataFrame(rows, columns=strings.ARTIFACT_COLUMNS)


def can_cancel(job: Job) -> bool:
    return not job.is_terminal and not job.cancel_requested


def can_resume(job: Job) -> bool:
    return job.status in ("failed", "cancelled")


def download(client: VopdClient, job_id: int, name: str | None) -> str:
    if not name:
        raise render.UiInputError("choose an artifact to download")
    return str(client.download_artifact(job_id, name, Path(tempfile.mkdtemp(prefix="vopd-ui-"))))


def trained_model_name(job: Job) -> str:
    """The name under which a training job's final weights are offered (the API's ``job-N/final``)."""
    return str((job.result or {}).get("model") or f"job-{job.id}/final")


def can_compare(job: Job) -> bool:
    return job.kind == "train" and job.status == "succeeded"


def comparison_dataset(job: Job, dataset_ids: list[str], names: dict[str, str] | None = None) -> str:
    """Where to compare base and trained: the registered held-out set, or else the first set the job did not
    train on; never the training set itself (a gain there is memory, not the method)."""
    for dataset_id in [HELD_OUT_DATASET_ID, *dataset_ids]:
        if dataset_id in dataset_ids and dataset_id != job.dataset_id:
            return dataset_id
    raise render.UiInputError(strings.NO_HELD_OUT.format(dataset=render.dataset_label(job.dataset_id, names)))


def base_vs_trained_configs(job: Job, dataset_id: str) -> list[dict[str, Any]]:
    """Two EvalConfig bodies, the job's starting model and its trained weights on ``dataset_id``: every item,
    default decoding, the same as ``vopd eval --model M --dataset D``."""
    if not can_compare(job):
        raise render.UiInputError(strings.COMPARE_NEEDS_SUCCESS.format(id=job.id, status=job.status))
    return [
        EvalConfig(model=model, dataset=dataset_id).model_dump(mode="json", exclude_defaults=True, exclude={"output"})
        for model in (job.model_name, trained_model_name(job))
    ]


def submit_base_vs_trained(client: VopdClient, job: Job) -> list[Job]:
    datasets = client.datasets()
    dataset_id = comparison_dataset(job, [dataset.id for dataset in datasets], {d.id: d.name for d in datasets})
    return [client.submit_job("eval", body) for body in base_vs_trained_configs(job, dataset_id)]


def base_vs_trained_jobs(job: Job, eval_jobs: list[Job]) -> tuple[Job | None, Job | None]:
    """The newest evaluation of the trained weights on a set other than the training set, and the newest of the
    base on that same set (either None when absent)."""
    trained = next(
        (
            e
            for e in sorted(eval_jobs, key=lambda e: -e.id)
            if e.model_job_id == job.id
            and e.model_step is None
            and not e.benchmark
            and e.dataset_id
            and e.dataset_id != job.dataset_id
        ),
        None,
    )
    if trained is None:
        return None, None
    base = next(
        (
            e
            for e in sorted(eval_jobs, key=lambda e: -e.id)
            if e.model_job_id is None and e.model_name == job.model_name and e.dataset_id == trained.dataset_id
        ),
        None,
    )
    return base, trained


def base_vs_trained_markdown(job: Job, eval_jobs: list[Job], names: dict[str, str] | None = None) -> str:
    """Both models' accuracy on the held-out set side by side, and the gain; what to press when not yet run."""
    if job.kind != "train":
        return ""
    base, trained = base_vs_trained_jobs(job, eval_jobs)
    if trained is None:
        return strings.COMPARE_OFFER if can_compare(job) else ""

    def cells(role: str, evaluation: Job | None) -> str:
        if evaluation is None:
            return f"| {role} | `{job.model_name}` | not evaluated | | | |"
        result = evaluation.result or {}
        numbers = [render.percent(result.get(key)) for key in ("full_accuracy", "crop_accuracy")]
        state = evaluation.status if evaluation.status != "running" else f"running ({evaluation.progress:.0%})"
        return f"| {role} | `{evaluation.model_name}` | {state} | {numbers[0]} | {numbers[1]} | {result.get('n', '')} |"

    lines = [
        strings.COMPARE_TITLE.format(dataset=render.dataset_label(trained.dataset_id, names)),
        "",
        "| | model | status | full image | crop | n |",
        "|---|---|---|---|---|---|",
        cells("base", base),
        cells("trained", trained),
    ]
    before = (base.result or {}).get("full_accuracy") if base is not None else None
    after = (trained.result or {}).get("full_accuracy")
    if isinstance(before, int | float) and isinstance(after, int | float):
        lines += ["", strings.COMPARE_GAIN.format(points=100 * (after - before), before=before, after=after)]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- layout and wiring
@dataclass
class JobsTab:
    job_id: gr.Number
    on_show: Any
    open_job: Any  # the wired "open" function: (request, job id, view) -> outputs; other tabs chain to it
    open_inputs: list[Any]
    open_outputs: list[Any]
    table: gr.Dataframe
    refresh_table: Any
    table_inputs: list[Any]


def build_jobs_tab(ctx: UiContext) -> JobsTab:
    gr.Markdown(strings.JOBS_INTRO)
    view_state = gr.State(None)
    with gr.Row():
        status = gr.Dropdown(ANY_STATUS, value=strings.ANY, label=strings.STATUS_FILTER, min_width=120)
        kind = gr.Dropdown(ANY_KIND, value=strings.ANY, label=strings.KIND_FILTER, min_width=120)
        # No ``minimum``: an empty field reaches Python as 0 (it is an input of the timer and of opening the tab), and
        # Gradio would refuse it with a red "Value 0 is less than minimum value 1" toast. parse_job_id validates.
        job_id = gr.Number(label=strings.JOB_ID_LABEL, precision=0, min_width=120, elem_id="jobs-job-id")
        open_button = gr.Button(strings.OPEN_JOB, min_width=100, elem_id="jobs-open")
    table = gr.Dataframe(
        headers=strings.JOB_TABLE_COLUMNS, interactive=False, wrap=True, max_height=320, elem_id="jobs-table"
    )
    header = gr.Markdown(strings.NO_JOB, elem_id="jobs-header")
    progress = gr.HTML()
    with gr.Row():
        cancel_button = gr.Button(
            strings.CANCEL, variant="stop", interactive=False, min_width=100, elem_id="jobs-cancel"
        )
        resume_button = gr.Button(strings.RESUME, interactive=False, min_width=100, elem_id="jobs-resume")
        compare_button = gr.Button(
            strings.COMPARE_BASE, variant="primary", interactive=False, min_width=200, elem_id="jobs-compare-base"
        )
    base_vs_trained = gr.Markdown(elem_id="jobs-base-vs-trained")
    # No fixed height: Gradio 6.31 sizes a LinePlot's height without its legend, and clips the series names.
    with gr.Row():
        loss_plot = gr.LinePlot(x="step", y="value", color="series", label=strings.LOSS_PLOT, min_width=260)
        divergence_plot = gr.LinePlot(
            x="step",
            y="value",
            color="series",
            label=strings.DIVERGENCE_PLOT,
            min_width=260,
            elem_id="jobs-divergence-plot",
        )
    with gr.Row():
        agreement_plot = gr.LinePlot(x="step", y="value", color="series", label=strings.AGREEMENT_PLOT, min_width=260)
        with gr.Column(min_width=260):
            accuracy_plot = gr.LinePlot(
                x="step", y="value", color="series", label=strings.ACCURACY_PLOT, elem_id="jobs-accuracy-plot"
            )
            accuracy_note = gr.Markdown(elem_id="jobs-accuracy-note")
    log = gr.Textbox(label=strings.LOG_LABEL, lines=10, max_lines=10, interactive=False, elem_id="jobs-log")
    artifacts = gr.Dataframe(
        headers=strings.ARTIFACT_COLUMNS, label=strings.ARTIFACTS_LABEL, interactive=False, wrap=True
    )
    with gr.Row():
        artifact = gr.Dropdown(label=strings.ARTIFACT_PICK, choices=[], min_width=200, elem_id="jobs-artifact")
        download_button = gr.Button(strings.DOWNLOAD, min_width=120, elem_id="jobs-download")
        download_file = gr.File(label=None, interactive=False, min_width=200, elem_id="jobs-file")
    timer = gr.Timer(POLL_INTERVAL_S)

    page_outputs = [
        view_state,
        header,
        progress,
        cancel_button,
        resume_button,
        compare_button,
        base_vs_trained,
        loss_plot,
        divergence_plot,
        agreement_plot,
        accuracy_plot,
        accuracy_note,
        log,
        artifacts,
        artifact,
    ]

    def render_snapshot(snapshot: JobSnapshot, first: bool) -> tuple[Any, ...]:
        job = snapshot.job
        # Redrawn on news only (no flicker), and on a status change (an evaluation may have added accuracy).
        redraw = first or snapshot.new_metrics or snapshot.status_changed or snapshot.evaluations_changed
        plots = plot_updates(snapshot) if redraw else (gr.skip(),) * 4
        names = [a.name for a in snapshot.artifacts]
        return (
            snapshot.view,
            render.job_header_markdown(job, snapshot.names),
            render.progress_html(job),
            gr.update(interactive=can_cancel(job)),
            gr.update(interactive=can_resume(job)),
            gr.update(interactive=can_compare(job)),
            base_vs_trained_markdown(job, snapshot.eval_jobs, snapshot.names),
            *plots,
            accuracy_empty_note(snapshot) if redraw else gr.skip(),
            render.log_tail(snapshot.view.logs) if first or snapshot.new_logs else gr.skip(),
            artifact_table(snapshot.artifacts),
            gr.update(choices=names),
        )

    @readable_errors
    def on_open(request: gr.Request, value: Any, view: JobView | None) -> tuple[Any, ...]:
        job = parse_job_id(value)
        return render_snapshot(poll_job(ctx.client(request), None, job), first=True)

    def on_tick(
        request: gr.Request, value: Any, view: JobView | None, status_filter: str, kind_filter: str
    ) -> tuple[Any, ...]:
        """Refresh the open job (if one is open) and the table."""
        try:
            snapshot, table_value = poll_tick(ctx.client(request), view, status_filter, kind_filter)
            if snapshot is None:
                return (table_value, *(gr.skip(),) * len(page_outputs))
            return (table_value, *render_snapshot(snapshot, first=False))
        except Exception:  # a missed tick (server restarting) must not raise a toast every two seconds
            return (gr.skip(),) * (1 + len(page_outputs))

    open_inputs = [job_id, view_state]
    open_button.click(on_open, open_inputs, page_outputs)
    job_id.submit(on_open, open_inputs, page_outputs)
    timer.tick(on_tick, [job_id, view_state, status, kind], [table, *page_outputs])

    def on_select(event: gr.SelectData) -> Any:
        row = event.row_value or []
        return row[0] if row else gr.skip()

    table.select(on_select, None, job_id).then(on_open, open_inputs, page_outputs)

    @readable_errors
    def refresh_table(request: gr.Request, status_filter: str, kind_filter: str) -> pd.DataFrame:
        return jobs_table(ctx.client(request), status_filter, kind_filter)

    table_inputs = [status, kind]
    gr.on([status.change, kind.change], refresh_table, table_inputs, table)

    @readable_errors
    def on_cancel(request: gr.Request, view: JobView | None) -> tuple[Any, ...]:
        if view is None:
            raise render.UiInputError(strings.NEED_JOB)
        client = ctx.client(request)
        client.cancel(view.job_id)
        gr.Info(strings.CANCEL_SENT.format(id=view.job_id))
        return render_snapshot(poll_job(client, view, view.job_id), first=True)

    @readable_errors
    def on_resume(request: gr.Request, view: JobView | None) -> tuple[Any, ...]:
        if view is None:
            raise render.UiInputError(strings.NEED_JOB)
        client = ctx.client(request)
        client.resume(view.job_id)
        gr.Info(strings.RESUMED.format(id=view.job_id))
        return render_snapshot(poll_job(client, view, view.job_id), first=True)

    @readable_errors
    def on_compare(request: gr.Request, view: JobView | None) -> tuple[Any, ...]:
        if view is None:
            raise render.UiInputError(strings.NEED_JOB)
        client = ctx.client(request)
        evaluations = submit_base_vs_trained(client, client.job(view.job_id))
        gr.Info(strings.COMPARE_SUBMITTED.format(ids=", ".join(f"#{job.id}" for job in evaluations)))
        return render_snapshot(poll_job(client, view, view.job_id), first=True)

    compare_button.click(on_compare, [view_state], page_outputs)
    cancel_button.click(on_cancel, [view_state], page_outputs)
    resume_button.click(on_resume, [view_state], page_outputs)

    @readable_errors
    def on_download(request: gr.Request, view: JobView | None, name: str | None) -> str:
        if view is None:
            raise render.UiInputError(strings.NEED_JOB)
        return download(ctx.client(request), view.job_id, name)

    download_button.click(on_download, [view_state, artifact], download_file)

    def on_show(request: gr.Request, value: Any, view: JobView | None) -> tuple[Any, ...]:
        """Opening the tab redraws the open job: plots drawn while the tab was hidden have no size."""
        if view is None:
            return (gr.skip(),) * len(page_outputs)
        return on_open(request, view.job_id, view)

    return JobsTab(
        job_id=job_id,
        on_show=on_show,
        open_job=on_open,
        open_inputs=open_inputs,
        open_outputs=page_outputs,
        table=table,
        refresh_table=refresh_table,
        table_inputs=table_inputs,
    )
