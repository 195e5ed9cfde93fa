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
from frontend.context import UiContext, readable_errors

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


@dataclass
class JobSnapshot:
    job: Job
    view: JobView
    new_metrics: bool
    new_logs: bool
    status_changed: bool
    artifacts: list[Artifact]
    eval_jobs: list[Job]


# ----------------------------------------------------------------------------- pure callbacks
def jobs_table(client: VopdClient, status: str | None, kind: str | None) -> pd.DataFrame:
    page = client.jobs(
        status=None if status in (None, strings.ANY) else status,
        kind=None if kind in (None, strings.ANY) else kind,
        limit=100,
    )
    return render.job_rows(page.items)


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
    return JobSnapshot(
        job, view, bool(metrics.items), bool(logs.items), status_changed, client.artifacts(job_id), eval_jobs
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
        [frames["accuracy"], render.eval_accuracy_frame(snapshot.job, snapshot.eval_jobs)], ignore_index=True
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
    return tuple(gr.update(value=value, x_lim=x_lim) for value in curves(snapshot))


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
        redraw = first or snapshot.new_metrics or snapshot.status_changed
        plots = plot_updates(snapshot) if redraw else (gr.skip(),) * 4
        names = [a.name for a in snapshot.artifacts]
        return (
            snapshot.view,
            render.job_header_markdown(job),
            render.progress_html(job),
            gr.update(interactive=can_cancel(job)),
            gr.update(interactive=can_resume(job)),
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
