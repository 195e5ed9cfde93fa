"""A training job with rollout.engine vllm through the REST API, run by a real `vopd worker` (Celery prefork child):
the engine runs inside the worker's child process and the job's metrics carry the engine's agreement figures."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.service.conftest import service, tiny_train_config  # noqa: F401 (the fixture, used by name)
from vopd.tiny import shipped_base_model_dir


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    """The service's "tiny" model is the shipped, pretrained tiny-base here: on a random model the suppressed tokens
    hold about 1% of the mass, which the engine's (suppressed) log-probs leave out and the trainer's keep, so the
    agreement metric would read log(1 - that mass) instead of the sync's rounding (docs/rollouts.md)."""
    return shipped_base_model_dir()


@pytest.mark.parametrize("service", ["sqlite"], indirect=True)  # the embedded broker, as `vopd serve` runs
def test_vllm_training_job_through_the_api(service) -> None:  # noqa: F811
    rollout = {"num_rollouts": 2, "max_new_tokens": 4, "engine": "vllm", "vllm": {"max_model_len": 1024}}
    config = tiny_train_config(steps=2, save_every=2, rollout=rollout)
    response = service.client.post("/api/jobs", headers=service.alice, json={"kind": "train", "config": config})
    assert response.status_code == 201, response.text
    job = service.wait_for(response.json()["id"], {"succeeded", "failed"}, timeout_s=420)
    assert job["status"] == "succeeded", (job["error"], service.worker_tail())
    assert job["engine"] == "vllm"  # as the worker resolved it, shown on the job page
    metrics = service.client.get(f"/api/jobs/{job['id']}/metrics", headers=service.alice).json()["items"]
    assert [row["step"] for row in metrics] == [1, 2]
    for row in metrics:
        assert row["data"]["rollout/logprob_diff_max"] < 1e-4, row["data"]
        assert row["data"]["rollout/sync_s"] > 0


@pytest.mark.parametrize("service", ["sqlite"], indirect=True)
def test_vllm_eval_job_through_the_api(service) -> None:  # noqa: F811
    """An eval job with engine vllm: the worker's child makes, syncs and closes an engine of the evaluation's own."""
    config = {"model": "tiny", "dataset": "synth-64", "limit": 4, "batch_size": 4, "max_new_tokens": 4}
    config |= {"engine": "vllm", "vllm": {"max_model_len": 1024}, "runtime": {"device": "cpu"}}
    response = service.client.post("/api/jobs", headers=service.alice, json={"kind": "eval", "config": config})
    assert response.status_code == 201, response.text
    job = service.wait_for(response.json()["id"], {"succeeded", "failed"}, timeout_s=420)
    assert job["status"] == "succeeded", (job["error"], service.worker_tail())
    assert job["result"]["engine"] == job["engine"] == "vllm" and job["result"]["n"] == 4
    records = service.client.get(f"/api/jobs/{job['id']}/artifacts/records.jsonl", headers=service.alice)
    assert records.status_code == 200 and len(records.text.splitlines()) == 4
