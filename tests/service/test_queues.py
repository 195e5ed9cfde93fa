"""Queues come from the server's allow-list only, and a broker key of the wrong type stops no worker.

A queue name is a Redis key beside the keys kombu keeps for itself (``unacked``, ``unacked_index``, ``unacked_mutex``,
``_kombu.binding.<exchange>``): a job on a queue of one of those names once made every worker crash at its next
delivery, again after each restart (docs/reliability.md).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError
from sqlalchemy import update

from app.serve import stop_process, vopd_command
from app.settings import Settings
from tests.service.conftest import REDIS_BASE, SESSION_TAG, tiny_train_config, unavailable

pytestmark = pytest.mark.services

# A Redis db of this module's own: the poisoning below touches nobody else (conftest uses 13, test_reliability 14).
REDIS_POISON_DB = 15
BAD_QUEUES = [
    "unacked",
    "unacked_index",
    "unacked_mutex",
    "_kombu.binding.vopd",
    "celery",
    "vopd.pidbox",
    "celery.pidbox",
    "served.nodes2.rank1",  # a node group's private queue
    "served.gpus2",  # derived by the server from resources.gpus, never named by a client
    "served.nodes2.gpus1",
    "elsewhere",  # well formed, but not one of this server's queues
]


@pytest.mark.parametrize(
    "name", ["unacked", "unacked_index", "unacked_mutex", "_kombu.binding.x", "celery", "celeryev", "x.pidbox", "a.b"]
)
def test_reserved_or_derived_names_can_never_be_a_configured_queue(name: str) -> None:
    with pytest.raises(ValidationError, match="queue name"):
        Settings(queue=name)
    with pytest.raises(ValidationError, match="queue name"):
        Settings(queues=["fine", name])


def test_queues_setting_is_comma_separated(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VOPD_QUEUE", "a100")
    monkeypatch.setenv("VOPD_QUEUES", "h100, h200,a100")
    assert Settings().allowed_queues == ["a100", "h100", "h200"]


@pytest.fixture
def api(tmp_path: Path, tiny_model_dir: Path) -> Iterator[tuple[TestClient, dict[str, str]]]:
    from app.bootstrap import ensure_default_assets, ensure_local_key
    from app.main import create_app

    settings = Settings(
        home=tmp_path,
        database_url_env=f"sqlite:///{tmp_path}/vopd.db",
        queue="served",
        queues=["h100"],
        reaper_interval_s=3600,  # the test runs the reconciler itself
        republish_after_s=0,
    )
    shutil.copytree(tiny_model_dir, tmp_path / "models" / "tiny")
    app = create_app(settings)
    ensure_default_assets(settings, app.state.session_factory)
    headers = {"Authorization": f"Bearer {ensure_local_key(settings, app.state.session_factory)}"}
    with TestClient(app) as client:
        yield client, headers


@pytest.mark.parametrize("kind", ["train", "eval"])
def test_a_job_names_only_an_allowed_queue(api: tuple[TestClient, dict[str, str]], kind: str) -> None:
    client, headers = api
    config = tiny_train_config() if kind == "train" else {"model": "tiny", "dataset": "synth-64"}
    for bad in BAD_QUEUES:
        response = client.post("/api/jobs", headers=headers, json={"kind": kind, "config": config, "queue": bad})
        assert response.status_code == 422, (bad, response.text)
        [error] = response.json()["detail"]
        assert error["loc"] == ["body", "queue"]
        assert "'served', 'h100'" in error["msg"] and "VOPD_QUEUES" in error["msg"], error
    assert client.get("/api/jobs", headers=headers).json()["total"] == 0  # nothing refused was stored
    for good in ("served", "h100"):
        response = client.post("/api/jobs", headers=headers, json={"kind": kind, "config": config, "queue": good})
        assert response.status_code == 201, response.text
        assert response.json()["queue"] == good
    routed = client.post(
        "/api/jobs",
        headers=headers,
        json={"kind": "train", "config": tiny_train_config(), "queue": "h100", "resources": {"gpus": 2}},
    )
    assert routed.status_code == 201 and routed.json()["queue"] == "h100.gpus2", routed.text  # derived by the server


def test_a_stored_job_with_a_bad_queue_is_failed_not_republished(api: tuple[TestClient, dict[str, str]]) -> None:
    """Rows written before the allow-list (the old API took any ``[A-Za-z0-9_.-]`` name) are failed with the reason
    by the reconciler, never published (publishing would write to the broker key of that name); a good one beside
    them is republished as before, and a failed bad one cannot be resumed onto its queue."""
    from app.db import session_scope
    from app.main import reap_once
    from app.tables import Job, utcnow

    client, headers = api
    ids = {}
    for queue in ("unacked_index", "served.nodes2.rank1", "served"):
        response = client.post("/api/jobs", headers=headers, json={"kind": "train", "config": tiny_train_config()})
        ids[queue] = response.json()["id"]
    factory = client.app.state.session_factory
    with session_scope(factory) as session:
        for queue, job_id in ids.items():  # as the old API stored them; aged past republish_after_s
            session.execute(
                update(Job).where(Job.id == job_id).values(queue=queue, updated_at=utcnow() - timedelta(minutes=5))
            )
    broker = client.app.state.queue
    reap_once(client.app)
    for queue in ("unacked_index", "served.nodes2.rank1"):
        job = client.get(f"/api/jobs/{ids[queue]}", headers=headers).json()
        assert job["status"] == "failed", job
        assert "its queue is not allowed" in job["error"] and repr(queue) in job["error"], job["error"]
        logs = client.get(f"/api/jobs/{ids[queue]}/logs", headers=headers).json()["items"]
        assert any("not allowed" in row["message"] and row["level"] == "error" for row in logs)
        assert ids[queue] not in broker.pending_job_ids(queue)  # nothing was published to that key
        resumed = client.post(f"/api/jobs/{ids[queue]}/resume", headers=headers)
        assert resumed.status_code == 409 and "not one of this server's queues" in resumed.text, resumed.text
    assert client.get(f"/api/jobs/{ids['served']}", headers=headers).json()["status"] == "queued"

    # A running job on such a queue whose worker is gone is failed too, not put back on its queue.
    orphan = client.post("/api/jobs", headers=headers, json={"kind": "train", "config": tiny_train_config()}).json()
    with session_scope(factory) as session:
        session.execute(
            update(Job)
            .where(Job.id == orphan["id"])
            .values(queue="unacked", status="running", worker="gone:1", heartbeat_at=utcnow() - timedelta(hours=1))
        )
    reap_once(client.app)
    job = client.get(f"/api/jobs/{orphan['id']}", headers=headers).json()
    assert job["status"] == "failed" and "its queue is not allowed" in job["error"], job


# ------------------------------------------------------------------------------------------ a poisoned Redis
@pytest.fixture
def poisoned_redis() -> Iterator[str]:
    import redis

    url = f"{REDIS_BASE}/{REDIS_POISON_DB}"
    client = redis.Redis.from_url(url, socket_connect_timeout=2)
    try:
        client.ping()
    except Exception as error:  # any connection error
        unavailable(f"Redis at {REDIS_BASE} is not reachable: {error}")
    client.flushdb()
    yield url
    client.flushdb()
    client.close()


def _wait(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


def test_a_worker_survives_wrong_typed_broker_keys(tmp_path: Path, tiny_model_dir: Path, poisoned_redis: str) -> None:
    """kombu's ``unacked_index`` / ``unacked`` / ``unacked_mutex`` and a binding set hold lists (what a job on a
    queue of that name wrote), and the worker's queue a hash, before the worker starts; the first two again while
    it runs: the worker (or the API's publish) moves each aside, logs it, and the worker runs every job. (Before:
    WRONGTYPE at start, worker dead.)"""
    import redis

    from app.bootstrap import ensure_default_assets, ensure_local_key
    from app.main import create_app

    queue = f"poison-{SESSION_TAG}"
    shutil.copytree(tiny_model_dir, tmp_path / "models" / "tiny")
    settings = Settings(
        home=tmp_path, database_url_env=f"sqlite:///{tmp_path}/vopd.db", redis_url=poisoned_redis, queue=queue
    )
    app = create_app(settings)
    ensure_default_assets(settings, app.state.session_factory)
    headers = {"Authorization": f"Bearer {ensure_local_key(settings, app.state.session_factory)}"}
    broker = redis.Redis.from_url(poisoned_redis)
    for key in ("unacked", "unacked_index", "unacked_mutex", f"_kombu.binding.{queue}"):
        broker.lpush(key, '{"poison": true}')
    broker.hset(queue, "poison", "true")  # and the queue's own list is a hash

    env = {
        **{key: value for key, value in os.environ.items() if key not in ("DATABASE_URL",)},
        "VOPD_HOME": str(tmp_path),
        "DATABASE_URL": settings.database_url,
        "REDIS_URL": poisoned_redis,
        "VOPD_QUEUE": queue,
        "VOPD_HEARTBEAT_INTERVAL_S": "1",
        "OMP_NUM_THREADS": "1",
    }
    log_path = tmp_path / "worker.log"
    with log_path.open("wb") as log_file:
        worker = subprocess.Popen(vopd_command("worker"), env=env, stdout=log_file, stderr=subprocess.STDOUT)
    body = {"kind": "train", "config": tiny_train_config(steps=2, save_every=2)}
    try:
        with TestClient(app) as client:
            _wait(lambda: client.get("/api/health").json()["workers"] or worker.poll() is not None, 90, "the worker")
            assert worker.poll() is None, log_path.read_text()[-3000:]

            def run_one() -> dict:
                job = client.post("/api/jobs", headers=headers, json=body).json()
                assert job["status"] == "queued" and not job["warnings"], job

                def finished() -> dict | None:
                    assert worker.poll() is None, f"the worker died:\n{log_path.read_text()[-3000:]}"
                    now = client.get(f"/api/jobs/{job['id']}", headers=headers).json()
                    return now if now["status"] in ("succeeded", "failed") else None

                return _wait(finished, 120, f"job {job['id']}\n{log_path.read_text()[-3000:]}")

            assert run_one()["status"] == "succeeded"
            # Poisoned again while the worker runs: the next delivery (ZADD unacked_index, HSET unacked) repairs.
            broker.delete("unacked", "unacked_index")
            broker.lpush("unacked_index", '{"poison": true}')
            broker.lpush("unacked", '{"poison": true}')
            assert run_one()["status"] == "succeeded"
            assert worker.poll() is None
    finally:
        stop_process(worker)
    log = log_path.read_text(errors="replace")
    assert "WRONGTYPE" not in log, log[-3000:]
    for key in ("unacked", "unacked_index", "unacked_mutex"):
        assert f"broker key '{key}' held a list" in log
    moved = {key.decode() for key in broker.scan_iter("vopd:quarantine:*")}
    assert any(key.startswith(f"vopd:quarantine:_kombu.binding.{queue}:") for key in moved), moved
    assert any(key.startswith(f"vopd:quarantine:{queue}:") for key in moved), moved
    assert all(0 < broker.ttl(key) <= 7 * 24 * 3600 for key in moved)
    assert {broker.type(key).decode() for key in ("unacked", "unacked_index")} <= {"hash", "zset", "none"}
    broker.close()
