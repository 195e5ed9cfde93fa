"""The studio: six tabs over the REST API, built by ``build_ui`` and mounted at /ui by ``vopd serve``.

Every callback acts with the signed-in user's key (``frontend.signin``): the studio has no key of its own.
Standalone against any server: ``python -m frontend.app --api http://host:8000``, then sign in at /signin.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import gradio as gr

from frontend import strings
from frontend.context import (
    HELD_OUT_DATASET_ID,
    TRAIN_DATASET_ID,
    UiContext,
    choices_update,
    dataset_choices,
    model_choices,
    readable_errors,
)
from frontend.guard import Account
from frontend.signin import SIGNOUT_PATH, OpenedSession
from frontend.tabs.datasets import build_datasets_tab
from frontend.tabs.demo import CHOICES, build_demo_tab
from frontend.tabs.evaluate import build_evaluate_tab
from frontend.tabs.inspect import build_inspect_tab
from frontend.tabs.jobs import build_jobs_tab
from frontend.tabs.train import build_train_tab
from vopd.redact import install_access_log_redaction

TAB_IDS = ("inspect", "train", "jobs", "evaluate", "datasets", "demo")

# Page-wide rules, as a <style> element (Gradio scopes a component's own css_template to that component). Gradio's
# notices sit fixed at the top right, over the account and Sign out (on a phone, over the whole header): here they
# sit at the bottom, spanning a phone's width. Table headers wrap between words only: at 420 px Gradio's tables broke
# them letter by letter ("progr/ess"); each column is now at least as wide as its longest header word, and the table
# scrolls inside itself. The Demo's picture fills its frame, pixel for pixel (a 112 px upload showed at 112 px); its
# six examples take two rows of three on a phone (six columns of at least 100 px ran off a 420 px screen). The
# dataset preview shows all its samples, as many abreast as fit (Gradio's gallery clipped the second row in a frame of
# its own height, with three columns at any width).
STUDIO_CSS = """
.toast-wrap { top: auto !important; bottom: var(--size-3, 12px) !important; }
table thead th, table thead th * { word-break: keep-all !important; overflow-wrap: normal !important; }
table thead th { min-width: max-content; }
#demo-image img { width: 100% !important; height: 100% !important; object-fit: contain; image-rendering: pixelated; }
#datasets-gallery .grid-wrap {
  height: auto !important; min-height: 0 !important; max-height: none !important; overflow-y: visible !important;
}
#datasets-gallery .grid-container { grid-template-columns: repeat(auto-fill, minmax(150px, 1fr)) !important; }
@media (max-width: 640px) {
  .toast-wrap { left: var(--size-2, 8px) !important; right: var(--size-2, 8px) !important; width: auto !important; }
  #demo-examples .grid-container { --grid-cols: 3 !important; }
  #demo-examples .grid-wrap { height: auto !important; }
}
"""


def build_ui(api_base_url: str) -> gr.Blocks:
    """The Gradio app for the API at ``api_base_url``, acting with each visitor's own signed-in key."""
    ctx = UiContext(api_base_url)
    with gr.Blocks(title=strings.TITLE, analytics_enabled=False) as ui:
        gr.HTML(f"<style>{STUDIO_CSS}</style>", js_on_load=None, elem_id="studio-style", padding=False)
        with gr.Row():
            with gr.Column(min_width=320, scale=1):  # on a phone the account wraps below the title, not beside it
                gr.Markdown(f"## {strings.TITLE}\n{strings.SUBTITLE}")
            with gr.Column(min_width=220, scale=0):
                account = gr.Markdown(elem_id="studio-account")
                gr.Button(strings.SIGN_OUT, link=SIGNOUT_PATH, size="sm", elem_id="studio-signout")
        with gr.Tabs() as tabs:
            with gr.Tab(strings.TAB_INSPECT, id="inspect") as inspect_tab_item:
                inspect = build_inspect_tab(ctx)
            with gr.Tab(strings.TAB_TRAIN, id="train") as train_tab_item:
                train = build_train_tab(ctx)
            with gr.Tab(strings.TAB_JOBS, id="jobs") as jobs_tab_item:
                jobs = build_jobs_tab(ctx)
            with gr.Tab(strings.TAB_EVALUATE, id="evaluate") as evaluate_tab_item:
                evaluate = build_evaluate_tab(ctx)
            # After the four that fit a phone's tab bar (Inspect, Train, Jobs, Evaluate); there it is in the ⋯ menu.
            with gr.Tab(strings.TAB_DATASETS, id="datasets") as datasets_tab_item:
                datasets_tab = build_datasets_tab(ctx)
            with gr.Tab(strings.TAB_DEMO, id="demo") as demo_tab_item:
                demo = build_demo_tab(ctx)

        @readable_errors
        def signed_in_as(request: gr.Request) -> str:
            me = ctx.client(request).me()
            return strings.SIGNED_IN_AS.format(
                name=me.name, prefix=me.prefix, admin=strings.ADMIN_BADGE if me.admin else ""
            )

        ui.load(signed_in_as, None, account)

        # Model and dataset choices change as jobs finish: reload them whenever a tab is opened.
        single_models = [inspect.model, train.model, demo.model]
        datasets = [inspect.dataset, train.dataset, evaluate.dataset]
        # Train preselects the training set, Evaluate the held-out set: a first run is judged on data it never saw.
        preferred_sets = [None, TRAIN_DATASET_ID, HELD_OUT_DATASET_ID]

        @readable_errors
        def refresh_choices(request: gr.Request, *current: Any) -> list[Any]:
            client = ctx.client(request)
            models = model_choices(client.models())
            sets = dataset_choices(client.datasets())
            n_single = len(single_models)
            # The Demo asks box-free questions: the box-free world's base fits them (the box world's needs a box).
            preferred_models = [None, None, strings.DEMO_MODEL]
            updates = [
                choices_update(models, value, preferred=preferred)
                for value, preferred in zip(current[:n_single], preferred_models, strict=True)
            ]
            updates.append(choices_update(models, current[n_single], optional=True))
            updates.append(choices_update(models, current[n_single + 1], multiselect=True))
            updates.extend(
                choices_update(sets, value, preferred=preferred)
                for value, preferred in zip(current[n_single + 2 :], preferred_sets, strict=True)
            )
            return updates

        choice_components = [*single_models, inspect.compare_model, evaluate.models, *datasets]
        choice_inputs = choice_components
        for trigger in (ui.load, *(item.select for item in (inspect_tab_item, train_tab_item, demo_tab_item))):
            trigger(refresh_choices, choice_inputs, choice_components, concurrency_id=CHOICES).then(
                train.refresh_preview, train.preview_inputs, train.preview_outputs
            )
        # The Demo compares the base with its newest trained model: one may have finished since the tab was shown.
        for trigger in (ui.load, demo_tab_item.select):
            trigger(demo.refresh_trained, demo.trained_inputs, demo.trained, concurrency_id=CHOICES)
        evaluate_tab_item.select(refresh_choices, choice_inputs, choice_components, concurrency_id=CHOICES)
        # A dataset uploaded or made in the Datasets tab appears, by name, in every tab's list at once.
        datasets_tab.changed.change(refresh_choices, choice_inputs, choice_components, concurrency_id=CHOICES)
        datasets_tab_item.select(datasets_tab.refresh, datasets_tab.refresh_inputs, datasets_tab.refresh_outputs).then(
            datasets_tab.first_preview, datasets_tab.first_preview_inputs, datasets_tab.first_preview_outputs
        )
        ui.load(datasets_tab.refresh, datasets_tab.refresh_inputs, datasets_tab.refresh_outputs)
        evaluate_tab_item.select(evaluate.refresh_jobs, evaluate.refresh_inputs, evaluate.refresh_outputs)
        evaluate_tab_item.select(evaluate.refresh_benchmarks, None, evaluate.benchmarks_note)
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


class ApiSignin:
    """Sign-in for the standalone studio, through the REST API only: sessions are opened and ended by
    /api/sessions, and a credential's account is /api/keys/me."""

    def __init__(self, api_base_url: str) -> None:
        self.api_base_url = api_base_url

    def account_of(self, credential: str) -> Account | None:
        from frontend.client import ApiError, VopdClient

        try:
            with VopdClient(self.api_base_url, credential) as client:
                me = client.me()
        except ApiError:
            return None
        return Account(key_id=me.id, name=me.name)

    def open_session(self, *, key: str | None = None, code: str | None = None) -> OpenedSession | None:
        from frontend.client import ApiError, VopdClient

        try:
            with VopdClient(self.api_base_url, None if code else key) as client:
                opened = client.open_session(code=code)
        except ApiError:
            return None
        return OpenedSession(token=opened.session, expires_at=opened.expires_at, name=opened.name)

    def end_session(self, token: str) -> None:
        from frontend.client import ApiError, VopdClient

        try:
            with VopdClient(self.api_base_url, token) as client:
                client.close_session()
        except ApiError:  # already ended, expired or revoked: signed out either way
            pass


def standalone_app(api_base_url: str, *, secure_cookies: bool = False) -> Any:
    """The studio on its own FastAPI app: sign-in opens and checks sessions through the API."""
    from fastapi import FastAPI
    from fastapi.middleware.cors import CORSMiddleware
    from fastapi.responses import RedirectResponse
    from gradio.utils import get_upload_folder

    from frontend.signin import install_signin

    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(CORSMiddleware, allow_origins=[])  # same-origin only; also turns Gradio's CORS echo off
    auth = install_signin(app, ApiSignin(api_base_url), secure_cookies=secure_cookies, upload_dir=get_upload_folder())
    app.add_api_route("/", lambda: RedirectResponse("/ui/"), include_in_schema=False)
    return gr.mount_gradio_app(app, build_ui(api_base_url), path="/ui", auth_dependency=auth)


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description="Vision-OPD Studio UI against a running API (sign in with a key).")
    parser.add_argument("--api", default="http://127.0.0.1:8000", help="base URL of the API")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument(
        "--secure-cookies",
        action="store_true",
        default=os.environ.get("VOPD_SECURE_COOKIES", "").lower() in ("1", "true", "yes"),
        help="the studio is served over HTTPS: the sign-in cookie is always Secure (VOPD_SECURE_COOKIES)",
    )
    args = parser.parse_args(argv)
    print(f"Vision-OPD Studio on http://{args.host}:{args.port}/ui/ (sign in with an API key)", flush=True)
    app = standalone_app(args.api, secure_cookies=args.secure_cookies)
    install_access_log_redaction()
    uvicorn.run(app, host=args.host, port=args.port)


if __name__ == "__main__":
    main()
