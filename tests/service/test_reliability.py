"""Bad luck with real processes and real services: absurd settings, a flushed or unreachable broker, a killed worker,
a killed API, a job that kills its process again and again, an SSE client that reconnects (docs/reliability.md)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from app.serve import stop_process, vopd_command
from app.settings import Settings
from tests.conftest import free_port
from tests.service.conftest import (
    REDIS_BASE,
    SESSION_TAG,
    fresh_postgres_database,
    tiny_train_config,
    unavailable,
)

pytestmark = [pytest.mark.services, pytest.mark.slow]

# A Redis db of this module's own: FLUSHDB here touches nobody else (the other service tests use 13).
REDIS_FLUSH_DB = 14
CLOSED_PORT_REDIS = "redis://127.0.0.1:9/0"


def _alive(pid: int) -> bool:
    """Running, not a zombie waiting to be reaped by whoever adopted it."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state not in ("Z", "X")


def _wait(predicate, timeout_s: float, what: str, poll_s: float = 0.1):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll_s)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


# ------------------------------------------------------------------------------------------ settings and queues
def test_absurd_settings_and_unknown_keys_are_refused_and_an_unserved_queue_is_warned(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    from app.bootstrap import ensure_default_assets, ensure_local_key
    from app.db import session_scope
    from app.main import create_app
    from app.tables import Worker

    settings = Settings(
        home=tmp_path, database_url_env=f"sqlite:///{tmp_path}/vopd.db", queue="served", queues=["nobody-listens"]
    )
    shutil.copytree(tiny_model_dir, tmp_path / "models" / "tiny")
    app = create_app(settings)
    ensure_default_assets(settings, app.state.session_factory)
    headers = {"Authorization": f"Bearer {ensure_local_key(settings, app.state.session_factory)}"}
    with session_scope(app.state.session_factory) as session:
        session.add(Worker(name="elsewhere:1", queue="served"))  # a live worker on the server's queue only
    with TestClient(app) as client:

        def submit(body: dict) -> httpx.Response:
            return client.post("/api/jobs", headers=headers, json=body)

        for bad, bound in [
            ({"batch_size": 10**9}, "1024"),
            ({"steps": 10**12}, "1000000"),
            ({"steps": None, "epochs": 10**12}, "1000"),
            ({"lr": 1e9}, "0.1"),
            ({"rollout": {"num_rollouts": 8, "max_new_tokens": 10**9}}, "32768"),
        ]:
            config = {**tiny_train_config(), **bad}
            response = submit({"kind": "train", "config": {k: v for k, v in config.items() if v is not None}})
            assert response.status_code == 422 and f"less than or equal to {bound}" in response.text, response.text
        eval_config = {"model": "tiny", "dataset": "synth-64", "batch_size": 10**9}
        assert submit({"kind": "eval", "config": eval_config}).status_code == 422
        for kind, config in (("train", tiny_train_config()), ("eval", {"model": "tiny", "dataset": "synth-64"})):
            response = submit({"kind": kind, "config": config, "priority": "high"})
            assert response.status_code == 422 and "priority" in response.text, response.text
        assert client.get("/api/jobs", headers=headers).json()["total"] == 0  # nothing refused was stored

        served = submit({"kind": "train", "config": tiny_train_config()})
        assert served.status_code == 201 and served.json()["warnings"] == []
        lonely = submit({"kind": "train", "config": tiny_train_config(), "queue": "nobody-listens"})
        assert lonely.status_code == 201, lonely.text
        assert lonely.json()["status"] == "queued"
        assert [w for w in lonely.json()["warnings"] if "no live worker serves queue 'nobody-listens'" in w]


# ------------------------------------------------------------------------------------------ the broker
@pytest.fixture
def own_postgres() -> Iterator[str]:
    with fresh_postgres_database(f"vopd_rel_{SESSION_TAG}") as url:
        yield url


@pytest.fixture
def flushable_redis() -> Iterator[str]:
    import redis

    url = f"{REDIS_BASE}/{REDIS_FLUSH_DB}"
    client = redis.Redis.from_url(url, socket_connect_timeout=2)
    try:
        client.ping()
    except Exception as error:  # any connection error
        unavailable(f"Redis at {REDIS_BASE} is not reachable: {error}")
    client.flushdb()
    yield url
    client.flushdb()
    client.close()


def test_no_job_is_lost_to_a_down_or_flushed_broker(
    tmp_path: Path, tiny_model_dir: Path, own_postgres: str, flushable_redis: str
) -> None:
    import redis

    from app.bootstrap import ensure_default_assets, ensure_local_key
    from app.main import create_app

    queue = f"vopd-rel-{SESSION_TAG}"
    common = {"home": tmp_path, "database_url_env": own_postgres, "queue": queue, "heartbeat_interval_s": 1}
    shutil.copytree(tiny_model_dir, tmp_path / "models" / "tiny")
    down = create_app(Settings(**common, redis_url=CLOSED_PORT_REDIS))
    ensure_default_assets(down.state.settings, down.state.session_factory)
    headers = {"Authorization": f"Bearer {ensure_local_key(down.state.settings, down.state.session_factory)}"}
    body = {
        "kind": "eval",
        "config": {
            "model": "tiny",
            "dataset": "synth-64",
            "limit": 1,
            "max_new_tokens": 2,
            "runtime": {"device": "cpu"},
        },
    }

    # 1. The broker is unreachable: the job is accepted and waits, queued (it used to be marked failed, 503).
    with TestClient(down) as client:
        response = client.post("/api/jobs", headers=headers, json=body)
    assert response.status_code == 201, response.text
    first = response.json()
    assert first["status"] == "queued" and any("published once the broker is back" in w for w in first["warnings"])

    # 2. The API comes back on the real broker: its reaper publishes the waiting job (and no job twice at a time).
    up = create_app(Settings(**common, redis_url=flushable_redis, reaper_interval_s=0.3, republish_after_s=1))
    queue_of = up.state.queue
    with TestClient(up) as client:
        second = client.post("/api/jobs", headers=headers, json=body).json()
        assert second["status"] == "queued"
        both = {first["id"], second["id"]}
        _wait(lambda: queue_of.pending_job_ids(queue) == both, 20, "the waiting job to be published")

        # 3. FLUSHDB strands both messages; the reaper notices and publishes them again.
        redis.Redis.from_url(flushable_redis).flushdb()
        assert queue_of.pending_job_ids(queue) == set()
        _wait(lambda: queue_of.pending_job_ids(queue) == both, 20, "the flushed jobs to be published again")
        logs = client.get(f"/api/jobs/{second['id']}/logs", headers=headers).json()["items"]
        assert any("message was gone from the broker" in row["message"] for row in logs)

        # 4. A worker then runs each of them once (duplicates from the republishing are skipped).
        env = {
            **os.environ,
            "VOPD_HOME": str(tmp_path),
            "DATABASE_URL": own_postgres,
            "REDIS_URL": flushable_redis,
            "VOPD_QUEUE": queue,
            "VOPD_HEARTBEAT_INTERVAL_S": "1",
            "OMP_NUM_THREADS": "1",
        }
        log_path = tmp_path / "worker.log"
        with log_path.open("wb") as log_file:
            worker = subprocess.Popen(vopd_command("worker"), env=env, stdout=log_file, stderr=subprocess.STDOUT)
        try:

            def done() -> list[dict] | None:
                jobs = [client.get(f"/api/jobs/{job_id}", headers=headers).json() for job_id in sorted(both)]
                return jobs if all(job["status"] == "succeeded" for job in jobs) else None

            jobs = _wait(done, 150, f"both jobs to succeed\n{log_path.read_text()[-3000:]}", poll_s=0.5)
            assert [job["attempts"] for job in jobs] == [1, 1]
        finally:
            stop_process(worker)


# ------------------------------------------------------------------------------------------ a supervised worker
@dataclass
class Served:
    process: subprocess.Popen
    base: str
    headers: dict[str, str]
    home: Path
    log: Path

    def get(self, path: str) -> dict:
        return httpx.get(f"{self.base}{path}", headers=self.headers, timeout=10).json()

    def submit(self, config: dict) -> dict:
        response = httpx.post(f"{self.base}/api/jobs", headers=self.headers, json={"kind": "train", "config": config})
        assert response.status_code == 201, response.text
        return response.json()

    def wait_job(self, job_id: int, check, what: str, timeout_s: float = 120) -> dict:
        def ready() -> dict | None:
            job = self.get(f"/api/jobs/{job_id}")
            if job["status"] == "failed" and "failed" not in what:
                raise AssertionError(f"job {job_id} failed: {job['error']}\n{self.tail()}")
            return job if check(job) else None

        return _wait(ready, timeout_s, f"job {job_id}: {what}\n{self.tail()}", poll_s=0.05)

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[Served]:
    """`vopd serve` on embedded defaults, its reaper quick, at most two starts per job."""
    home = tmp_path_factory.mktemp("vopd-served")
    shutil.copytree(tiny_model_dir, home / "models" / "tiny")
    env = {key: value for key, value in os.environ.items() if key not in ("DATABASE_URL", "REDIS_URL")}
    env.update(
        {
            "VOPD_HOME": str(home),
            "VOPD_HEARTBEAT_INTERVAL_S": "1",
            "VOPD_REAPER_INTERVAL_S": "0.3",
            "VOPD_PROGRESS_INTERVAL_S": "0.05",
            "VOPD_EMBEDDED_POLL_S": "0.1",
            "VOPD_EVENTS_POLL_S": "0.1",
            "VOPD_MAX_ATTEMPTS": "2",
            "OMP_NUM_THREADS": "1",
        }
    )
    port = free_port()
    log = home / "serve.log"
    with log.open("w") as out:
        process = subprocess.Popen(
            vopd_command("serve", "--port", str(port), "--no-ui"), env=env, stdout=out, stderr=subprocess.STDOUT
        )
    base = f"http://127.0.0.1:{port}"

    def ready() -> dict | None:
        assert process.poll() is None, log.read_text()[-4000:]
        try:
            health = httpx.get(f"{base}/api/health", timeout=2).json()
        except httpx.TransportError:
            return None
        return health if health["status"] == "ok" else None

    try:
        _wait(ready, 120, "vopd serve to be healthy", poll_s=0.3)
        key = (home / "local_api_key").read_text().strip()  # the banner names the file, never the key
        yield Served(process, base, {"Authorization": f"Bearer {key}"}, home, log)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            process.wait(60)


def _final_weights(home: Path, job_id: int) -> dict:
    from safetensors.torch import load_file

    folder = home / "artifacts" / "jobs" / str(job_id) / "final"
    return {name: tensor for path in sorted(folder.glob("*.safetensors")) for name, tensor in load_file(path).items()}


def test_a_killed_worker_is_restarted_and_its_job_ends_with_the_weights_of_an_uninterrupted_run(
    served: Served,
) -> None:
    config = tiny_train_config(steps=12, save_every=4)
    reference = served.submit(config)
    reference = served.wait_job(reference["id"], lambda job: job["status"] == "succeeded", "the reference run")

    health = served.get("/api/health")
    first_worker = health["local_worker"]
    assert first_worker["alive"] and first_worker["restarts"] == 0
    job = served.submit(config)
    running = served.wait_job(job["id"], lambda j: j["status"] == "running" and j["step"] >= 5, "step 5")
    assert running["step"] < 12, "the job ended before it could be interrupted"
    pool_pid = int(running["worker"].rpartition(":")[2])
    os.kill(first_worker["pid"], signal.SIGKILL)  # the worker itself, as `kill -9` or the OOM killer would

    _wait(lambda: not _alive(pool_pid), 10, "its pool process to die with it (no orphan trains on)")
    restarted = _wait(
        lambda: (w := served.get("/api/health")["local_worker"])["restarts"] == 1 and w["alive"] and w,
        60,
        "the supervisor to start a new worker",
    )
    assert restarted["pid"] != first_worker["pid"] and restarted["last_exit_code"] == -signal.SIGKILL
    finished = served.wait_job(job["id"], lambda j: j["status"] == "succeeded", "the resumed run", timeout_s=180)
    assert finished["attempts"] == 2
    logs = "\n".join(row["message"] for row in served.get(f"/api/jobs/{job['id']}/logs")["items"])
    assert f"worker {running['worker']} is gone" in logs and "worker None" not in logs
    assert "resumed from" in logs
    steps = [row["step"] for row in served.get(f"/api/jobs/{job['id']}/metrics")["items"]]
    assert steps == list(range(1, 13))  # one row per step, also across the resume

    expected, resumed = _final_weights(served.home, reference["id"]), _final_weights(served.home, job["id"])
    assert expected.keys() == resumed.keys() and expected
    assert all((expected[name] == resumed[name]).all() for name in expected), "resumed weights differ"


def test_a_job_that_kills_its_process_fails_after_max_attempts_and_a_resume_keeps_one_metric_per_step(
    served: Served,
) -> None:
    job = served.submit(tiny_train_config(steps=10, save_every=100))  # no checkpoint before the end
    seen: list[str] = []
    for _ in range(2):  # VOPD_MAX_ATTEMPTS=2
        running = served.wait_job(
            job["id"], lambda j: j["status"] == "running" and j["worker"] not in seen and j["step"] >= 2, "step 2"
        )
        assert running["step"] < 10
        seen.append(running["worker"])
        os.kill(int(running["worker"].rpartition(":")[2]), signal.SIGKILL)  # the job's own process dies
    failed = served.wait_job(job["id"], lambda j: j["status"] == "failed", "it to be failed", timeout_s=60)
    assert failed["attempts"] == 2 and "gave up after 2 attempts" in failed["error"], failed["error"]
    assert seen[-1] in failed["error"]

    # A resume gives it a new budget; the rows of the killed attempts (no checkpoint: from scratch) are dropped.
    assert httpx.post(f"{served.base}/api/jobs/{job['id']}/resume", headers=served.headers).status_code == 200
    served.wait_job(job["id"], lambda j: j["status"] == "succeeded", "the resumed run")
    steps = [row["step"] for row in served.get(f"/api/jobs/{job['id']}/metrics")["items"]]
    assert steps == list(range(1, 11))


def _read_events(served: Served, job_id: int, last_event_id: str | None = None) -> list[tuple[str, str, dict]]:
    headers = {**served.headers, **({"Last-Event-ID": last_event_id} if last_event_id else {})}
    events, fields = [], {}
    with httpx.stream("GET", f"{served.base}/api/jobs/{job_id}/events", headers=headers, timeout=60) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if not line:
                if "event" in fields:
                    events.append((fields["event"], fields.get("id", ""), json.loads(fields["data"])))
                fields = {}
            elif ":" in line:
                name, _, value = line.partition(":")
                fields[name] = value.strip()
    return events


def test_sse_resumes_from_last_event_id(served: Served) -> None:
    job = served.submit(tiny_train_config(steps=4, save_every=100))
    served.wait_job(job["id"], lambda j: j["status"] == "succeeded", "the run")
    events = _read_events(served, job["id"])
    assert all(event_id for _, event_id, _ in events)  # every event carries an id
    metrics = [(event_id, data["step"]) for name, event_id, data in events if name == "metric"]
    assert [step for _, step in metrics] == [1, 2, 3, 4]
    again = _read_events(served, job["id"], last_event_id=metrics[1][0])
    assert [data["step"] for name, _, data in again if name == "metric"] == [3, 4]  # nothing replayed
    logs_before = {data["id"] for name, _, data in events if name == "log"}
    last_log = [event_id for name, event_id, _ in events if name == "log"][-1]
    assert not [data for name, _, data in _read_events(served, job["id"], last_event_id=last_log) if name == "log"]
    assert logs_before
    bad = httpx.get(f"{served.base}/api/jobs/{job['id']}/events", headers={**served.headers, "Last-Event-ID": "x"})
    assert bad.status_code == 422


def test_killing_the_api_takes_its_worker_with_it(served: Served) -> None:
    worker_pid = served.get("/api/health")["local_worker"]["pid"]
    jobs = served.get("/api/jobs")["items"]
    pool_pids = {int(job["worker"].rpartition(":")[2]) for job in jobs if job["worker"]}
    alive_pool = {pid for pid in pool_pids if _alive(pid)}
    assert _alive(worker_pid) and alive_pool  # the restarted worker's pool process ran the last jobs
    served.process.kill()  # SIGKILL: the API runs no clean-up at all
    served.process.wait(10)
    _wait(lambda: not _alive(worker_pid) and not any(_alive(pid) for pid in alive_pool), 15, "the worker to exit")
