"""`vopd serve` on embedded defaults (no server of any kind): API + local worker + first-start assets + key."""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from app.bootstrap import ensure_local_key
from app.db import make_engine, make_session_factory, run_migrations
from app.serve import vopd_command
from app.settings import Settings
from tests.conftest import free_port

pytestmark = pytest.mark.slow


def test_serve_starts_api_and_worker_with_defaults_and_a_local_key(tmp_path: Path, tiny_model_dir: Path) -> None:
    home = tmp_path / "home"
    shutil.copytree(tiny_model_dir, home / "models" / "tiny")  # spares the build; the dataset is made by serve
    env = {key: value for key, value in os.environ.items() if key not in ("DATABASE_URL", "REDIS_URL")}
    env.update({"VOPD_HOME": str(home), "VOPD_HEARTBEAT_INTERVAL_S": "1", "OMP_NUM_THREADS": "1"})
    port = free_port()
    log = tmp_path / "serve.log"
    with log.open("w") as out:
        server = subprocess.Popen(
            vopd_command("serve", "--port", str(port), "--no-ui"), env=env, stdout=out, stderr=subprocess.STDOUT
        )
    try:
        base = f"http://127.0.0.1:{port}"
        deadline, health = time.monotonic() + 90, None
        while time.monotonic() < deadline and server.poll() is None:
            try:
                health = httpx.get(f"{base}/api/health", timeout=2).json()
                if health["workers"]:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        assert health is not None and health["status"] == "ok", f"{health}\n{log.read_text()[-3000:]}"

        banner = log.read_text()
        assert f"http://127.0.0.1:{port}" in banner
        key = (home / "local_api_key").read_text().strip()
        assert key.startswith("vopd_") and key not in banner, "the banner names the key file, never the key"
        assert str(home / "local_api_key") in banner
        assert oct((home / "local_api_key").stat().st_mode & 0o777) == "0o600"
        headers = {"Authorization": f"Bearer {key}"}
        assert httpx.get(f"{base}/api/me", headers=headers).json()["name"] == "local"
        datasets = httpx.get(f"{base}/api/datasets", headers=headers).json()["items"]
        # The training set and its held-out twin (sizes from the test environment; 4,800 and 400 by default).
        assert sorted((d["id"], d["n_samples"]) for d in datasets) == [
            ("synth-64", 64),
            ("synth-heldout", int(os.environ["VOPD_HELD_OUT_ITEMS"])),
            ("synth-train", int(os.environ["VOPD_DEMO_TRAIN_ITEMS"])),
        ]
        assert httpx.get(base, follow_redirects=False).headers["location"] == "/docs"
    finally:
        server.send_signal(signal.SIGINT)
        server.wait(60)
    # The local worker was stopped with the server, cleanly (it removes its own row on the way out).
    with sqlite3.connect(home / "vopd.db") as db:
        assert db.execute("SELECT COUNT(*) FROM workers").fetchone()[0] == 0


def test_local_key_survives_restarts_and_is_replaced_when_revoked(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path, database_url_env=f"sqlite:///{tmp_path}/vopd.db")
    engine = make_engine(settings)
    run_migrations(engine, settings)
    factory = make_session_factory(engine)
    first = ensure_local_key(settings, factory)
    assert ensure_local_key(settings, factory) == first
    with sqlite3.connect(tmp_path / "vopd.db") as db:
        db.execute("UPDATE api_keys SET revoked = 1")
    replaced = ensure_local_key(settings, factory)
    assert replaced != first and (tmp_path / "local_api_key").read_text().strip() == replaced
    engine.dispose()


def test_unreachable_broker_keeps_the_job_queued_with_a_warning(tmp_path: Path, tiny_model_dir: Path) -> None:
    from fastapi.testclient import TestClient

    from app.bootstrap import ensure_default_assets
    from app.main import create_app

    settings = Settings(
        home=tmp_path, database_url_env=f"sqlite:///{tmp_path}/vopd.db", redis_url="redis://127.0.0.1:9/0"
    )
    shutil.copytree(tiny_model_dir, tmp_path / "models" / "tiny")
    app = create_app(settings)
    ensure_default_assets(settings, app.state.session_factory)
    key = ensure_local_key(settings, app.state.session_factory)
    headers = {"Authorization": f"Bearer {key}"}
    with TestClient(app) as client:
        health = client.get("/api/health").json()
        assert health["status"] == "degraded" and not health["broker"]["ok"] and health["database"]["ok"]
        started = time.monotonic()
        body = {"kind": "eval", "config": {"model": "tiny", "dataset": "synth-64"}}
        response = client.post("/api/jobs", headers=headers, json=body)
        # The job is not lost: it waits, queued, and the reaper publishes it once the broker is back.
        assert response.status_code == 201 and response.json()["status"] == "queued"
        assert any("REDIS_URL" in warning for warning in response.json()["warnings"])
        assert time.monotonic() - started < 10  # a dead broker must not hang the request
        jobs = client.get("/api/jobs", headers=headers).json()["items"]
        assert [(job["status"], job["error"]) for job in jobs] == [("queued", None)]


def _serve_log(tmp_path: Path, tiny_model_dir: Path, *args: str) -> tuple[str, str]:
    """Start `vopd serve` (studio mounted, no worker), make a few successful requests and one 404, stop it; the
    output and the local key."""
    home = tmp_path / "home"
    if not (home / "models" / "tiny").exists():
        shutil.copytree(tiny_model_dir, home / "models" / "tiny")
    env = {key: value for key, value in os.environ.items() if key not in ("DATABASE_URL", "REDIS_URL")}
    env.update({"VOPD_HOME": str(home), "OMP_NUM_THREADS": "1"})
    env.pop("VOPD_ACCESS_LOG", None)
    port = free_port()
    log = tmp_path / f"serve-{port}.log"
    with log.open("w") as out:
        server = subprocess.Popen(
            vopd_command("serve", "--port", str(port), "--no-worker", *args),
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and server.poll() is None and "/signin?code=" not in log.read_text():
            time.sleep(0.3)
        assert "/signin?code=" in log.read_text(), log.read_text()[-3000:]
        key = (home / "local_api_key").read_text().strip()
        for _ in range(5):
            assert httpx.get(f"{base}/api/models", headers={"Authorization": f"Bearer {key}"}).status_code == 200
        assert httpx.get(f"{base}/api/no-such-route", params={"key": key}).status_code == 404
        time.sleep(0.5)
    finally:
        server.send_signal(signal.SIGINT)
        server.wait(60)
    return log.read_text(), key


def test_serve_logs_errors_only_by_default_and_prints_the_signin_link_last(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    """Finding: `vopd serve` logged every request (about 6,000 lines in 35 minutes of an open studio), burying the
    sign-in link, which uvicorn's start-up lines followed anyway."""
    output, key = _serve_log(tmp_path, tiny_model_dir)
    lines = output.splitlines()
    assert not [line for line in lines if "GET /api/models" in line], "a successful request was logged"
    missing = [line for line in lines if "/api/no-such-route" in line]
    assert len(missing) == 1 and "404" in missing[0] and key not in output and "[redacted]" in missing[0]
    running = next(i for i, line in enumerate(lines) if "Uvicorn running on" in line)
    link = next(i for i, line in enumerate(lines) if "/signin?code=" in line)
    assert running < link, "the sign-in link comes after uvicorn's start-up lines"
    startup = lines[: next(i for i, line in enumerate(lines) if "/api/no-such-route" in line)]
    assert link == len(startup) - 1, f"nothing after the link before the first request: {startup[link:]}"

    everything, key = _serve_log(tmp_path, tiny_model_dir, "--access-log", "all")
    assert len([line for line in everything.splitlines() if "GET /api/models" in line]) == 5
    assert key not in everything
