"""The FastAPI application: ``create_app()`` wires settings, database, broker and routers together."""

from __future__ import annotations

import logging
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import torch
from fastapi import FastAPI
from fastapi.responses import RedirectResponse

from app.crud import requeue_orphans
from app.db import make_engine, make_session_factory, run_migrations
from app.inference import ModelCache
from app.limits import UploadSizeLimit
from app.queueing import JobQueue
from app.routers import datasets, health, inspect, jobs, models
from app.settings import Settings, get_settings

log = logging.getLogger(__name__)


def _reap_forever(app: FastAPI, stop: threading.Event) -> None:
    settings: Settings = app.state.settings
    while not stop.wait(settings.reaper_interval_s):
        try:
            requeued = requeue_orphans(app.state.session_factory, settings, app.state.queue)
            if requeued:
                log.warning("requeued orphaned jobs %s", requeued)
        except Exception:  # the reaper must outlive a database hiccup
            log.exception("orphan reaper failed")


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    stop = threading.Event()
    reaper = threading.Thread(target=_reap_forever, args=(app, stop), name="vopd-reaper", daemon=True)
    reaper.start()
    try:
        yield
    finally:
        stop.set()
        app.state.queue.close()
        app.state.engine.dispose()


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the API; applies database migrations (``alembic upgrade head``) before anything else."""
    settings = settings or get_settings()
    settings.ensure_dirs()
    engine = make_engine(settings)
    run_migrations(engine, settings)

    app = FastAPI(
        title="Vision-OPD Studio",
        version="0.1.0",
        description="Train and evaluate Vision-OPD on queued GPU workers; inspect per-token distributions.",
        lifespan=_lifespan,
    )
    app.state.settings = settings
    app.state.engine = engine
    app.state.session_factory = make_session_factory(engine)
    app.state.queue = JobQueue(settings)
    app.state.model_cache = ModelCache(settings.model_cache_size)
    if settings.inference_threads:
        torch.set_num_threads(settings.inference_threads)
    app.state.ui_mounted = False
    for module in (jobs, datasets, models, inspect, health):
        app.include_router(module.router)
    app.add_middleware(UploadSizeLimit, max_mb=lambda: settings.max_upload_mb)

    @app.get("/", include_in_schema=False)
    def root() -> RedirectResponse:
        return RedirectResponse("/ui/" if app.state.ui_mounted else "/docs")

    return app


def mount_ui(app: FastAPI, api_base_url: str, api_key: str | None) -> bool:
    """Mount the Gradio studio at /ui when ``frontend.app.build_ui`` exists; the API works without it."""
    try:
        import gradio as gr

        from frontend.app import build_ui
    except ImportError as error:
        log.info("UI not mounted (%s)", error)
        return False
    gr.mount_gradio_app(app, build_ui(api_base_url, api_key), path="/ui")
    app.state.ui_mounted = True
    return True
