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


def test_the_offload_settings_pass_through_the_shared_config(service: Service) -> None:
    """The paper recipe offloads AdamW's state and the teacher (ddp on 2 devices here): the plan puts them on the
    host; a job's own config switches them off."""
    offloaded = _plan(service, device_memory="80GiB", device_type="cuda", resources={"gpus": 2}).json()
    assert offloaded["per_device_bytes"]["optimizer"] == 0 and offloaded["per_device_bytes"]["teacher"] == 0
    assert offloaded["host_bytes"]["optimizer"] > 0 and offloaded["host_bytes"]["teacher"] > 0
    off = {"offload_optimizer": False, "offload_params": False, "offload_teacher": False}
    config = {"model": "tiny", "dataset": "synth-64", "runtime": off}
    on_device = _plan(service, device_memory="80GiB", device_type="cuda", resources={"gpus": 2}, config=config).json()
    assert on_device["host_bytes"] == {"total": 0}
    assert on_device["per_device_bytes"]["teacher"] == offloaded["host_bytes"]["teacher"]
    refused = _plan(
        service,
        config={
            "model": "tiny",
            "dataset": "synth-64",
            "runtime": {"strategy": "fsdp", **off, "offload_optimizer": True},
        },
    )
    assert refused.status_code == 422 and "offload_params" in refused.text


def test_a_plan_refuses_what_it_cannot_read(service: Service) -> None:
    unknown = service.client.post(
        "/api/jobs/plan",
        headers=service.alice,
        json={"kind": "train", "config": {"model": "nope", "dataset": "synth-64", "steps": 1}},
    )
    assert unknown.status_code == 422 and unknown.json()["detail"][0]["loc"] == ["body", "config", "model"]
    assert _plan(service, device_memory="lots").status_code == 422
    assert service.client.post("/api/jobs/plan", json={"kind": "train"}).status_code in (401, 403, 422)
