"""POST /api/jobs/plan: a train job's memory plan before it is submitted, as `vopd train --dry-run` prints it."""

from __future__ import annotations

import pytest

from tests.service.conftest import Service

pytestmark = [pytest.mark.services]


def _plan(service: Service, **body) -> object:
    payload = {"kind": "train", "recipe": "paper", "config": {"model": "tiny", "dataset": "synth-64"}, **body}
    return service.client.post("/api/jobs/plan", headers=service.alice, json=payload)


def test_the_plan_of_a_train_job_is_previewed_and_nothing_is_queued(service: Service) -> None:
    jobs_before = service.client.get("/api/jobs", headers=service.alice).json()["total"]
    response = _plan(service, device_memory="80GiB", device_type="cuda", resources={"gpus": 2})
    assert response.status_code == 200, response.text
    plan = response.json()
    assert plan["fits"] is True and plan["device_memory_bytes"] == 80 * 2**30
    terms = plan["per_device_bytes"]
    assert terms["total"] == sum(value for key, value in terms.items() if key != "total")
    assert plan["assumptions"]["world_size"] == 2 and plan["assumptions"]["strategy"] == "ddp"
    assert plan["model"]["model_type"] == "qwen2_vl" and "GiB per device" in plan["table"]
    assert service.client.get("/api/jobs", headers=service.alice).json()["total"] == jobs_before

    tight = _plan(service, device_memory="64MiB", device_type="cuda").json()
    assert tight["fits"] is False and "does NOT fit" in tight["table"]


def test_a_plan_refuses_what_it_cannot_read(service: Service) -> None:
    unknown = service.client.post(
        "/api/jobs/plan",
        headers=service.alice,
        json={"kind": "train", "config": {"model": "nope", "dataset": "synth-64", "steps": 1}},
    )
    assert unknown.status_code == 422 and unknown.json()["detail"][0]["loc"] == ["body", "config", "model"]
    assert _plan(service, device_memory="lots").status_code == 422
    assert service.client.post("/api/jobs/plan", json={"kind": "train"}).status_code in (401, 403, 422)
