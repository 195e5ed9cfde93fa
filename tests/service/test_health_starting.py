"""/api/health says "starting", not "degraded", while the worker `vopd serve` started is up but not yet reporting."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient

from app.main import create_app
from app.settings import Settings


class _LocalWorker:
    """What /api/health reads of `vopd serve`'s supervisor."""

    def __init__(self, alive: bool) -> None:
        self.alive = alive

    def status(self) -> dict[str, Any]:
        return {"pid": 1234, "alive": self.alive, "restarts": 0, "last_exit_code": None, "next_start_in_s": None}


def test_health_is_starting_while_the_local_worker_boots_and_degraded_when_it_is_dead(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path, database_url_env=f"sqlite:///{tmp_path}/vopd.db")
    app = create_app(settings)
    with TestClient(app) as client:
        app.state.local_worker = _LocalWorker(alive=True)  # importing torch; no heartbeat yet
        health = client.get("/api/health").json()
        assert health["status"] == "starting" and health["workers"] == [], health
        app.state.local_worker = _LocalWorker(alive=False)
        assert client.get("/api/health").json()["status"] == "degraded"
        app.state.local_worker = None  # scaled out: no worker of ours to wait for
        assert client.get("/api/health").json()["status"] == "degraded"
