"""The per-key storage quota counts everything a key's jobs write and holds at job creation and while a job runs.

Jobs run in this process through ``worker.runner.run_job`` (what the Celery task calls), on the tiny model: a
checkpoint of it (weights, optimizer state, the EMA teacher) is about 60 MB, far more than the final folder and the
metrics file that the quota once counted alone.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import update

from app.artifacts import folder_size
from app.db import session_scope
from app.settings import Settings
from app.tables import Dataset, Job
from tests.service.conftest import tiny_train_config
from worker.runner import run_job

pytestmark = [pytest.mark.services, pytest.mark.slow]
MB = 1 << 20


@dataclass
class Api:
    client: TestClient
    settings: Settings
    alice: dict[str, str]
    admin: dict[str, str]

    def submit(self, **overrides) -> dict:
        response = self.client.post(
            "/api/jobs", headers=self.alice, json={"kind": "train", "config": tiny_train_config(**overrides)}
        )
        assert response.status_code == 201, response.text
        return response.json()

    def job(self, job_id: int) -> dict:
        return self.client.get(f"/api/jobs/{job_id}", headers=self.alice).json()

    def run(self, job_id: int) -> dict:
        """Run the job to its end here, as a worker's task would."""
        run_job(self.client.app.state.session_factory, self.settings, job_id)
        return self.job(job_id)


def _api(tmp_path: Path, tiny_model_dir: Path, quota_mb: float) -> Iterator[Api]:
    from app.auth import create_api_key
    from app.bootstrap import ensure_default_assets, ensure_local_key
    from app.main import create_app

    settings = Settings(
        home=tmp_path, database_url_env=f"sqlite:///{tmp_path}/vopd.db", user_quota_mb=quota_mb, heartbeat_interval_s=1
    )
    shutil.copytree(tiny_model_dir, tmp_path / "models" / "tiny")
    app = create_app(settings)
    ensure_default_assets(settings, app.state.session_factory)
    admin = {"Authorization": f"Bearer {ensure_local_key(settings, app.state.session_factory)}"}
    with session_scope(app.state.session_factory) as session:
        _, alice_key = create_api_key(session, "alice")
    with TestClient(app) as client:
        yield Api(client, settings, {"Authorization": f"Bearer {alice_key}"}, admin)


@pytest.fixture
def roomy(tmp_path: Path, tiny_model_dir: Path) -> Iterator[Api]:
    yield from _api(tmp_path, tiny_model_dir, quota_mb=10_000)


@pytest.fixture
def tight(tmp_path: Path, tiny_model_dir: Path) -> Iterator[Api]:
    """A quota that the tiny model's first checkpoint crosses."""
    yield from _api(tmp_path, tiny_model_dir, quota_mb=30)


def _alice_usage(api: Api) -> int:
    keys = api.client.get("/api/keys", headers=api.admin).json()["items"]
    return next(key["storage_used_bytes"] for key in keys if key["name"] == "alice")


def test_checkpoints_count_and_admins_see_usage(roomy: Api) -> None:
    job = roomy.submit(steps=4, save_every=2)
    done = roomy.run(job["id"])
    assert done["status"] == "succeeded", done["error"]
    on_disk = folder_size(roomy.settings.job_dir(job["id"]))
    checkpoints = folder_size(roomy.settings.job_dir(job["id"]) / "checkpoints")
    assert checkpoints > 10 * MB  # the bulk of what the job wrote
    used = _alice_usage(roomy)
    assert used >= on_disk, (used, on_disk)  # every byte of the job folder counts, checkpoints included
    assert used < on_disk + MB  # ... plus its log lines, nothing else (alice has no dataset)
    keys = roomy.client.get("/api/keys", headers=roomy.admin).json()["items"]
    assert all(isinstance(key["storage_used_bytes"], int) for key in keys)
    # A download's archive is the owner's storage too.
    assert roomy.client.get(f"/api/jobs/{job['id']}/artifacts/final", headers=roomy.alice).status_code == 200
    assert _alice_usage(roomy) > used + MB


def test_an_over_quota_key_creates_no_job(tight: Api) -> None:
    job = tight.submit()
    factory = tight.client.app.state.session_factory
    me = tight.client.get("/api/me", headers=tight.alice).json()
    with session_scope(factory) as session:  # a 31 MB dataset of alice's, and her job failed
        session.add(
            Dataset(id="ds-big", owner_id=me["id"], name="big", path="/nowhere", n_samples=1, size_bytes=31 * MB)
        )
        session.execute(update(Job).where(Job.id == job["id"]).values(status="failed"))
    for response in (
        tight.client.post("/api/jobs", headers=tight.alice, json={"kind": "train", "config": tiny_train_config()}),
        tight.client.post(
            "/api/jobs", headers=tight.alice, json={"kind": "eval", "config": {"model": "tiny", "dataset": "synth-64"}}
        ),
        tight.client.post(f"/api/jobs/{job['id']}/resume", headers=tight.alice),
    ):
        assert response.status_code == 429, response.text
        body = response.json()
        assert (body["used_bytes"], body["limit_bytes"]) == (31 * MB, 30 * MB), body
        assert "over your storage quota: 31.0 MB used of 30 MB (VOPD_USER_QUOTA_MB)" in body["detail"]
    assert tight.client.get("/api/jobs", headers=tight.alice).json()["total"] == 1  # nothing refused was stored
    admin_job = tight.client.post(
        "/api/jobs", headers=tight.admin, json={"kind": "train", "config": tiny_train_config()}
    )
    assert admin_job.status_code == 201, admin_job.text


def test_a_running_job_that_crosses_the_quota_fails_and_keeps_its_last_checkpoint(tight: Api) -> None:
    job = tight.submit(steps=6, save_every=2)
    done = tight.run(job["id"])
    assert done["status"] == "failed", done
    assert done["error"].startswith("over your storage quota:") and f"job {job['id']} was stopped" in done["error"]
    assert done["step"] == 2  # stopped at the checkpoint that crossed the line, not at the end
    folder = tight.settings.job_dir(job["id"])
    assert sorted(path.name for path in (folder / "checkpoints").iterdir()) == ["step-2"]  # the last good one
    assert (folder / "checkpoints" / "step-2" / "trainer_state.pt").is_file()
    assert not (folder / "final").exists() and not list(folder.rglob("*.partial"))
    logs = tight.client.get(f"/api/jobs/{job['id']}/logs", headers=tight.alice).json()["items"]
    assert any(row["level"] == "error" and "over your storage quota" in row["message"] for row in logs)
    assert not any("Traceback" in row["message"] for row in logs)  # a quota stop is no crash
    assert _alice_usage(tight) >= folder_size(folder)  # what is left is counted
    resumed = tight.client.post(f"/api/jobs/{job['id']}/resume", headers=tight.alice)
    assert resumed.status_code == 429, resumed.text


def test_a_synthetic_set_counts_against_the_quota_and_one_over_it_is_refused_undrawn(tight: Api) -> None:
    before = _alice_usage(tight)
    made = tight.client.post("/api/datasets/synthetic", headers=tight.alice, json={"n": 10, "seed": 1})
    assert made.status_code == 201, made.text
    assert _alice_usage(tight) == before + made.json()["size_bytes"] > before
    folders = set(tight.settings.datasets_dir.iterdir())
    refused = tight.client.post("/api/datasets/synthetic", headers=tight.alice, json={"n": 2000, "seed": 1})
    assert refused.status_code == 413 and "over your storage quota" in refused.json()["detail"]
    assert set(tight.settings.datasets_dir.iterdir()) == folders  # nothing drawn, nothing left behind
