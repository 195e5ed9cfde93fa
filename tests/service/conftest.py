"""Real services for the service tests: PostgreSQL, Redis and a `vopd worker` process.

Each test session gets a fresh PostgreSQL database (dropped afterwards), a dedicated Redis db number with
queue names of its own, and one VOPD_HOME per backend. The `service` fixture is parametrised: every test that
uses it runs once on SQLite (with the embedded SQLite broker, as `vopd serve` runs) and once on PostgreSQL (with
Redis, as docker-compose runs). Under CI=true a missing server fails the tests; elsewhere they are skipped.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.serve import stop_process, vopd_command
from app.settings import Settings

PG_ADMIN_URL = os.environ.get("VOPD_TEST_PG_ADMIN", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
REDIS_BASE = os.environ.get("VOPD_TEST_REDIS", "redis://127.0.0.1:6379")
REDIS_TEST_DB = 13  # kept apart from anything else on the machine's Redis
SESSION_TAG = secrets.token_hex(4)
WORKER_START_TIMEOUT_S = 90
UNSERVED = "unserved"  # suffixes of the service's extra queues (VOPD_QUEUES)
GROUP = "group"


def pytest_configure(config: pytest.Config) -> None:
    # kombu's SQLAlchemy transport (the embedded broker) still uses a loader option SQLAlchemy 2.1 deprecates.
    config.addinivalue_line("filterwarnings", "ignore:The ``noload`` loader strategy:DeprecationWarning")


def unavailable(reason: str) -> None:
    """In CI a missing server is a failure, never a silent skip."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{reason} (CI=true: the service tests must run)")
    pytest.skip(reason)


@contextlib.contextmanager
def fresh_postgres_database(name: str) -> Iterator[str]:
    """A new, empty PostgreSQL database (an old one of that name is dropped first), dropped again afterwards."""
    from sqlalchemy import create_engine, text

    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            connection.execute(text(f'CREATE DATABASE "{name}"'))
    except Exception as error:  # any driver error: server down, auth refused
        admin.dispose()
        unavailable(f"PostgreSQL at {PG_ADMIN_URL} is not usable: {error}")
    try:
        yield PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    with fresh_postgres_database(f"vopd_test_{SESSION_TAG}") as url:
        yield url


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    import redis

    url = f"{REDIS_BASE}/{REDIS_TEST_DB}"
    client = redis.Redis.from_url(url, socket_connect_timeout=2)
    try:
        client.ping()
    except Exception as error:  # any connection error
        unavailable(f"Redis at {REDIS_BASE} is not reachable: {error}")
    yield url
    for key in client.scan_iter(f"*{SESSION_TAG}*"):
        client.delete(key)
    client.close()


@dataclass
class Service:
    backend: str
    client: TestClient
    settings: Settings
    env: dict[str, str]
    alice: dict[str, str]  # Authorization headers of two owners
    bob: dict[str, str]
    worker: subprocess.Popen
    worker_log: Path

    def wait_for(self, job_id: int, statuses: set[str], timeout_s: float = 120, **condition: Any) -> dict:
        """Poll the job until its status is in ``statuses`` (and every field in ``condition`` holds)."""
        deadline = time.monotonic() + timeout_s
        job: dict = {}
        while time.monotonic() < deadline:
            job = self.client.get(f"/api/jobs/{job_id}", headers=self.alice).json()
            if job["status"] in statuses and all(check(job[key]) for key, check in condition.items()):
                return job
            if self.worker.poll() is not None:
                raise AssertionError(f"the worker exited ({self.worker.returncode}):\n{self.worker_tail()}")
            time.sleep(0.2)
        raise AssertionError(f"job {job_id} did not reach {statuses}: {job}\n{self.worker_tail()}")

    def worker_tail(self, lines: int = 60) -> str:
        return "\n".join(self.worker_log.read_text(errors="replace").splitlines()[-lines:])


def _wait_for_worker(client: TestClient, worker: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + WORKER_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if worker.poll() is not None:
            raise RuntimeError(f"vopd worker exited with {worker.returncode}:\n{log.read_text()[-4000:]}")
        if client.get("/api/health").json()["workers"]:
            return
        time.sleep(0.5)
    raise RuntimeError(f"vopd worker did not report within {WORKER_START_TIMEOUT_S}s:\n{log.read_text()[-4000:]}")


@pytest.fixture(scope="session", params=["sqlite", "postgresql"])
def service(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path
) -> Iterator[Service]:
    backend = request.param
    home = tmp_path_factory.mktemp(f"vopd-home-{backend}")
    queue = f"vopd-test-{backend}-{SESSION_TAG}"
    env = {
        "VOPD_HOME": str(home),
        "VOPD_QUEUE": queue,
        # The allow-list of queues jobs may name: one no worker serves, one for the node-group tests' workers.
        "VOPD_QUEUES": f"{queue}-{UNSERVED},{queue}-{GROUP}",
        "VOPD_HEARTBEAT_INTERVAL_S": "1",
        "VOPD_PROGRESS_INTERVAL_S": "0.2",
        "VOPD_EMBEDDED_POLL_S": "0.1",
        "VOPD_EVENTS_POLL_S": "0.1",
        "VOPD_MAX_UPLOAD_MB": "2",
        "VOPD_MAX_UNZIPPED_MB": "4",
        "OMP_NUM_THREADS": "1",
    }
    if backend == "postgresql":
        env["DATABASE_URL"] = request.getfixturevalue("postgres_url")
        env["REDIS_URL"] = request.getfixturevalue("redis_url")
    (home / "models").mkdir()
    shutil.copytree(tiny_model_dir, home / "models" / "tiny")  # what ensure_default_assets would build

    with pytest.MonkeyPatch.context() as patch:
        for name in ("DATABASE_URL", "REDIS_URL"):
            patch.delenv(name, raising=False)
        for name, value in env.items():
            patch.setenv(name, value)
        from app.auth import create_api_key
        from app.bootstrap import ensure_default_assets
        from app.db import session_scope
        from app.main import create_app
        from app.settings import get_settings

        settings = get_settings()
        app = create_app(settings)
        ensure_default_assets(settings, app.state.session_factory)
        with session_scope(app.state.session_factory) as session:
            _, alice_key = create_api_key(session, "alice")
            _, bob_key = create_api_key(session, "bob")
        worker_log = home / "worker.log"
        with worker_log.open("wb") as log_handle:
            worker = subprocess.Popen(
                vopd_command("worker"), env={**os.environ}, stdout=log_handle, stderr=subprocess.STDOUT
            )
        try:
            with TestClient(app) as client:
                _wait_for_worker(client, worker, worker_log)
                yield Service(
                    backend=backend,
                    client=client,
                    settings=settings,
                    env={**os.environ},
                    alice={"Authorization": f"Bearer {alice_key}"},
                    bob={"Authorization": f"Bearer {bob_key}"},
                    worker=worker,
                    worker_log=worker_log,
                )
        finally:
            stop_process(worker)


def tiny_train_config(**overrides: Any) -> dict[str, Any]:
    """The smallest TrainConfig that exercises the whole loop on the tiny model and the synthetic dataset."""
    config: dict[str, Any] = {
        "model": "tiny",
        "dataset": "synth-64",
        "steps": 4,
        "batch_size": 2,
        "lr": 1e-4,
        "save_every": 2,
        "rollout": {"num_rollouts": 2, "max_new_tokens": 4},
        "collapse_guard": {"probe_size": 4, "max_new_tokens": 4},
        "runtime": {"device": "cpu"},
    }
    config.update(overrides)
    return config
