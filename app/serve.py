"""``vopd serve`` and ``vopd apikey create``: the single-machine entry points of the service."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import uvicorn
from sqlalchemy.orm import Session, sessionmaker

from app.auth import KeyNotFound, create_api_key, create_signin_code, find_api_key
from app.bootstrap import ensure_default_assets, ensure_local_key
from app.db import make_engine, make_session_factory, run_migrations, session_scope
from app.settings import Settings, get_settings

# The environment variable that tells `vopd worker` which process supervises it (it exits when that one does).
SUPERVISOR_ENV = "VOPD_SUPERVISOR_PID"


def vopd_command(*args: str) -> list[str]:
    """The ``vopd`` executable of this environment (what docker-compose runs), else ``python -m vopd.cli``."""
    executable = shutil.which("vopd", path=os.path.dirname(sys.executable))
    return [executable, *args] if executable else [sys.executable, "-m", "vopd.cli", *args]


def start_worker_process(settings: Settings) -> subprocess.Popen:
    """The local worker is a separate process: training never competes with the API for the GIL. It leads its own
    process group (its pool process is in it) and dies with this process, even one killed by SIGKILL
    (``worker.lifeline``)."""
    env = {
        **os.environ,
        "VOPD_HOME": str(settings.home),
        "VOPD_QUEUE": settings.queue,
        SUPERVISOR_ENV: str(os.getpid()),
    }
    return subprocess.Popen(vopd_command("worker"), env=env, start_new_session=True)


def _kill_group(process: subprocess.Popen) -> None:
    """Whatever is left of a worker's process group (a pool process whose parent died) goes with it."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)


class WorkerSupervisor:
    """Keeps the local ``vopd worker`` alive beside the API: a worker that dies (killed, out of memory, crashed) is
    started again after a back-off (1 s, doubling up to ``worker_restart_max_s``, back to 1 s once a worker has run
    for a minute), and stopped with the API. Its job is taken over by the new worker from its newest checkpoint (the
    API's reaper sees the dead process and requeues it). Everything runs on one thread, which the worker's
    parent-death signal is tied to."""

    HEALTHY_AFTER_S = 60.0

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.process: subprocess.Popen | None = None
        self.restarts = 0
        self.last_exit_code: int | None = None
        self.next_start_in_s: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="vopd-worker-supervisor", daemon=True)

    def start(self) -> WorkerSupervisor:
        self._thread.start()
        return self

    def status(self) -> dict[str, Any]:
        process = self.process
        alive = process is not None and process.poll() is None
        return {
            "pid": process.pid if process is not None else None,
            "alive": alive,
            "restarts": self.restarts,
            "last_exit_code": self.last_exit_code,
            "next_start_in_s": None if alive else self.next_start_in_s,
        }

    def _run(self) -> None:
        delay = 1.0
        while not self._stop.is_set():
            self.process, self.next_start_in_s = start_worker_process(self.settings), None
            started = time.monotonic()
            while self.process.poll() is None and not self._stop.wait(0.5):
                pass
            if self._stop.is_set():
                break
            _kill_group(self.process)
            self.last_exit_code = self.process.returncode
            if time.monotonic() - started > self.HEALTHY_AFTER_S:
                delay = 1.0
            self.next_start_in_s = delay
            print(
                f"local worker (pid {self.process.pid}) exited with code {self.last_exit_code}; "
                f"starting a new one in {delay:g} s",
                flush=True,
            )
            if self._stop.wait(delay):
                break
            self.restarts += 1
            delay = min(delay * 2, self.settings.worker_restart_max_s)
        if self.process is not None:  # from this thread: the worker's parent-death signal is tied to it
            stop_process(self.process)
            _kill_group(self.process)

    def stop(self, timeout_s: float = 30.0) -> None:
        self._stop.set()
        self._thread.join(timeout_s)


def stop_process(process: subprocess.Popen, timeout_s: float = 15.0) -> None:
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def serve(host: str, port: int, *, start_worker: bool = True, ui: bool = True, access_log: str | None = None) -> int:
    """The API (and the studio at /ui) with a local worker. The banner, the sign-in link last, is printed once uvicorn
    says it is running, so it is the last thing on the screen; the access log keeps to errors unless asked
    (``access_log`` or VOPD_ACCESS_LOG: off, errors, all)."""
    from app.main import create_app, mount_ui
    from vopd.redact import install_quiet_access_log

    settings = get_settings()
    mode = access_log or settings.access_log
    app = create_app(settings)  # applies migrations first
    factory = app.state.session_factory
    # The worker imports torch while the default assets are prepared: both take seconds on a first start.
    worker = WorkerSupervisor(settings).start() if start_worker else None
    app.state.local_worker = worker  # /api/health reports it
    try:
        print("preparing the default model and dataset...", flush=True)
        assets = ensure_default_assets(settings, factory)
        key = ensure_local_key(settings, factory)
        local_host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
        base_url = f"http://{local_host}:{port}"
        mounted = ui and mount_ui(app, base_url)

        def banner() -> str:
            # As Jupyter prints its token link, but the link carries a one-time code (good once, for minutes) that
            # the server exchanges for a session: no key in a URL, a browser history, a cookie or a log line.
            lines = [
                f"Vision-OPD Studio on {base_url}  (API docs {base_url}/docs"
                + (f", UI {base_url}/ui" if mounted else "")
                + ")",
                f"state in {settings.home}; default model {assets.model_name!r}, dataset {assets.dataset_id!r}",
                f"local admin API key (send as 'Authorization: Bearer <key>') in {settings.local_key_file}",
                f"access log: {ACCESS_LOG_NOTE[mode]} (--access-log off|errors|all, VOPD_ACCESS_LOG)",
            ]
            if mounted:
                minutes = settings.signin_code_ttl_s / 60
                lines.append(
                    f"sign in to the studio with this one-time link (good once, for {minutes:g} minutes; "
                    f"`vopd apikey signin-link` prints a new one):\n    {signin_link(settings, factory, base_url, key)}"
                )
            return "\n".join(lines)

        config = uvicorn.Config(app, host=host, port=port, log_level="info", access_log=mode != "off")
        install_quiet_access_log(mode)  # after uvicorn.Config set its loggers up
        BannerServer(config, banner).run()
    finally:
        if worker is not None:
            worker.stop()
    return 0


ACCESS_LOG_NOTE = {"off": "off", "errors": "requests answered 4xx/5xx only", "all": "every request"}


class BannerServer(uvicorn.Server):
    """A uvicorn server that prints ``banner()`` once it has started, after uvicorn's own start-up lines ("Uvicorn
    running on ..."): the sign-in link is the last line on the screen, not the first of a scrolled-away screenful."""

    def __init__(self, config: uvicorn.Config, banner: Callable[[], str]) -> None:
        super().__init__(config)
        self.banner = banner

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if self.started and not self.should_exit:
            print(self.banner(), flush=True)


def signin_link(settings: Settings, factory: sessionmaker[Session], base_url: str, key: str) -> str:
    """A one-time link that signs a browser in as ``key`` (``/signin?code=...``, good for VOPD_SIGNIN_CODE_TTL_S)."""
    with session_scope(factory) as session:
        row = find_api_key(session, key)
        if row is None:
            raise KeyNotFound("that key is unknown or revoked")
        _, code = create_signin_code(session, row, settings.signin_code_ttl_s)
    return f"{base_url.rstrip('/')}/signin?code={code}"


def create_key(name: str) -> str:
    settings = get_settings()
    engine = make_engine(settings)
    run_migrations(engine, settings)
    with session_scope(make_session_factory(engine)) as session:
        _, key = create_api_key(session, name)
    engine.dispose()
    return key
