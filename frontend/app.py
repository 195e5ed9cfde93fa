"""The studio: five tabs over the REST API, built by ``build_ui`` and mounted at /ui by ``vopd serve``.

Standalone against any server: ``python -m frontend.app --api http://host:8000 --key KEY``.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import gradio as gr  # noqa: E402 - the analytics switch must be set before gradio is imported

from frontend import strings  # noqa: E402
from frontend.context import (  # noqa: E402
    UiContext,
    choices_update,
    dataset_choices,
    model_choices,
    readable_errors,
)
from frontend.tabs.demo import build_demo_tab  # noqa: E402
from frontend.tabs.evaluate import build_evaluate_tab  # noqa: E402
from frontend.tabs.inspect import build_inspect_tab  # noqa: E402
from frontend.tabs.jobs import build_jobs_tab  # noqa: E402
from frontend.tabs.train import build_train_tab  # noqa: E402

TAB_IDS = ("inspect", "train", "jobs", "evaluate", "demo")


def build_ui(api_base_url: str, api_key: str | None) -> gr.Blocks:
    """The Gradio app for the API at ``api_base_url``; without a key, the page asks for one."""
    ctx = UiContext(api_base_url, api_key)
    with gr.Blocks(title=strings.TITLE, analytics_enabled=False) as ui:
        with gr.Row():
            gr.Markdown(f"## {strings.TITLE}\n{strings.SUBTITLE}")
            api_key_box = gr.Textbox(label=strings.API_KEY_LABEL, info=strings.API_KEY_INFO, type="password",
                                     visible=api_key is None, min_width=240, scale=0)
        with gr.Tabs() as tabs:
            with gr.Tab(strings.TAB_INSPECT, id="inspect") as inspect_tab_item:
                inspect = build_inspect_tab(ctx, api_key_box)
            with gr.Tab(strings.TAB_TRAIN, id="train") as train_tab_item:
                train = build_train_tab(ctx, api_key_box)
            with gr.Tab(strings.TAB_JOBS, id="jobs") as jobs_tab_item:
                jobs = build_jobs_tab(ctx, api_key_box)
            with gr.Tab(strings.TAB_EVALUATE, id="evaluate") as evaluate_tab_item:
                evaluate = build_evaluate_tab(ctx, api_key_box)
            with gr.Tab(strings.TAB_DEMO, id="demo") as demo_tab_item:
                demo_model = build_demo_tab(ctx, api_key_box)

        # Model and dataset choices change as jobs finish: reload them whenever a tab is opened.
        single_models = [inspect.model, train.model, demo_model]
        datasets = [inspect.dataset, train.dataset, evaluate.dataset]

        @readable_errors
        def refresh_choices(key: str, *current: Any) -> list[Any]:
            client = ctx.client(key)
            models = model_choices(client.models())
            sets = dataset_choices(client.datasets())
            n_single = len(single_models)
            updates = [choices_update(models, value) for value in current[:n_single]]
            updates.append(choices_update(models, current[n_single], optional=True))
            updates.append(choices_update(models, current[n_single + 1], multiselect=True))
            updates.extend(choices_update(sets, value) for value in current[n_single + 2:])
            return updates

        choice_components = [*single_models, inspect.compare_model, evaluate.models, *datasets]
        choice_inputs = [api_key_box, *choice_components]
        ui.load(refresh_choices, choice_inputs, choice_components)
        api_key_box.submit(refresh_choices, choice_inputs, choice_components)
        for item in (inspect_tab_item, train_tab_item, demo_tab_item, evaluate_tab_item):
            item.select(refresh_choices, choice_inputs, choice_components)
        evaluate_tab_item.select(evaluate.refresh_jobs, evaluate.refresh_inputs, evaluate.refresh_outputs)
        jobs_tab_item.select(jobs.refresh_table, jobs.table_inputs, jobs.table)
        jobs_tab_item.select(jobs.on_show, jobs.open_inputs, jobs.open_outputs)
        ui.load(jobs.refresh_table, jobs.table_inputs, jobs.table)

        # Submitting a training job opens it in the Jobs tab.
        train.submitted_job.change(
            lambda job_id: (gr.Tabs(selected="jobs"), job_id), train.submitted_job, [tabs, jobs.job_id]
        ).then(jobs.open_job, jobs.open_inputs, jobs.open_outputs).then(
            jobs.refresh_table, jobs.table_inputs, jobs.table
        )
    return ui


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Vision-OPD Studio UI against a running API.")
    parser.add_argument("--api", default="http://127.0.0.1:8000", help="base URL of the API")
    parser.add_argument("--key", default=os.environ.get("VOPD_API_KEY"), help="API key (default $VOPD_API_KEY)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=7860)
    args = parser.parse_args(argv)
    build_ui(args.api, args.key).launch(server_name=args.host, server_port=args.port)


if __name__ == "__main__":
    main()
