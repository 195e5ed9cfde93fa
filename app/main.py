"""The FastAPI application: ``create_app()`` wires settings, database, broker and routers together."""

from __future__ import annotations

import logging
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import torch
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import RedirectResponse

from app.api_docs import install_api_docs
from app.auth import (
    create_session,
    end_session,
    find_api_key,
    is_session_token,
    prune_sessions,
    redeem_signin_code,
)
from app.crud import QuotaExceeded, reconcile_queued, requeue_orphans
from app.db import make_engine, make_session_factory, run_migrations, session_scope
from app.inference import InferencePool, ModelCache
from app.limits import BodySizeLimit, validation_error_handler
from app.queueing import BrokerUnavailable, JobQueue
from app.responses import install_error_docs, quota_exceeded_handler
from app.routers import benchmarks, datasets, health, inspect, jobs, keys, models, openai_compat, sessions
from app.settings import Settings, get_settings
from vopd.redact import install_access_log_redaction

log = logging.getLogger(__name__)


def reap_once(app: FastAPI) -> None:
    """One pass of the reconciler: jobs whose worker is gone go back to the queue, and queued jobs whose message
    the broker lost (flushed, restarted, never published) are published again. The database is the truth."""
    settings: Settings = app.state.settings
    requeue_orphans(app.state.session_factory, settings, app.state.queue)
    try:
        republished = reconcile_queued(app.state.session_factory, settings, app.state.queue)
    except BrokerUnavailable as error:  # the jobs wait in the database; the next pass tries again
        log.warning("queued jobs not reconciled: %s", error)
        return
    if republished:
        log.warning("published again queued jobs whose message was gone: %s", republished)


def _reap_forever(app: FastAPI, stop: threading.Event) -> None:
    while not stop.wait(app.state.settings.reaper_interval_s):
        try:
            reap_once(app)
        except Exception:  # the reaper must outlive a database hiccup
            log.exception("job reconciler failed")
        try:  # sessions and sign-in codes dead for a day are forgotten
            with session_scope(app.state.session_factory) as session:
                prune_sessions(session)
        except Exception:
            log.exception("pruning dead sessions failed")


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    install_access_log_redaction()  # after uvicorn set its loggers up: no key or sign-in code in an access line
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
        docs_url=None,  # served from installed assets below, not from a CDN
        redoc_url=None,
    )
    install_api_docs(app)
    app.state.settings = settings
    app.state.engine = engine
    app.state.session_factory = make_session_factory(engine)
    app.state.queue = JobQueue(settings)
    app.state.model_cache = ModelCache(settings.model_cache_size)
    app.state.inference_pool = InferencePool(settings.inspect_queue_size)
    if settings.inference_threads:
        torch.set_num_threads(settings.inference_threads)
    app.state.ui_mounted = False
    for module in (jobs, datasets, models, benchmarks, inspect, health, keys, sessions, openai_compat):
        app.include_router(module.router)
    # Same-origin only: no Access-Control-Allow-Origin for any foreign origin. Its presence also switches off
    # Gradio's own CORS middleware, which echoes any Origin (with credentials) when the host is not localhost.
    app.add_middleware(CORSMiddleware, allow_origins=[], allow_credentials=False)
    app.add_middleware(
        BodySizeLimit, max_upload_mb=lambda: settings.max_upload_mb, max_body_mb=lambda: settings.max_body_mb
    )
    app.add_exception_handler(RequestValidationError, validation_error_handler)
    app.add_exception_handler(QuotaExceeded, quota_exceeded_handler)
    install_error_docs(app)

    @app.get("/", include_in_schema=False)
    def root() -> RedirectResponse:
        return RedirectResponse("/ui/" if app.state.ui_mounted else "/docs")

    return app


class DatabaseSignin:
    """The mounted studio's sign-in, straight on the database (same process as the API): it implements
    ``frontend.signin.SigninBackend`` (sessions opened, checked and ended as /api/sessions does) without a trip over
    HTTP for every request under /ui."""

    def __init__(self, app: FastAPI) -> None:
        self.app = app

    def account_of(self, credential: str) -> Any:
        from frontend.guard import Account

        with session_scope(self.app.state.session_factory) as session:
            row = find_api_key(session, credential)
            return Account(key_id=row.id, name=row.name) if row is not None else None

    def open_session(self, *, key: str | None = None, code: str | None = None) -> Any:
        from frontend.signin import OpenedSession

        ttl_s = self.app.state.settings.session_ttl_hours * 3600
        with session_scope(self.app.state.session_factory) as session:
            if code is not None:
                opened = redeem_signin_code(session, code, ttl_s)
            else:
                row = find_api_key(session, key) if key and not is_session_token(key) else None
                opened = create_session(session, row, ttl_s) if row is not None else None
            if opened is None:
                return None
            owner = find_api_key(session, opened[1])
            if owner is None:
                return None
            return OpenedSession(token=opened[1], expires_at=opened[0].expires_at, name=owner.name)

    def end_session(self, token: str) -> None:
        with session_scope(self.app.state.session_factory) as session:
            end_session(session, token)


def mount_ui(app: FastAPI, api_base_url: str) -> bool:
    """Mount the Gradio studio at /ui when ``frontend.app.build_ui`` exists; the API works without it.

    Everything under /ui (pages, Gradio's API, queue, uploads, files, assets) needs a signed-in session (the
    HttpOnly cookie /signin sets) or a Bearer key, and the callbacks call the API with that credential, never with
    one of the server's. Gradio's upload cache is shared by every account; the guard lets each account read only
    what was uploaded or shown to it.
    """
    try:
        import gradio as gr
        from gradio.utils import get_upload_folder

        from frontend.app import build_ui
        from frontend.signin import install_signin
    except ImportError as error:
        log.info("UI not mounted (%s)", error)
        return False
    settings: Settings = app.state.settings
    auth_dependency = install_signin(
        app,
        DatabaseSignin(app),
        prefix="/ui",
        secure_cookies=settings.secure_cookies,
        upload_dir=get_upload_folder(),
    )
    gr.mount_gradio_app(app, build_ui(api_base_url), path="/ui", auth_dependency=auth_dependency)
    app.state.ui_mounted = True
    return True
