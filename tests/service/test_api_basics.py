"""Health, docs, auth and the names a newcomer can use at once (tiny model, synthetic dataset)."""

from __future__ import annotations

import subprocess

import pytest

from app.serve import vopd_command
from tests.service.conftest import UNSERVED, Service, tiny_train_config

pytestmark = pytest.mark.services


def test_health_needs_no_key_and_sees_database_broker_and_worker(service: Service) -> None:
    health = service.client.get("/api/health").json()
    assert health["status"] == "ok", health
    assert health["database"] == {"ok": True, "detail": service.backend}
    assert health["broker"]["ok"] is True
    assert [worker["queue"] for worker in health["workers"]] == [service.settings.queue]


def test_openapi_docs_are_served(service: Service) -> None:
    assert service.client.get("/docs").status_code == 200
    paths = service.client.get("/openapi.json").json()["paths"]
    for path in ("/api/jobs", "/api/jobs/{job_id}/events", "/api/datasets", "/api/models", "/api/inspect"):
        assert path in paths


@pytest.mark.parametrize("path", ["/api/jobs", "/api/datasets", "/api/models", "/api/me"])
def test_every_route_but_health_requires_a_valid_key(service: Service, path: str) -> None:
    missing = service.client.get(path)
    assert missing.status_code == 401
    assert missing.headers["www-authenticate"] == "Bearer"
    assert "vopd apikey create" in missing.json()["detail"]
    assert service.client.get(path, headers={"Authorization": "Bearer vopd_wrong"}).status_code == 401
    assert service.client.get(path, headers=service.alice).status_code == 200


def test_keys_identify_their_owner(service: Service) -> None:
    assert service.client.get("/api/me", headers=service.alice).json()["name"] == "alice"
    assert service.client.get("/api/me", headers=service.bob).json()["name"] == "bob"


def test_default_model_and_dataset_are_usable_names(service: Service) -> None:
    models = service.client.get("/api/models", headers=service.alice).json()["items"]
    assert {"name": "tiny", "kind": "base", "job_id": None, "step": None} in models
    assert {"name": "tiny-nobox", "kind": "base", "job_id": None, "step": None} in models  # the box-free world's
    datasets = service.client.get("/api/datasets", headers=service.bob).json()["items"]
    synth = next(item for item in datasets if item["id"] == "synth-64")
    assert synth["shared"] is True and synth["n_samples"] == 64


def test_apikey_create_prints_a_working_key_as_last_line(service: Service) -> None:
    done = subprocess.run(
        vopd_command("apikey", "create", "--name", "carol"),
        env=service.env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    key = done.stdout.strip().splitlines()[-1]
    assert key.startswith("vopd_") and len(key) > 40
    me = service.client.get("/api/me", headers={"Authorization": f"Bearer {key}"})
    assert me.status_code == 200 and me.json()["name"] == "carol"


def test_queued_jobs_show_their_place_in_line_in_get_and_list(service: Service) -> None:
    # A queue nobody serves, so the jobs stay queued; the place is read with the row, in one statement.
    queue = f"{service.settings.queue}-{UNSERVED}"
    body = {"kind": "train", "queue": queue, "config": tiny_train_config()}
    ids = [service.client.post("/api/jobs", headers=service.alice, json=body).json()["id"] for _ in range(3)]

    def places() -> tuple[list[int | None], list[int | None]]:
        got = [
            service.client.get(f"/api/jobs/{job_id}", headers=service.alice).json()["queue_position"] for job_id in ids
        ]
        listed = {
            item["id"]: item["queue_position"]
            for item in service.client.get("/api/jobs?limit=200", headers=service.alice).json()["items"]
        }
        return got, [listed[job_id] for job_id in ids]

    assert places() == ([1, 2, 3], [1, 2, 3])
    assert service.client.post(f"/api/jobs/{ids[0]}/cancel", headers=service.alice).status_code == 200
    assert places() == ([None, 1, 2], [None, 1, 2])
    assert service.client.get(f"/api/jobs/{ids[1]}", headers=service.bob).status_code == 404  # not bob's
    for job_id in ids[1:]:
        service.client.post(f"/api/jobs/{job_id}/cancel", headers=service.alice)
