"""``vopd serve`` and ``vopd apikey create``: the single-machine entry points of the service."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

from app.auth import create_api_key
from app.bootstrap import ensure_default_assets, ensure_local_key
from app.db import make_engine, make_session_factory, run_migrations, session_scope
from app.settings import Settings, get_settings


def vopd_command(*args: str) -> list[str]:
    """The ``vopd`` executable of this environment (what docker-compose runs), else ``python -m vopd.cli``."""
    executable = shutil.which("vopd", path=os.path.dirname(sys.executable))
    return [executable, *args] if executable else [sys.executable, "-m", "vopd.cli", *args]


def start_worker_process(settings: Settings) -> subprocess.Popen:
    """The local worker is a separate process: training never competes with the API for the GIL."""
    env = {**os.environ, "VOPD_HOME": str(settings.home), "VOPD_QUEUE": settings.queue}
    return subprocess.Popen(vopd_command("worker"), env=env)


def stop_process(process: subprocess.Popen, timeout_s: float = 15.0) -> None:
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def serve(host: str, port: int, *, start_worker: bool = True, ui: bool = True) -> int:
    import uvicorn

    from app.main import create_app, mount_ui

    settings = get_settings()
    app = create_app(settings)  # applies migrations first
    factory = app.state.session_factory
    # The worker imports torch while the default assets are prepared: both take seconds on a first start.
    worker = start_worker_process(settings) if start_worker else None
    try:
        print("preparing the default model and dataset...", flush=True)
        assets = ensure_default_assets(settings, factory)
        key = ensure_local_key(settings, factory)
        local_host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
        base_url = f"http://{local_host}:{port}"
        mounted = ui and mount_ui(app, base_url, key)
        print(
            f"Vision-OPD Studio on {base_url}  (API docs {base_url}/docs"
            + (f", UI {base_url}/ui" if mounted else "")
            + f")\nstate in {settings.home}; default model {assets.model_name!r}, dataset {assets.dataset_id!r}\n"
            f"local API key (send as 'Authorization: Bearer <key>'):\n{key}",
            flush=True,
        )
        uvicorn.run(app, host=host, port=port, log_level="info")
    finally:
        if worker is not None:
            stop_process(worker)
    return 0


def create_key(name: str) -> str:
    settings = get_settings()
    engine = make_engine(settings)
    run_migrations(engine, settings)
    with session_scope(make_session_factory(engine)) as session:
        _, key = create_api_key(session, name)
    engine.dispose()
    return key
