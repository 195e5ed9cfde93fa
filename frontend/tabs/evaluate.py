"""Evaluate: full-image vs crop accuracy before and after training, as a chart, a table and a per-item browser."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import gradio as gr
import pandas as pd
from pydantic import ValidationError

from frontend import render, strings
from frontend.client import BenchmarkFolderList, Job, VopdClient
from frontend.context import HELD_OUT_DATASET_ID, UiContext, readable_errors, serve_images
from vopd.config import EvalConfig

POLL_INTERVAL_S = 3.0
FULL_VIEWS = ("student", "plain")
# The published suites of vopd.benchmarks (named here: the UI must not import the library's torch side; a test pins
# this list to the registry). The folder is a name inside the server's VOPD_HOME/benchmarks.
BENCHMARK_CHOICES = (
    "vstar",
    "zoombench",
    "hrbench-4k",
    "hrbench-8k",
    "mme-realworld",
    "mme-realworld-cn",
    "mme-realworld-lite",
    "mmstar",
    "pope",
    "pope-adversarial",
    "pope-popular",
    "pope-random",
    "cv-bench",
    "mmvp",
    "visualprobe",
)
# The paper's headline table: the six suites its evaluation script runs by default, and their mean.
PAPER_SIX = ("vstar", "zoombench", "hrbench-4k", "hrbench-8k", "mme-realworld", "mme-realworld-cn")
AVERAGE_OF_SIX = "average of the six"
NO_BENCHMARK = "none (use the dataset)"
# EvalConfig.engine's choices (vopd.config.RolloutEngineName), in the Train tab's order for its rollout engine.
ENGINE_CHOICES = ("auto", "hf", "vllm")
BENCHMARK_LABEL = "Or a published benchmark"
BENCHMARK_DATA_LABEL = "Benchmark folder on the server (inside VOPD_HOME/benchmarks)"
NEED_BENCHMARK_DATA = "Name the benchmark's folder on the server (inside VOPD_HOME/benchmarks)."


# ----------------------------------------------------------------------------- pure callbacks
def eval_job_choices(jobs: list[Job], names: dict[str, str] | None = None) -> list[tuple[str, int]]:
    """An evaluation per choice, its dataset by name (``names``: id -> name)."""
    return [(f"#{job.id} {job.model_name} on {render.source_label(job, names)} ({job.status})", job.id) for job in jobs]


def eval_configs(
    models: list[str] | None,
    dataset: str | None,
    limit: float | None,
    max_new_tokens: float,
    full_view: str,
    benchmark: str | None = None,
    benchmark_data: str | None = None,
    engine: str | None = "auto",
) -> list[dict[str, Any]]:
    """One validated EvalConfig body per chosen model, ready for POST /api/jobs.

    A chosen benchmark replaces the dataset: the suite is asked on the plain full image, so full_view is moot.
    ``engine`` is EvalConfig.engine (auto, the default, is left out of the body as every default is)."""
    if not models:
        raise render.UiInputError(strings.NEED_MODEL)
    use_benchmark = bool(benchmark) and benchmark != NO_BENCHMARK
    if use_benchmark and not (benchmark_data or "").strip():
        raise render.UiInputError(NEED_BENCHMARK_DATA)
    if not use_benchmark and not dataset:
        raise render.UiInputError(strings.NEED_DATASET)
    source: dict[str, Any] = (
        {"benchmark": benchmark, "data": (benchmark_data or "").strip()}
        if use_benchmark
        else {"dataset": dataset, "full_view": full_view}
    )
    bodies = []
    for model in models:
        data: dict[str, Any] = {"model": model, **source, "max_new_tokens": int(max_new_tokens)}
        if engine:
            data["engine"] = engine
        if limit:
            data["limit"] = int(limit)
        try:
            config = EvalConfig.model_validate(data)
        except ValidationError as error:
            raise render.UiInputError(f"{strings.CONFIG_INVALID}: {render.validation_message(error)}") from error
        bodies.append(config.model_dump(mode="json", exclude_defaults=True, exclude={"output"}))
    return bodies


def submit_evals(client: VopdClient, bodies: list[dict[str, Any]]) -> list[Job]:
    return [client.submit_job("eval", body) for body in bodies]


def fetch_eval_jobs(client: VopdClient, job_ids: list[int] | None) -> list[Job]:
    return [client.job(int(job_id)) for job_id in job_ids or []]


def before_after_order(jobs: list[Job]) -> list[Job]:
    """Base models first, then each training job's checkpoints by step and its final model last: read left to right,
    the chart and the table go from before training to after."""

    def key(job: Job) -> tuple[int, int, float, int]:
        if job.model_job_id is None:
            return (0, 0, 0.0, job.id)
        step = float("inf") if job.model_step is None else float(job.model_step)
        return (1, job.model_job_id, step, job.id)

    return sorted(jobs, key=key)


CHART_X = "model · condition"


def comparison(jobs: list[Job], names: dict[str, str] | None = None) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """Table and chart frame, base before trained: the chart's x labels pair model and condition so bars stand side
    by side.

    A benchmark job has only the full-image bar, and its dataset cell names the suite and folder."""
    jobs = before_after_order(jobs)
    chart = render.eval_chart_frame(jobs)
    chart[CHART_X] = chart["model"] + " · " + chart["condition"]
    table = render.eval_table(jobs, names)
    return table, render.plot_value(chart)


def chart_update(chart: pd.DataFrame | None, shown: dict[str, Any] | None = None) -> tuple[Any, dict[str, Any] | None]:
    """The bar chart's update, and what it now shows: its x order (base first; left to itself, Vega-Lite sorts the
    labels alphabetically, which put a trained model, and the crop, first) and whether its bars are settled.

    Gradio rebuilds the chart on every new ``sort``, and a value arriving with it can be drawn with the previous
    data (the finished evaluation missing until Compare was pressed again); each rebuild also leaked a resize
    observer that threw "Cannot read properties of null (reading 'offsetWidth')". So the order is sent only when it
    changes, the value once more after it (``settled`` False until then: the timer keeps going), and a chart once
    drawn is not emptied while the next evaluation runs."""
    if chart is None:
        return (gr.skip() if shown else gr.update(value=None)), shown
    order = list(dict.fromkeys(chart[CHART_X]))
    if shown and shown.get("order") == order:
        return gr.update(value=chart), {"order": order, "settled": True}
    return gr.update(value=chart, sort=order), {"order": order, "settled": False}


def chart_settled(shown: dict[str, Any] | None) -> bool:
    return shown is None or bool(shown.get("settled"))


def trained_on(models: list[str] | None, train_jobs: list[Job]) -> dict[str, str]:
    """model name -> the dataset id its training job read, for the chosen models made by training jobs."""
    by_id = {job.id: job for job in train_jobs}
    found: dict[str, str] = {}
    for name in models or []:
        source = _job_model_source(name)
        if source is not None and source in by_id and by_id[source].dataset_id:
            found[name] = by_id[source].dataset_id
    return found


def _job_model_source(name: str) -> int | None:
    """The training job id in a ``job-N/final`` or ``job-N/step-M`` name (the API's model names), else None."""
    head, _, tail = name.partition("/")
    if head.startswith("job-") and head[4:].isdigit() and (tail == "final" or tail.startswith("step-")):
        return int(head[4:])
    return None


def held_out_dataset(current: str | None, dataset_ids: list[str], trained: dict[str, str]) -> str | None:
    """The dataset to evaluate on: the current one unless a chosen model trained on it and another exists; with
    none chosen yet, the registered held-out set (the models' choice arrives before the datasets' on page load)."""
    used = set(trained.values())
    if current in dataset_ids and current not in used:
        return current
    fresh = [dataset_id for dataset_id in dataset_ids if dataset_id not in used]
    if HELD_OUT_DATASET_ID in fresh:
        return HELD_OUT_DATASET_ID
    if fresh:
        return fresh[0]
    return current if current in dataset_ids else (dataset_ids[0] if dataset_ids else None)


def trained_on_warning(dataset: str | None, trained: dict[str, str], names: dict[str, str] | None = None) -> str:
    """A warning when a chosen model trained on the dataset to be evaluated (its accuracy there is not a test)."""
    seen = sorted(name for name, dataset_id in trained.items() if dataset_id == dataset)
    if not dataset or not seen:
        return ""
    return strings.EVAL_TRAINED_ON.format(
        models=", ".join(f"`{name}`" for name in seen), dataset=render.dataset_label(dataset, names)
    )


def category_rows(job: Job) -> pd.DataFrame:
    """A benchmark job's per-category accuracy (category, n, accuracy), then overall; empty for a dataset job."""
    result = job.result or {}
    rows = [[name, stats.get("n"), stats.get("accuracy")] for name, stats in (result.get("categories") or {}).items()]
    if rows:
        rows.append(["overall", result.get("n"), result.get("accuracy")])
    return pd.DataFrame(rows, columns=["category", "n", "accuracy"])


def headline(result: dict[str, Any]) -> float | None:
    """A suite's one number as its paper prints it (the reported Overall, Average or POPE's Accuracy), else accuracy."""
    reported = result.get("reported") or {}
    for key in ("Overall", "Average", "Accuracy"):
        if isinstance(reported.get(key), int | float):
            return float(reported[key])
    value = result.get("accuracy")
    return float(value) if isinstance(value, int | float) else None


def suite_rows(jobs: list[Job]) -> pd.DataFrame:
    """Per suite (rows) and model (columns, base before trained), the suite's headline number from the newest finished
    benchmark job; then the average of the paper's six suites for each model that has all six (blank otherwise)."""
    done = [job for job in before_after_order(jobs) if job.benchmark and job.status == "succeeded" and job.result]
    models = list(dict.fromkeys(job.model_name for job in done))
    scores: dict[tuple[str, str], float | None] = {}
    for job in sorted(done, key=lambda job: job.id):  # the newest job of a (suite, model) wins
        scores[(job.benchmark or "", job.model_name)] = headline(job.result or {})
    suites = [name for name in BENCHMARK_CHOICES if any(suite == name for suite, _ in scores)]
    rows = [[suite, *(scores.get((suite, model)) for model in models)] for suite in suites]
    if suites:
        averages = []
        for model in models:
            six = [scores.get((suite, model)) for suite in PAPER_SIX]
            averages.append(sum(six) / len(six) if all(v is not None for v in six) else None)  # type: ignore[misc]
        rows.append([AVERAGE_OF_SIX, *averages])
    return pd.DataFrame(rows, columns=["suite", *models])


def load_records(client: VopdClient, job_id: Any) -> tuple[Job, list[dict[str, Any]]]:
    """The evaluation's per-item records (its ``records`` artifact, JSONL)."""
    if job_id in (None, ""):
        raise render.UiInputError("choose an evaluation job")
    job = client.job(int(job_id))
    records_artifact = next((a for a in client.artifacts(job.id) if a.kind == "records"), None)
    if records_artifact is None:
        raise render.UiInputError(strings.NO_RECORDS.format(id=job.id))
    text = client.artifact_text(job.id, records_artifact.name)
    return job, [json.loads(line) for line in text.splitlines() if line.strip()]


def item_view(client: VopdClient, job: Job | None, records: list[dict[str, Any]], index: int) -> tuple[Any, ...]:
    """Markdown and both views of one evaluated item (records keep the dataset's order, so index = sample)."""
    if job is None or not 0 <= index < len(records):
        return "", None, None
    record = records[index]
    if job.benchmark:  # the suite's images live on the server only; there is no crop view to show
        return render.item_markdown(record), None, None
    page = client.samples(job.dataset_id, offset=index, limit=1)
    if not page.items:
        return render.item_markdown(record), None, None
    sample = page.items[0]
    return (
        render.item_markdown(record),
        render.enlarged(render.image_from_data_url(sample.student_image)),
        render.enlarged(render.image_from_data_url(sample.teacher_image)),
    )


# ----------------------------------------------------------------------------- layout and wiring
def benchmarks_found_note(found: BenchmarkFolderList) -> str:
    """Which suites the server holds, and where an administrator adds more."""
    if not found.items:
        return f"No published suite on this server yet: place one in `{found.folder}`, in a folder named after it."
    listed = ", ".join(f"{item.suite} (`{item.data}`)" for item in found.items)
    return f"On this server ({found.folder}): {listed}."


def benchmark_data_for(suite: str | None, current: str | None, found: BenchmarkFolderList) -> str | None:
    """The folder to fill in for a picked suite: its entry on the server, unless the field already names another
    folder by hand (an entry of another suite is replaced); None to leave the field as it is."""
    entries = {item.suite: item.data for item in found.items}
    if not suite or suite == NO_BENCHMARK or suite not in entries:
        return None
    typed = (current or "").strip()
    if typed and typed not in entries.values():
        return None
    return entries[suite]


@dataclass
class EvaluateTab:
    models: gr.Dropdown
    dataset: gr.Dropdown
    refresh_jobs: Any
    refresh_inputs: list[Any]
    refresh_outputs: list[Any]
    refresh_benchmarks: Any = None
    benchmarks_note: Any = None


def build_evaluate_tab(ctx: UiContext) -> EvaluateTab:
    gr.Markdown(strings.EVAL_INTRO)
    with gr.Row():
        models = gr.Dropdown(
            label=strings.EVAL_MODELS_LABEL, choices=[], multiselect=True, min_width=260, elem_id="eval-models"
        )
        dataset = gr.Dropdown(label=strings.DATASET_LABEL, choices=[], min_width=220, elem_id="eval-dataset")
    with gr.Row():
        limit = gr.Number(
            32, label=strings.EVAL_LIMIT_LABEL, precision=0, minimum=0, min_width=140, elem_id="eval-limit"
        )
        max_new_tokens = gr.Number(16, label=strings.MAX_NEW_TOKENS_LABEL, precision=0, minimum=1, min_width=140)
        full_view = gr.Radio(list(FULL_VIEWS), value="student", label=strings.FULL_VIEW_LABEL, min_width=200)
        engine = gr.Dropdown(
            list(ENGINE_CHOICES),
            value="auto",
            label=strings.EVAL_ENGINE_LABEL,
            info=strings.EVAL_ENGINE_INFO,
            min_width=200,
            elem_id="eval-engine",
        )
    with gr.Row():
        benchmark = gr.Dropdown(
            [NO_BENCHMARK, *BENCHMARK_CHOICES],
            value=NO_BENCHMARK,
            label=BENCHMARK_LABEL,
            min_width=220,
            elem_id="eval-benchmark",
        )
        benchmark_data = gr.Textbox(
            label=BENCHMARK_DATA_LABEL, placeholder="e.g. vstar", min_width=260, elem_id="eval-benchmark-data"
        )
    benchmarks_note = gr.Markdown(elem_id="eval-benchmarks-found")
    trained_warning = gr.Markdown(elem_id="eval-trained-on")
    run_button = gr.Button(strings.RUN_EVAL, variant="primary", elem_id="eval-run")
    with gr.Row():
        picked = gr.Dropdown(
            label=strings.EVAL_JOBS_LABEL, choices=[], multiselect=True, min_width=300, scale=4, elem_id="eval-jobs"
        )
        compare_button = gr.Button(strings.COMPARE, min_width=100, scale=1)
    chart = gr.BarPlot(
        x=CHART_X,
        y="accuracy",
        color="condition",
        color_map=render.CONDITION_COLORS,
        x_title=strings.EVAL_X_TITLE,
        y_title=strings.EVAL_Y_TITLE,
        color_title=strings.EVAL_COLOR_TITLE,
        y_lim=[0, 1],
        sort=None,
        x_label_angle=-30,
        label=strings.EVAL_CHART_LABEL,
        elem_id="eval-chart",
    )  # no fixed height: it would clip the legend (Gradio 6.31)
    gr.HTML(render.condition_legend_html(), elem_id="eval-legend", js_on_load=None)
    chart_note = gr.Markdown(strings.EVAL_EMPTY, elem_id="eval-note")
    table = gr.Dataframe(headers=strings.EVAL_TABLE_COLUMNS, interactive=False, wrap=True, elem_id="eval-table")
    suites = gr.Dataframe(
        headers=["suite"], interactive=False, wrap=True, label="Per suite (benchmark jobs)", elem_id="eval-suites"
    )
    categories = gr.Dataframe(
        headers=["category", "n", "accuracy"],
        interactive=False,
        wrap=True,
        label="Per category (benchmark jobs)",
        elem_id="eval-categories",
    )
    with gr.Accordion("Per-item browser", open=True):
        with gr.Row():
            items_job = gr.Dropdown(
                label=strings.ITEMS_JOB_LABEL, choices=[], min_width=260, scale=4, elem_id="eval-items-job"
            )
            load_button = gr.Button(strings.LOAD_ITEMS, min_width=100, scale=1, elem_id="eval-load-items")
        items = gr.Dataframe(
            headers=strings.ITEM_COLUMNS, interactive=False, wrap=True, max_height=300, elem_id="eval-items"
        )
        item_text = gr.Markdown(elem_id="eval-item-text")
        with gr.Row():
            student_image = gr.Image(
                label=strings.STUDENT_VIEW_LABEL,
                interactive=False,
                height=320,
                min_width=160,
                buttons=["fullscreen"],
                elem_id="eval-item-student",
            )
            teacher_image = gr.Image(
                label=strings.TEACHER_VIEW_LABEL,
                interactive=False,
                height=320,
                min_width=160,
                buttons=["fullscreen"],
                elem_id="eval-item-teacher",
            )
    chart_order = gr.State(None)  # what the chart shows (chart_update)
    records_state = gr.State([])
    records_job = gr.State(None)
    timer = gr.Timer(POLL_INTERVAL_S)

    @readable_errors
    def refresh_jobs(request: gr.Request, current: list[int] | None, current_items: Any) -> tuple[Any, Any]:
        client = ctx.client(request)
        jobs = client.jobs(kind="eval", limit=200).items
        choices = eval_job_choices(jobs, client.dataset_names())
        ids = [value for _, value in choices]
        kept = [job_id for job_id in current or [] if job_id in ids]
        finished = [value for (label, value), job in zip(choices, jobs, strict=True) if job.status == "succeeded"]
        # The per-item browser (and the per-category table) follow the evaluation being compared once it is done,
        # e.g. the one just run; otherwise they keep the user's choice, or show the newest finished one.
        compared_done = [job_id for job_id in finished if job_id in kept]
        if compared_done and current_items not in kept:
            items_value = compared_done[0]
        else:
            items_value = current_items if current_items in ids else (finished[0] if finished else None)
        return gr.update(choices=choices, value=kept), gr.update(choices=choices, value=items_value)

    @readable_errors
    def on_compare(request: gr.Request, job_ids: list[int] | None, shown: dict[str, Any] | None) -> tuple[Any, ...]:
        client = ctx.client(request)
        jobs = fetch_eval_jobs(client, job_ids)
        table_value, chart_value = comparison(jobs, client.dataset_names())
        update, order = chart_update(chart_value, shown)
        note = "" if chart_value is not None else strings.EVAL_EMPTY
        return table_value, update, order, note, suite_rows(jobs)

    @readable_errors
    def on_models(request: gr.Request, model_names: list[str] | None, current: str | None) -> tuple[Any, Any]:
        """Keep the evaluation honest: move off a dataset the chosen models trained on, or say so."""
        client = ctx.client(request)
        trained = trained_on(model_names, client.jobs(kind="train", limit=200).items)
        datasets = client.datasets()
        chosen = held_out_dataset(current, [d.id for d in datasets], trained)
        warning = trained_on_warning(chosen, trained, {d.id: d.name for d in datasets})
        return (gr.update(value=chosen) if chosen != current else gr.skip()), warning

    @readable_errors
    def on_categories(request: gr.Request, job_id: Any) -> pd.DataFrame:
        return category_rows(ctx.client(request).job(int(job_id))) if job_id not in (None, "") else gr.skip()

    @readable_errors
    def on_run(
        request: gr.Request,
        model_names: list[str] | None,
        dataset_id: str | None,
        limit_value: float | None,
        tokens: float,
        view: str,
        suite: str | None,
        suite_data: str | None,
        engine_name: str | None,
        current: list[int] | None,
        shown: dict[str, Any] | None,
    ) -> tuple[Any, ...]:
        client = ctx.client(request)
        bodies = eval_configs(model_names, dataset_id, limit_value, tokens, view, suite, suite_data, engine_name)
        jobs = submit_evals(client, bodies)
        gr.Info(strings.EVAL_SUBMITTED.format(ids=", ".join(f"#{job.id}" for job in jobs)))
        all_jobs = client.jobs(kind="eval", limit=200).items
        chosen = [job.id for job in jobs]
        names = client.dataset_names()
        table_value, chart_value = comparison(fetch_eval_jobs(client, chosen), names)
        note = "" if chart_value is not None else strings.EVAL_RUNNING
        update, order = chart_update(chart_value, shown)
        return gr.update(choices=eval_job_choices(all_jobs, names), value=chosen), table_value, update, order, note

    def on_tick(
        request: gr.Request, job_ids: list[int] | None, table_value: Any, items_value: Any, shown: dict[str, Any] | None
    ) -> tuple[Any, ...]:
        """While a compared evaluation is unfinished, keep its row, its bars and the job lists current."""
        if not job_ids or (
            isinstance(table_value, pd.DataFrame)
            and len(table_value) == len(job_ids)
            and set(table_value["status"]) <= {"succeeded", "failed", "cancelled"}
            and chart_settled(shown)
        ):
            return (gr.skip(),) * 6
        try:
            client = ctx.client(request)
            table_now, chart_now = comparison(fetch_eval_jobs(client, job_ids), client.dataset_names())
            picked_now, items_now = refresh_jobs(request, job_ids, items_value)
        except Exception:  # a missed tick is retried by the next one; no toast every few seconds
            return (gr.skip(),) * 6
        note = "" if chart_now is not None else strings.EVAL_RUNNING
        update, order = chart_update(chart_now, shown)
        return table_now, update, order, picked_now, items_now, note

    @readable_errors
    def on_load_items(request: gr.Request, job_id: Any) -> tuple[Any, ...]:
        job, records = load_records(ctx.client(request), job_id)
        return job, records, render.item_rows(records)

    @serve_images
    @readable_errors
    def on_item(
        request: gr.Request, job: Job | None, records: list[dict[str, Any]], event: gr.SelectData
    ) -> tuple[Any, ...]:
        row = event.index[0] if isinstance(event.index, list | tuple) else event.index
        return item_view(ctx.client(request), job, records, int(row))

    refresh_inputs = [picked, items_job]
    run_button.click(
        on_run,
        [models, dataset, limit, max_new_tokens, full_view, benchmark, benchmark_data, engine, picked, chart_order],
        [picked, table, chart, chart_order, chart_note],
    )
    gr.on([models.change, dataset.change], on_models, [models, dataset], [dataset, trained_warning])
    items_job.change(on_categories, [items_job], [categories])
    compare_button.click(on_compare, [picked, chart_order], [table, chart, chart_order, chart_note, suites])
    picked.input(on_compare, [picked, chart_order], [table, chart, chart_order, chart_note, suites])
    timer.tick(
        on_tick, [picked, table, items_job, chart_order], [table, chart, chart_order, picked, items_job, chart_note]
    )
    load_button.click(on_load_items, [items_job], [records_job, records_state, items])
    items.select(on_item, [records_job, records_state], [item_text, student_image, teacher_image])

    @readable_errors
    def refresh_benchmarks(request: gr.Request) -> str:
        return benchmarks_found_note(ctx.client(request).benchmarks())

    @readable_errors
    def on_pick_benchmark(request: gr.Request, suite: str | None, current: str | None) -> Any:
        if not suite or suite == NO_BENCHMARK:
            return gr.skip()
        entry = benchmark_data_for(suite, current, ctx.client(request).benchmarks())
        return gr.skip() if entry is None else entry

    benchmark.input(on_pick_benchmark, [benchmark, benchmark_data], benchmark_data)
    return EvaluateTab(
        models=models,
        dataset=dataset,
        refresh_jobs=refresh_jobs,
        refresh_inputs=refresh_inputs,
        refresh_outputs=[picked, items_job],
        refresh_benchmarks=refresh_benchmarks,
        benchmarks_note=benchmarks_note,
    )
